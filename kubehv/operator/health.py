"""The controller's health endpoint, served by every replica from its first second.

Why this module exists: the controller Deployment runs a leader and a standby. If the
health endpoint came up only with the leader's work (as kopf's liveness endpoint does), the
standby's livenessProbe would restart it forever, its PodDisruptionBudget would block
draining the leader's node and a rolling update would never finish. So a plain HTTP server
in a daemon thread answers before leader election starts:

- ``/healthz`` (liveness): 200 while the process runs and its registered checks pass;
- ``/readyz`` (readiness): 200 when every readiness check passes (the webhook serving, for
  example) — a standby is Ready, since it serves the webhook too;
- ``/leader``: 200 on the leader, 503 on a standby (for people and tests, not for probes).
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Check = Callable[[], str | None]
"""Returns why the process is not healthy/ready, or None."""


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs at debug level and answers with one whole body."""

    def reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # One request per connection: the API server's kept-alive connection to a Service IP
        # stays DNAT'd to this pod after its endpoint is removed, so a webhook replica going
        # away would reset the next admission call (seen on a real node's leader failover).
        # A new connection always follows the current endpoints.
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(f"{self.server.server_address}: " + format, *args)


class Health:
    def __init__(self) -> None:
        self.live: dict[str, Check] = {}
        self.ready: dict[str, Check] = {}
        self.is_leader: Callable[[], bool] = lambda: False
        self._server: http.server.ThreadingHTTPServer | None = None

    def problems(self, checks: dict[str, Check]) -> list[str]:
        out = []
        for name, check in list(checks.items()):
            try:
                why = check()
            except Exception as exc:
                why = f"check failed: {exc}"
            if why:
                out.append(f"{name}: {why}")
        return out

    def answer(self, path: str) -> tuple[int, str]:
        if path == "/healthz":
            bad = self.problems(self.live)
        elif path == "/readyz":
            bad = self.problems(self.live) + self.problems(self.ready)
        elif path == "/leader":
            return (200, "leader\n") if self.is_leader() else (503, "standby\n")
        else:
            return 404, "not found\n"
        return (503, "\n".join(bad) + "\n") if bad else (200, "ok\n")

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:  # noqa: S104 - probed by kubelet
        """Start answering on ``port`` (0: a free one) in a daemon thread; returns the port."""
        health = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                code, text = health.answer(self.path.split("?", 1)[0])
                self.reply(code, text.encode(), "text/plain; charset=utf-8")

        server = http.server.ThreadingHTTPServer((addr, port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
