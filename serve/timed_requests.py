"""The ASGI middleware base the ingress's per-request observers share: it times each HTTP request
from its arrival to the end of its body (streams included) and hands the status and milliseconds to
:meth:`TimedRequests.finished`. :class:`serve.access_log.AccessLog` logs a line from it,
:class:`serve.metrics.RequestMetrics` records Prometheus series."""

from __future__ import annotations

import time
from typing import Any


class TimedRequests:
    """ASGI middleware: ``app = Subclass(app)``; subclasses implement :meth:`finished`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]  # 500 when the app fails before it answers

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.finished(scope, status[0], (time.perf_counter() - t0) * 1e3)

    def finished(self, scope: dict[str, Any], status: int, ms: float) -> None:
        """Called once per HTTP request, after its body (or its failure), with the status sent."""
        raise NotImplementedError
