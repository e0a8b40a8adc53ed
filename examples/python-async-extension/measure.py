"""Memory and start-up of gunicorn and uWSGI serving the async example app (a tokio runtime
and a deadpool-postgres pool built at import), the app holding ~200 MiB of state built at
import: eager loading with forksafe-pool's runtime and pool (`gunicorn --preload`, uWSGI's
default) against lazy loading, the usual cure, with the plain tokio runtime and deadpool pool
(gunicorn without `--preload`, uWSGI `--lazy-apps`).

For each mode and round: start the server with 4 workers on a free loopback port, send
requests from 8 threads until all 4 workers have answered right (the start-up time, from the
spawn), send 400 more, then sum the PSS of the master and its workers from
/proc/PID/smaps_rollup. Modes alternate round by round; medians are printed as a Markdown
table. Every server is killed by its process group and reaped.

Run with the virtual environment scripts/test builds, after a release build of the module:

    scripts/measure-python-async-servers
"""

import argparse
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = 4
PROBE_THREADS = 8
START_DEADLINE = 120.0
REQUEST_TIMEOUT = 10.0
STOP_DEADLINE = 15.0
PR_SET_CHILD_SUBREAPER = 36


def uwsgi(venv, port, extra):
    return [
        os.path.join(venv, "bin", "uwsgi"),
        "--master", "--processes", str(WORKERS),
        "--http-socket", f"127.0.0.1:{port}",
        "--home", venv,
        "--wsgi-file", os.path.join(HERE, "app.py"),
        "--need-app", "--disable-logging", *extra,
    ]


def gunicorn(venv, port, extra):
    return [
        os.path.join(venv, "bin", "gunicorn"),
        "--workers", str(WORKERS), "--worker-class", "sync",
        "--bind", f"127.0.0.1:{port}", "--chdir", HERE, *extra, "app:application",
    ]


# mode: (server command, ASYNC_ECHO_POOL, extra arguments)
MODES = {
    "uWSGI eager, forksafe-pool": (uwsgi, "forksafe", []),
    "uWSGI --lazy-apps, plain tokio + deadpool": (uwsgi, "naive", ["--lazy-apps"]),
    "gunicorn --preload, forksafe-pool": (gunicorn, "forksafe", ["--preload"]),
    "gunicorn (no --preload), plain tokio + deadpool": (gunicorn, "naive", []),
}


def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def ask(port, token):
    """The worker pid of a right answer, or None."""
    url = f"http://127.0.0.1:{port}/?token={token}"
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as response:
            body = response.read().decode()
    except OSError:
        return None
    words = body.split()
    if len(words) < 3 or words[0] != "ok" or words[1] != token:
        raise RuntimeError(f"wrong answer to {token}: {body!r}")
    return int(words[2].removeprefix("worker="))


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise SystemExit(f"no Pss in /proc/{pid}/smaps_rollup")


def run_once(venv, mode, state_mib, database_url):
    server_command, pool_kind, extra = MODES[mode]
    port = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        ASYNC_ECHO_POOL=pool_kind,
        APP_STATE_MIB=str(state_mib),
    )
    started = time.monotonic()
    server = subprocess.Popen(
        server_command(venv, port, extra), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0,
    )
    try:
        seen = set()
        errors = []
        lock = threading.Lock()
        ready = threading.Event()

        def probe(thread):
            n = 0
            while not ready.is_set() and time.monotonic() - started < START_DEADLINE:
                try:
                    worker = ask(port, f"start-{thread}-{n}")
                except RuntimeError as error:
                    errors.append(error)
                    ready.set()
                    return
                n += 1
                if worker is None:
                    time.sleep(0.01)
                    continue
                with lock:
                    seen.add(worker)
                    if len(seen) == WORKERS:
                        ready.set()

        threads = [threading.Thread(target=probe, args=(t,)) for t in range(PROBE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise SystemExit(f"{mode}: {errors[0]}")
        if not ready.is_set():
            raise SystemExit(f"{mode}: {len(seen)} of {WORKERS} workers answered in {START_DEADLINE}s")
        start_seconds = time.monotonic() - started
        for n in range(400):
            if ask(port, f"load-{n}") is None:
                raise SystemExit(f"{mode}: request load-{n} failed")
        workers = children(server.pid)
        if len(workers) != WORKERS:
            raise SystemExit(f"{mode}: {len(workers)} worker processes, expected {WORKERS}")
        pss = pss_kib(server.pid) + sum(pss_kib(worker) for worker in workers)
        return start_seconds, pss / 1024
    finally:
        stop(server.pid)


def stop(group):
    """Kills the server's process group and reaps all of it (its workers are reparented here,
    a subreaper, when the master dies)."""
    os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + STOP_DEADLINE
    while True:
        try:
            pid, _ = os.waitpid(-group, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"server group {group} still alive {STOP_DEADLINE}s after SIGKILL")
            time.sleep(0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state-mib", type=int, default=200)
    parser.add_argument("--venv", default=os.path.join(HERE, "..", "..", "target", "python-venv"))
    parser.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/test?sslmode=prefer",
    )
    parser.add_argument(
        "--mode", action="append", dest="modes",
        help="measure this mode (repeatable; all by default): " + "; ".join(MODES),
    )
    args = parser.parse_args()
    modes = args.modes or list(MODES)
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}")
    results = {mode: [] for mode in modes}
    for round_number in range(args.rounds):
        order = modes if round_number % 2 == 0 else list(reversed(modes))
        for mode in order:
            start_seconds, pss_mib = run_once(args.venv, mode, args.state_mib, args.database_url)
            results[mode].append((start_seconds, pss_mib))
            print(f"round {round_number + 1}, {mode}: all {WORKERS} workers answered after "
                  f"{start_seconds:.2f} s, PSS {pss_mib:.0f} MiB", file=sys.stderr)
    print(f"\n{WORKERS} workers, app state {args.state_mib} MiB, "
          f"medians of {args.rounds} rounds\n")
    print("| mode | all workers answer after | PSS master + workers |")
    print("|---|---:|---:|")
    for mode, runs in results.items():
        start = statistics.median(run[0] for run in runs)
        pss = statistics.median(run[1] for run in runs)
        print(f"| {mode} | {start:.2f} s | {pss:.0f} MiB |")


if __name__ == "__main__":
    main()
