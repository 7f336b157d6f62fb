"""Serving metrics, exported through ``ray.serve.metrics`` (Prometheus).

Ray exports every process's metrics at its node's metrics export port
(``ray.nodes()[i]["MetricsExportPort"]``; fix it with ``ray start --metrics-export-port`` or
``ray.init(_metrics_export_port=...)``): ``curl http://NODE:PORT/metrics``. Names get Ray's ``ray_``
prefix and counters a ``_total`` suffix, so ``dnc_generated_tokens`` is scraped as
``ray_dnc_generated_tokens_total``; Serve adds ``deployment``, ``replica`` and ``application`` labels.
A process exports about every 10 s (``RAY_metrics_report_interval_ms``).

What each series means (the Generator records the model side, the Ingress the HTTP side):

==================================  ===============================================================
``dnc_generated_tokens``            tokens decoded (counter; ``rate(...[1m])`` = tokens/s)
``dnc_generations``                 finished generations by ``kind`` and ``finish_reason``
``dnc_time_to_first_token_ms``      request arrival at the Generator to its first token (histogram)
``dnc_inter_token_latency_ms``      decode step to decode step, as a running row sees it; one
                                    observation per step (histogram)
``dnc_decode_batch_size``           rows in one decode model call (histogram)
``dnc_queue_depth``                 requests waiting for a place in the batch (gauge)
``dnc_running_requests``            rows decoding now (gauge)
``dnc_resident_sessions``           session banks held in memory, by ``tier`` (gauge)
``dnc_durable_bytes_per_turn``      bytes one session turn made durable (histogram)
``dnc_http_requests``               HTTP requests by ``route`` (the path template), ``method``, ``status``
``dnc_http_request_ms``             HTTP request time to the end of the body, by ``route`` (histogram)
==================================  ===============================================================

Ray 2.60's exporter gives a histogram's ``_sum`` from bucket midpoints, not the observed values
(one observation of 7 with bounds 1, 10, 100 is scraped as sum 5.5): read quantiles and counts from
the buckets. ``/model/stats`` stays the JSON view (exact percentiles of recent requests).

Metric objects are created once per process (:func:`get_metrics`), lazily, so that inside a Serve
replica they carry the replica's labels; outside Ray they record into nothing.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from .timed_requests import TimedRequests

TTFT_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
ITL_BOUNDARIES_MS = [0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 200, 500, 1000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BYTES_BOUNDARIES = [2**k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB, x4
HTTP_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]


class ServeMetrics:
    """The serving metric objects of one process (use :func:`get_metrics`). Every ``record_*``
    method takes plain numbers; zero or negative counts are skipped (Ray's counters reject them)."""

    def __init__(self) -> None:
        self.generated_tokens = Counter("dnc_generated_tokens", "Tokens decoded (rate() = tokens/s).")
        self.generations = Counter("dnc_generations", "Finished generations.", tag_keys=("kind", "finish_reason"))
        self.ttft_ms = Histogram("dnc_time_to_first_token_ms", "Request arrival at the Generator to its first "
                                 "token, ms.", boundaries=TTFT_BOUNDARIES_MS, tag_keys=("kind",))
        self.inter_token_ms = Histogram("dnc_inter_token_latency_ms", "Time between a running row's tokens, ms "
                                        "(one observation per decode step).", boundaries=ITL_BOUNDARIES_MS)
        self.decode_batch = Histogram("dnc_decode_batch_size", "Rows in one decode model call.",
                                      boundaries=BATCH_BOUNDARIES)
        self.queue_depth = Gauge("dnc_queue_depth", "Requests waiting for a place in the decode batch.")
        self.running = Gauge("dnc_running_requests", "Rows decoding now.")
        self.resident_sessions = Gauge("dnc_resident_sessions", "Session banks held in memory.",
                                       tag_keys=("tier",))
        self.durable_bytes = Histogram("dnc_durable_bytes_per_turn", "Bytes one session turn made durable.",
                                       boundaries=BYTES_BOUNDARIES)
        self.http_requests = Counter("dnc_http_requests", "HTTP requests.", tag_keys=("route", "method", "status"))
        self.http_ms = Histogram("dnc_http_request_ms", "HTTP request time to the end of the body, ms.",
                                 boundaries=HTTP_BOUNDARIES_MS, tag_keys=("route", "method"))

    # ------------------------------------------------------------------ Generator side
    def record_tokens(self, n: int) -> None:
        if n > 0:
            self.generated_tokens.inc(n)

    def record_generation(self, kind: str, finish_reason: str | None) -> None:
        """``kind``: "session" | "sessionless"."""
        self.generations.inc(1, tags={"kind": kind, "finish_reason": str(finish_reason)})

    def record_ttft(self, ms: float, kind: str) -> None:
        self.ttft_ms.observe(ms, tags={"kind": kind})

    def record_decode_steps(self, batch_sizes: list[int], inter_token_ms: list[float]) -> None:
        """One iteration of the scheduler: the rows of each model call it made, and for each step in
        which running rows got their next token, how long after their previous one (ms)."""
        for b in batch_sizes:
            self.decode_batch.observe(b)
        for ms in inter_token_ms:
            self.inter_token_ms.observe(ms)

    def set_queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    # ------------------------------------------------------------------ HTTP side
    def record_http(self, route: str, method: str, status: int, ms: float) -> None:
        self.http_requests.inc(1, tags={"route": route, "method": method, "status": str(status)})
        self.http_ms.observe(ms, tags={"route": route, "method": method})


_metrics: ServeMetrics | None = None
_lock = threading.Lock()


def get_metrics() -> ServeMetrics:
    """This process's :class:`ServeMetrics` (created at the first call)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = ServeMetrics()
    return _metrics


# ---------------------------------------------------------------------- hooks for the session path
def record_durable_bytes(n: int) -> None:
    """A session turn made ``n`` bytes durable (what it appended to storage before its answer:
    the turn record, plus a snapshot when that turn wrote one). Once per acknowledged turn: the
    Generator calls it with the ``durable_bytes`` its commit ack reports (the payload it sent when
    the ack has none), so a shard that reports ``durable_bytes`` should not call it too; call it
    directly only where a turn is made durable without a Generator commit."""
    get_metrics().durable_bytes.observe(max(0, int(n)))


def set_resident_sessions(n: int, tier: str = "replica") -> None:
    """``n`` session banks are held in memory at ``tier``: "replica" (resident on a Generator
    replica, ready to decode) or "store" (in SessionBank shard memory, not offloaded)."""
    get_metrics().resident_sessions.set(max(0, int(n)), tags={"tier": tier})


# ---------------------------------------------------------------------- HTTP middleware
def route_label(scope: dict[str, Any]) -> str:
    """The route template a request matched (``/v1/state/{state_id}``: bounded label values, no
    ids), the mount path for mounted apps (``/ui``), or ``unmatched``."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    root, app_root = scope.get("root_path") or "", scope.get("app_root_path")
    if app_root is not None and root.startswith(app_root) and len(root) > len(app_root):
        return root[len(app_root):]  # a mounted app (Starlette's Mount extends root_path)
    return "unmatched"


ARRIVED = "dnc.arrived"
"""The ASGI scope key of a request's arrival at the ingress app (:class:`RequestMetrics`)."""
BODY_READ = "dnc.body_read"
"""The ASGI scope key of the time its body had been read (inside a Serve replica each ``receive()``
is a Ray call back to the proxy)."""


class RequestMetrics(TimedRequests):
    """ASGI middleware: ``app = RequestMetrics(app)`` counts every HTTP request by route, method
    and status, and times it to the end of its body (streams included). The outermost middleware,
    it also leaves the request's arrival and the end of its body (``time.perf_counter()``) in its
    scope (``ARRIVED``, ``BODY_READ``; not
    ``scope["state"]``, which a server may share between requests): the origin of the ingress's
    stages in a generation's timeline."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        scope[ARRIVED] = time.perf_counter()

        async def timed_receive():
            message = await receive()
            if message.get("type") == "http.request" and not message.get("more_body"):
                scope[BODY_READ] = time.perf_counter()
            return message
        return await super().__call__(scope, timed_receive, send)

    def finished(self, scope, status: int, ms: float) -> None:
        try:
            get_metrics().record_http(route_label(scope), scope.get("method", ""), status, ms)
        except Exception:  # pragma: no cover - metrics never fail a request
            pass


# ---------------------------------------------------------------------- reading a scrape
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> ``(name, labels, value)`` per sample line (tests, benchmarks)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def summarize_scrape(samples: list[tuple[str, dict[str, str], float]], prefix: str = "ray_dnc_",
                     application: str | None = None) -> dict[str, Any]:
    """This module's series summed over replicas and labels (of ``application`` only, when given):
    ``{name: value}`` for counters and gauges; for histograms (``name`` without its suffixes)
    ``{"count", "buckets": {le: cumulative count}, "p50_le", "p99_le"}``, the ``_le`` being the label
    (upper bound, "+Inf" for the last) of the bucket that holds that quantile. Ray's histogram
    ``_sum`` is left out: it comes from bucket midpoints."""
    names = {n for n, _, _ in samples}
    out: dict[str, Any] = {}
    for name, labels, v in samples:
        if not name.startswith(prefix) or (application and labels.get("application") != application):
            continue
        if name.endswith("_bucket"):
            h = out.setdefault(name[:-7], {"count": 0.0, "buckets": {}})
            h["buckets"][labels["le"]] = h["buckets"].get(labels["le"], 0.0) + v
        elif name.endswith("_count") and name[:-6] + "_bucket" in names:
            out.setdefault(name[:-6], {"count": 0.0, "buckets": {}})["count"] += v
        elif not (name.endswith("_sum") and name[:-4] + "_bucket" in names):
            out[name] = out.get(name, 0.0) + v
    for h in out.values():
        if isinstance(h, dict):
            ordered = sorted(h["buckets"].items(), key=lambda kv: float(kv[0]))
            for q in (0.5, 0.99):
                h[f"p{int(q * 100)}_le"] = next((le for le, c in ordered if h["count"] and c >= q * h["count"]), None)
    return out
