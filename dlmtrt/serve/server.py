"""Running the app with uvicorn: the listening socket bound before the model loads (a busy port is one clear
line, port 0 picks a free one), and a graceful shutdown: the first SIGTERM / ctrl-C stops accepting (new
requests on open connections get 503), the accepted requests finish, then the process exits."""
from __future__ import annotations

import socket
import sys

from dlmtrt.errors import DlmtrtError


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno in (98, 48, 10048) else f"cannot be bound ({e.strerror})"
        raise DlmtrtError(f"port {port} on {host} {why}; pick another with --port (0 = any free port)") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve(served, sock: socket.socket, *, log_level: str = "warning", announce=None) -> None:
    """Serve `served` (app.Served) on the bound socket until SIGTERM / SIGINT."""
    import uvicorn

    from .app import create_app

    app = create_app(served)
    sched = served.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not sched.draining:
                n = sched.queue_depth + sched.running_requests
                print(f"dlmtrt serve: shutting down; finishing {n} accepted request(s)", file=sys.stderr, flush=True)
            sched.drain()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down (the process then dies of it); the shutdown
            # was orderly, so end with status 0 instead
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=None,
                            lifespan="on")
    server = Server(config)
    if announce is not None:
        announce(url_of(sock))
    server.run(sockets=[sock])
    print("dlmtrt serve: stopped", file=sys.stderr, flush=True)
