"""The tables of a ``bench/serve_load.py`` result: requests/s, tokens/s and latency percentiles
of ``/v1/generate`` per mode and client count."""

from __future__ import annotations

from common import fmt_num, md_table

TITLE = "Serving load (`bench/serve_load.py`)"
WHAT = ("Requests/s, tokens/s, latency percentiles and time to first token of `/v1/generate` under "
        "N concurrent clients on loopback (plain = batched, stream = SSE), against the same "
        "generation run in-process.")


def render(res: dict) -> str:
    """The body of a serve_load result's entry in ``bench/README.md``: where it ran and the table
    the script printed (stored in the result), or one rebuilt from its rows."""
    env = res.get("env") if isinstance(res.get("env"), dict) else {}
    ip = res.get("in_process") if isinstance(res.get("in_process"), dict) else {}
    if env:  # results that record their environment (device names, versions, argv) under "env"
        where = (f"Device: {env.get('gpu') or env.get('cpu')}, host {env.get('host')}, {env.get('cpus')} CPUs; "
                 f"torch {env.get('torch')}; ray {env.get('ray')}")
    else:
        where = (f"Device: host {res.get('host')}, {res.get('cpus')} CPUs, model on {ip.get('device', '?')}; "
                 f"torch {res.get('torch') or 'not recorded'}")
    lines = [f"{where}; commit {res.get('commit') or env.get('commit') or 'unknown'}", ""]
    if res.get("markdown"):
        return "\n".join(lines + [res["markdown"].rstrip("\n"), ""])
    rows = [[r.get("mode", "?"), str(r.get("clients", "?")), fmt_num(r.get("requests_per_s"), "{:.2f}"),
             fmt_num(r.get("tokens_per_s"), "{:.1f}"), fmt_num(r.get("latency_ms_p50"), "{:.1f}"),
             fmt_num(r.get("latency_ms_p99"), "{:.1f}")] for r in res.get("results", [])]
    return "\n".join(lines + md_table(["mode", "clients", "req/s", "tok/s", "p50 ms", "p99 ms"], rows) + [""])
