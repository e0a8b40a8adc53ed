"""A WSGI app on the `async_echo` extension, for uWSGI and gunicorn.

Importing it imports `async_echo`, which builds its tokio runtime and its pool and queries
through them: in a master that imports the app before forking (uWSGI's default,
`gunicorn --preload`) the workers inherit both. Each request sends its own token
(`/?token=...`) through the pool and checks the database echoed that token back, so an answer
meant for another process or another request is caught here, not just a failed query.
`/ready` answers without the database: the server is up even when its workers cannot query.
An answer names the worker, the session that echoed the token and (`imported_on`) the session
of the module's import-time query: in a worker forked after the import, the master's.

`APP_STATE_MIB=N` makes the app hold N MiB of state built at import, like an app that loads
models or caches before forking (for the memory measurements).
"""

import os
from urllib.parse import parse_qs

import async_echo

APP_STATE = b"\x01" * (int(os.environ.get("APP_STATE_MIB", "0")) << 20)


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/ready":
        return respond(start_response, "200 OK", "ready")
    token = parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
    if not token:
        return respond(start_response, "400 Bad Request", "missing token")
    try:
        answer, backend_pid, tls = async_echo.echo(token)
    except Exception as error:  # every failure is reported to the client, none is fatal
        return respond(start_response, "500 Internal Server Error", f"error: {error}")
    if answer != token:
        return respond(
            start_response,
            "500 Internal Server Error",
            f"wrong answer: sent {token!r}, the database answered {answer!r}",
        )
    return respond(
        start_response,
        "200 OK",
        f"ok {token} worker={os.getpid()} backend={backend_pid} tls={tls} "
        f"pool={async_echo.pool_kind()} imported_on={async_echo.import_backend_pid()}",
    )


def respond(start_response, status, body):
    data = (body + "\n").encode()
    start_response(
        status,
        [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))],
    )
    return [data]
