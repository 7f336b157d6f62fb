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


# ------------------------------------------------------------------------------ proxy comparison
def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _front_cpu(row: dict) -> float | None:
    """CPU ms per request of what takes HTTP: the Python proxies plus the HAProxy binary."""
    per = (row.get("cpu") or {}).get("ms_per_request") or {}
    return per.get("proxy", 0.0) + per.get("haproxy", 0.0) if per else None


def _all_cpu(row: dict) -> float | None:
    per = (row.get("cpu") or {}).get("ms_per_request") or {}
    return sum(per.values()) if per else None


def proxy_summary(rounds: list[dict]) -> list[dict]:
    """Per proxy, mode and client count: the median over the rounds of tokens/s, p50 latency, p50
    TTFT, CPU ms per request (all Serve processes; the HTTP front alone) and, at 1 client, the
    paired latency added; ``n`` = rounds; ``tokens_per_s_vs_base``: the ratio of the medians to the
    baseline's (python when measured, else the first proxy)."""
    names = list(dict.fromkeys(r["proxy"] for r in rounds))
    base = "python" if "python" in names else names[0]
    out: list[dict] = []
    keys = list(dict.fromkeys((row["mode"], row["clients"]) for r in rounds for row in r["rows"]))
    for proxy in names:
        mine = [r for r in rounds if r["proxy"] == proxy]
        for mode, clients in keys:
            rows = [row for r in mine for row in r["rows"] if row["mode"] == mode and row["clients"] == clients]
            added = [((r.get("paired") or {}).get(mode) or {}).get("added_ms_p50") for r in mine] if clients == 1 else []
            out.append({"proxy": proxy, "mode": mode, "clients": clients, "n": len(rows),
                        "requests": sum(row["ok"] for row in rows),
                        "errors": sum(sum(row["errors"].values()) for row in rows),
                        "tokens_per_s": _median([row["tokens_per_s"] for row in rows]),
                        "latency_ms_p50": _median([row["latency_ms_p50"] for row in rows]),
                        "ttft_ms_p50": _median([row["ttft_ms_p50"] for row in rows]),
                        "cpu_ms_per_request": _median([_all_cpu(row) for row in rows]),
                        "front_cpu_ms_per_request": _median([_front_cpu(row) for row in rows]),
                        "paired_added_ms_p50": _median(added), "paired_n": len([a for a in added if a is not None])})
    for s in out:
        ref = next(b for b in out if b["proxy"] == base and b["mode"] == s["mode"] and b["clients"] == s["clients"])
        s["tokens_per_s_vs_base"] = (s["tokens_per_s"] / ref["tokens_per_s"]
                                     if s["tokens_per_s"] and ref["tokens_per_s"] else None)
        s["base"] = base
    return out


def proxy_comparison(rounds: list[dict], base: dict | None = None) -> str:
    """The table comparing the proxies of a ``--proxies`` run (:func:`proxy_summary`), then what
    each figure is."""
    summary = proxy_summary(rounds)
    order = " ".join(r["proxy"] for r in rounds)
    rows = [[s["proxy"], s["mode"], str(s["clients"]), f"{s['n']} ({s['requests']} req, {s['errors']} err)",
             fmt_num(s["tokens_per_s"], "{:,.1f}"), fmt_num(s["tokens_per_s_vs_base"], "{:.2f}x"),
             fmt_num(s["latency_ms_p50"], "{:.1f}"), fmt_num(s["ttft_ms_p50"], "{:.1f}"),
             fmt_num(s["paired_added_ms_p50"], "{:.1f}"), fmt_num(s["front_cpu_ms_per_request"], "{:.2f}"),
             fmt_num(s["cpu_ms_per_request"], "{:.2f}")] for s in summary]
    head = ["proxy", "mode", "clients", "rounds", "tok/s", f"vs {summary[0]['base']}", "p50 ms", "TTFT p50 ms",
            "paired added p50 ms", "front CPU ms/req", "all CPU ms/req"]
    lines = [f"Proxy comparison: medians over the rounds (order {order}; each on a fresh local cluster, back to back).", ""]
    lines += md_table(head, rows)
    lines += ["", "vs: tokens/s over the baseline's, the same mode and clients. paired added (1 client): served - "
              "in-process latency, median of the pairs, then of the rounds. front CPU: the HTTP front per request (the "
              "Python proxies, plus the HAProxy binary in haproxy mode); all CPU: front + ingress + Generator."]
    return "\n".join(lines)
