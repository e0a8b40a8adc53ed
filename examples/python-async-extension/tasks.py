"""A Celery app whose task echoes a token through the `async_echo` extension.

`celery -A tasks worker --pool prefork` imports this module in the worker's main process,
and with it `async_echo`, which builds its tokio runtime and its pool and queries through
them; then the prefork pool forks its children, which inherit both.

Broker and result backend: Redis database 7 (`ASYNC_ECHO_CELERY_BROKER`); each test run uses
a queue of its own (`ASYNC_ECHO_CELERY_QUEUE`), so tasks a hung run left behind never reach
the next run's workers.
"""

import os

from celery import Celery

import async_echo

BROKER = os.environ.get("ASYNC_ECHO_CELERY_BROKER", "redis://127.0.0.1:6379/7")
QUEUE = os.environ.get("ASYNC_ECHO_CELERY_QUEUE", "async_echo")

app = Celery("tasks", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="async_echo.echo")
def echo(token):
    """`ok <token> worker=<pid> backend=<pid> tls=<True|False> pool=<kind> imported_on=<pid>`,
    the answer the WSGI app gives, after checking the database echoed this token."""
    answer, backend_pid, tls = async_echo.echo(token)
    if answer != token:
        raise RuntimeError(f"wrong answer: sent {token!r}, the database answered {answer!r}")
    return (
        f"ok {token} worker={os.getpid()} backend={backend_pid} tls={tls} "
        f"pool={async_echo.pool_kind()} imported_on={async_echo.import_backend_pid()}"
    )
