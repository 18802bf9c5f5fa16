"""Running the app under uvicorn: in the foreground (`qcompile serve`) or in a background thread (tests,
benchmarks in one process).

The listening socket is bound here, before uvicorn starts, so an address in use is a one-line UserError
rather than uvicorn's log-and-exit, and port 0 (any free port) works race-free: the caller reads the port
from the bound socket.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from ..errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one), or a UserError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
    try:
        sock.bind(address)
        sock.listen(2048)  # connections made before uvicorn runs wait in the backlog, not refused
    except OSError as e:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host} port {port} ({e.strerror})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app: Any) -> uvicorn.Config:
    # No access log: one line per request drowns the server's output under load.
    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)


def run(app: Any, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until interrupted (Ctrl-C or SIGTERM: uvicorn stops gracefully)."""
    uvicorn.Server(_config(app)).run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout: float = 30.0):
        self._sock = bind(host, 0)
        self.url = url_of(self._sock)
        self._server = uvicorn.Server(_config(app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="qcompile-serve", daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError("the background server did not start (see its log)")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *_exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
