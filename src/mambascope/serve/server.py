"""Running the explorer: bind the socket first (a busy port is a one-line error before the model loads),
then serve it with uvicorn until Ctrl-C / SIGTERM, which uvicorn turns into a graceful shutdown."""

from __future__ import annotations

import socket
import sys
from typing import Any

from mambascope.serve.guard import is_loopback


def is_local(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (loopback)."""
    return is_loopback(host)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free port.  ValueError (one line) when the
    address cannot be used."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(app: Any, sock: socket.socket, quiet: bool = False) -> None:
    """Serve ``app`` on ``sock`` until interrupted (returns after uvicorn's graceful shutdown)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            server_header=False, timeout_graceful_shutdown=5)
    print(f"mambascope: serving {url(sock)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
