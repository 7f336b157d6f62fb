"""One log line per HTTP request, and none for what a UI polls (Serve's own access log is off for
the ingress; start Serve with :func:`serve.app.start_serve` to turn the proxies' access log off too).

``GET /health 200 3.1 ms`` at INFO; the polled read-only paths (the UI asks every 2 s) and static
files at DEBUG. Only the path is logged, never the query string or headers (keys travel in headers).
"""

from __future__ import annotations

import logging

from .timed_requests import TimedRequests

# a child of Ray Serve's logger, so the lines land in the replica's log file beside Serve's own
logger = logging.getLogger("ray.serve.dnc_access")
QUIET_GET_PREFIXES = ("/health", "/model/stats", "/research/metrics", "/research/training-steps", "/v1/states",
                      "/v1/state/", "/v1/models", "/ui", "/docs", "/redoc", "/openapi.json", "/favicon")


class AccessLog(TimedRequests):
    """ASGI middleware: ``app = AccessLog(app)``."""

    def finished(self, scope, status: int, ms: float) -> None:
        method, path = scope.get("method", ""), scope.get("path", "")
        quiet = method == "GET" and path.startswith(QUIET_GET_PREFIXES) and status < 400
        logger.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d %.1f ms", method, path, status, ms)
