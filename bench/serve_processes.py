"""What the Serve processes of a ``bench/serve_load.py`` run spend: the CPU time of the HTTP
proxies, the HAProxy binary, the Ingress and the Generator replicas (read inside each actor), and
the run's Prometheus serving series."""

from __future__ import annotations

import os
import time
from typing import Any


def scrape_prometheus(where: str, app: str | None) -> dict[str, Any]:
    """The serving series of the whole run (every level and warm-up), summed over replicas. Waits
    one Ray export period (``RAY_metrics_report_interval_ms``, 10 s by default) and 2 s first, so
    the last requests are in."""
    import httpx

    from serve.metrics import parse_prometheus, summarize_scrape

    if where == "auto":
        import ray

        where = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
    time.sleep(max(1.0, float(os.environ.get("RAY_metrics_report_interval_ms", 10_000)) / 1000) + 2)
    summary = summarize_scrape(parse_prometheus(httpx.get(where, timeout=30).text), application=app)
    return {"url": where, "application": app, "series": summary}


SERVE_PROCESSES = ("proxy", "haproxy", "ingress", "generator")


def serve_process_cpu(app: str) -> dict[str, float]:
    """CPU seconds (every thread, user + system) each kind of Serve process has used so far, summed
    over its actors: the HTTP proxies (the Python ProxyActor; in HAProxy mode the Python
    HAProxyManager and the fallback ProxyActor), ``haproxy`` (the proxies' child processes: the
    HAProxy binary, absent in Python mode), and ``app``'s Ingress and Generator replicas. Asked
    inside each actor (``__ray_call__``), so it holds on any node; needs this process connected to
    the cluster. A kind whose actors cannot be reached is left out."""
    import ray

    def process_cpu(_actor=None) -> tuple[float, float]:  # nested: Ray pickles it by value
        """(CPU seconds of this process, every thread; CPU seconds of its child processes: the live
        ones from /proc, the ended ones from this process's cutime/cstime). Run inside a Serve actor:
        the HAProxyManager's child is the haproxy binary, whose CPU ``process_time`` does not see.
        Children are 0 where /proc is missing."""
        tick = os.sysconf("SC_CLK_TCK")

        def fields(pid) -> list[str]:  # /proc/PID/stat from field 3 (state) on: the name may hold spaces
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
            return s[s.rindex(")") + 2:].split()
        children = 0.0
        try:
            me = os.getpid()
            own = fields(me)
            children = (int(own[13]) + int(own[14])) / tick  # cutime, cstime: children already waited for
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        f = fields(pid)
                        if int(f[1]) == me:  # ppid
                            children += (int(f[11]) + int(f[12])) / tick  # utime, stime
                    except (OSError, ValueError, IndexError):
                        pass
        except (OSError, ValueError, IndexError):
            pass
        return time.process_time(), children

    kinds = {"proxy": "SERVE_PROXY_ACTOR", "ingress": f"SERVE_REPLICA::{app}#Ingress#",
             "generator": f"SERVE_REPLICA::{app}#Generator#"}
    out: dict[str, float] = {}
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    for kind, prefix in kinds.items():
        try:
            refs = [ray.get_actor(n, namespace="serve").__ray_call__.remote(process_cpu)
                    for n in named if n.startswith(prefix)]
            if refs:
                got = ray.get(refs, timeout=30)
                out[kind] = sum(own for own, _ in got)
                if kind == "proxy" and any(child for _, child in got):
                    out["haproxy"] = sum(child for _, child in got)
        except Exception:  # an actor restarting or gone: no figure rather than a wrong one
            pass
    return out


def cpu_figures(before: dict[str, float], after: dict[str, float], requests: int, tokens: int,
                events: int | None) -> dict[str, Any] | None:
    """CPU the Serve processes spent over a level: seconds by kind, and ms per request, per
    streamed event (``events``: the level's Generator events, None for whole answers) and per token."""
    used = {k: after[k] - before[k] for k in SERVE_PROCESSES if k in before and k in after}
    if not used or not requests:
        return None
    per = lambda n: {k: v * 1e3 / n for k, v in used.items()} if n else None  # noqa: E731
    return {"seconds": used, "ms_per_request": per(requests), "ms_per_event": per(events),
            "ms_per_token": per(tokens), "events": events}
