"""Sends echo tasks to the Celery worker of `tasks.py` and reports each result, within deadlines.

    python celery_client.py --tasks N --prefix TAG --start-deadline S --deadline S

Waits (at most `--start-deadline` seconds) until a worker answers a remote-control ping (the
worker's main process answers it, without the database), then prints `ready`, sends N tasks
with the tokens `TAG-0` .. `TAG-<N-1>` and prints one line per task:
`task <token> ok ...` (the task's answer), `task <token> error <message>` or
`task <token> timeout` once `--deadline` seconds have passed since the first was sent.
Imports neither `tasks` nor `async_echo`: tasks are sent by name.
"""

import argparse
import os
import sys
import time

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

BROKER = os.environ.get("ASYNC_ECHO_CELERY_BROKER", "redis://127.0.0.1:6379/7")
QUEUE = os.environ.get("ASYNC_ECHO_CELERY_QUEUE", "async_echo")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--start-deadline", type=float, default=60.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()
    app = Celery("client", broker=BROKER, backend=BROKER)
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)

    started = time.monotonic()
    while not app.control.ping(timeout=1.0):
        if time.monotonic() - started > args.start_deadline:
            print(f"no worker answered a ping within {args.start_deadline} s", flush=True)
            sys.exit(2)
    print("ready", flush=True)

    sent_at = time.monotonic()
    results = [
        (f"{args.prefix}-{n}", app.send_task("async_echo.echo", args=[f"{args.prefix}-{n}"]))
        for n in range(args.tasks)
    ]
    for token, result in results:
        left = args.deadline - (time.monotonic() - sent_at)
        try:
            # Past the deadline, only results already in are taken (`get` with a tiny
            # timeout still costs a second per task on the Redis backend).
            if left <= 0 and not result.ready():
                raise CeleryTimeout()
            answer = result.get(timeout=max(left, 1.0))
        except CeleryTimeout:
            print(f"task {token} timeout", flush=True)
        except Exception as error:  # the task's exception, re-raised here
            message = " ".join(f"{type(error).__name__}: {error}".split())
            print(f"task {token} error {message}", flush=True)
        else:
            print(f"task {token} {answer}", flush=True)
        finally:
            result.forget()
    app.control.purge()


if __name__ == "__main__":
    main()
