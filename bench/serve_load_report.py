"""The tables of a ``bench/serve_load.py`` result: requests/s, tokens/s and latency percentiles
of ``/v1/generate`` per mode and client count."""

from __future__ import annotations

from typing import Any

from common import fmt_num, md_table
from serve_processes import SERVE_PROCESSES
from serve_timeline import tables as timeline_tables

TITLE = "Serving load (`bench/serve_load.py`)"
WHAT = ("Requests/s, tokens/s, latency percentiles and time to first token of `/v1/generate` under "
        "N concurrent clients on loopback (plain = batched, stream = SSE), against the same "
        "generation run in-process.")


def rounds_of(res: dict) -> list[dict] | None:
    """The rounds of a ``--proxies``/``--rounds`` result, each with its ``rows``: stored compactly
    (since session 16) the rows live once, in ``results`` (each tagged with its ``round`` and
    ``proxy``), and a round keeps only what is its own; older results carry them in both."""
    rounds = res.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        return None
    out = []
    for rnd in rounds:
        if "rows" not in rnd:
            rows = [{k: v for k, v in r.items() if k not in ("proxy", "round")}
                    for r in res.get("results", []) if r.get("round") == rnd["round"]]
            rnd = {**rnd, "rows": rows}
        out.append(rnd)
    return out


def result_markdown(rounds: list[dict], base: dict | None) -> str:
    """The tables of a run: one round's (:func:`round_markdown`), or the proxy comparison then each
    round's under a level-4 heading (it sits under the result's own ``###`` in bench/README.md; what
    bench/serve_load.py prints)."""
    if len(rounds) == 1:
        return round_markdown(rounds[0], base)
    return proxy_comparison(rounds, base) + "".join(
        f"\n\n#### Round {rnd['round']}: {rnd['proxy']} proxy\n\n" + round_markdown(rnd, base) for rnd in rounds)


def render(res: dict) -> str:
    """The body of a serve_load result's entry in ``bench/README.md``: where it ran and the table
    the script printed (stored in the result; a multi-round result's is rebuilt from its rounds),
    or one rebuilt from its rows."""
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
    rounds = rounds_of(res)
    if rounds:
        return "\n".join(lines + [result_markdown(rounds, ip or None).rstrip("\n"), ""])
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


def latency_added(row: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Served p50 latency minus the in-process one at the same concurrency (ms): one stream
    (``generate_stream``) for 1 client, else the time the ``BatchDecoder`` took for a batch of as
    many rows (every row of it finishes then)."""
    if not base or row["latency_ms_p50"] is None:
        return None
    if row["clients"] == 1:
        return row["latency_ms_p50"] - base["latency_ms_p50"]
    ref = base["batched"].get(str(row["clients"]))
    return row["latency_ms_p50"] - ref["seconds"] * 1e3 if ref else None


def table(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"  # noqa: E731
    out = ["| mode | clients | requests | errors | tok/s | req/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms "
           "| ITL p50 ms | ITL p99 ms | ITL mean p50 ms | mean batch | p50 added ms | tok/s vs in-process batch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = (base or {}).get("batched", {}).get(str(r["clients"]))
        added = latency_added(r, base)
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        out.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {sum(r['errors'].values())} | "
                   f"{f(r['tokens_per_s'])} | {f(r['requests_per_s'], 2)} | {f(r['latency_ms_p50'])} | "
                   f"{f(r['latency_ms_p99'])} | {f(r['ttft_ms_p50'])}{'*' if r['ttft_at'] == 'server' else ''} | "
                   f"{f(r['ttft_ms_p99'])} | {f(r['itl_ms_p50'], 2)} | {f(r['itl_ms_p99'], 2)} | "
                   f"{f(r['itl_mean_ms_p50'], 2)} | {f(r['server_mean_batch'])} | {f(added)} | "
                   f"{vs} |")
    if base:
        out.append(f"| in-process, 1 stream | 1 | {base['requests']} | 0 | {f(base['tokens_per_s'])} | "
                   f"{f(base['requests_per_s'], 2)} | {f(base['latency_ms_p50'])} | {f(base['latency_ms_p99'])} | "
                   f"{f(base['ttft_ms_p50'])} | - | {f(base['itl_ms_p50'], 2)} | {f(base['itl_ms_p99'], 2)} | "
                   "- | 1 | 0 | - |")
        for c, b in base["batched"].items():
            out.append(f"| in-process, BatchDecoder | {c} | {c} | 0 | {f(b['tokens_per_s'])} | - | "
                       f"{f(b['seconds'] * 1e3)} | - | - | - | - | - | {f(b['step_ms_mean'], 2)} | {c} | 0 | 1.00x |")
    out.append("")
    out.append("TTFT and ITL at the client (SSE arrival times; * = as the server reports it, plain mode). ITL "
               "p50/p99: every gap between token events; ITL mean: (last - first token) / (tokens - 1) per "
               "request. p50 added: served p50 latency - in-process latency at the same concurrency and prompt "
               "(1 client: one generate_stream; N clients: a BatchDecoder batch of N rows).")
    return "\n".join(out)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """CPU ms of each Serve process kind per request and per streamed event, over each level
    ("" when no row has CPU figures: a --url server)."""
    with_cpu = [r for r in rows if r.get("cpu")]
    if not with_cpu:
        return ""
    f = lambda d, k: "-" if not d or k not in d else f"{d[k]:.2f}"  # noqa: E731
    out = ["CPU of Serve's processes over each level (every thread, after the warm-up): ms per request, "
           "per streamed event (the Generator's events, one ASGI write each at the ingress); haproxy = the "
           "HAProxy binary (HAProxy mode; proxy is then Ray's Python HAProxyManager and fallback proxy); "
           "all = their sum:", "",
           "| mode | clients | requests | events | " + " | ".join(f"{k} ms/req" for k in SERVE_PROCESSES) + " | "
           + "all ms/req | " + " | ".join(f"{k} ms/event" for k in SERVE_PROCESSES) + " |",
           "|---|---:|---:|---:|" + "---:|" * (2 * len(SERVE_PROCESSES) + 1)]
    for r in with_cpu:
        c = r["cpu"]
        total = sum((c["ms_per_request"] or {}).values())
        out.append(f"| {r['mode']} | {r['clients']} | {r['ok']} | {c['events'] if c['events'] is not None else '-'} | "
                   + " | ".join(f(c["ms_per_request"], k) for k in SERVE_PROCESSES) + f" | {total:.2f} | "
                   + " | ".join(f(c["ms_per_event"], k) for k in SERVE_PROCESSES) + " |")
    return "\n".join(out)


def targets(rows: list[dict[str, Any]], base: dict[str, Any] | None,
            pair: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Issue 14's serving targets, from this run's rows where it measured them (64 clients; 1 client
    for the latency added: the paired streams when measured, else the stream level against the
    in-process baseline). ITL here is the per-request mean pacing (the server sends tokens in
    chunks, so most gaps between single events are ~0)."""
    def row(mode, clients):
        return next((r for r in rows if r["mode"] == mode and r["clients"] == clients and r["ok"]), None)
    streamed = row("chat", 64) or row("stream", 64)
    plain, one = row("plain", 64), row("stream", 1)
    added = latency_added(one, base) if one else None
    if pair and "stream" in pair:
        added = pair["stream"]["added_ms_p50"]
    found = [("streamed, 64 concurrent, tokens/s", streamed and streamed["tokens_per_s"], ">=", 20000),
             ("streamed, 64 concurrent, p50 ITL ms", streamed and streamed["itl_mean_ms_p50"], "<=", 5),
             ("streamed, 64 concurrent, p50 TTFT ms", streamed and streamed["ttft_ms_p50"], "<=", 100),
             ("sessionless plain, 64 clients, tokens/s", plain and plain["tokens_per_s"], ">=", 20000),
             ("served vs in-process at 1 client, p50 latency added ms", added, "<=", 2)]
    return [{"target": name, "measured": v, "goal": f"{op} {goal:,}", "met": (v >= goal if op == ">=" else v <= goal),
             "from": (streamed or {}).get("mode") if name.startswith("streamed") else None}
            for name, v, op, goal in found if v is not None]


def round_markdown(rnd: dict[str, Any], base: dict[str, Any] | None) -> str:
    """The tables of one server's measurement (``serve_round``)."""
    rows, pair, started = rnd["rows"], rnd["paired"], rnd["server_args"]
    md = f"Weights and session states in {rnd['dtype']}" + (f" (in-process baseline: {base['dtype']})" if base else "")
    md += "."
    if rnd["proxy"]:  # a started server: the mode its controller runs (serve/proxy_mode.py)
        md += f" HTTP through the {rnd['proxy']} proxy."
    md += "\n\n" + table(rows, base)
    if timeline_tables(rows):
        md += "\n\n" + timeline_tables(rows)
    if cpu_table(rows):
        md += "\n\n" + cpu_table(rows)
    if pair:
        md += ("\n\n| paired, 1 client | pairs | served p50 ms | in-process p50 ms | added p50 ms | TTFT added p50 ms "
               "| same tokens |\n|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(
                   f"| {m} | {v['pairs']} | {v['served_ms_p50']:.1f} | {v['in_process_ms_p50']:.1f} | "
                   f"{v['added_ms_p50']:.1f} | {v['ttft_added_ms_p50']:.1f}{'*' if m == 'plain' else ''} | "
                   f"{'yes' if v['same_tokens'] else 'no'} |" for m, v in pair.items()))
        plain = pair.get("plain", {})
        md += ("\n\nPaired: each pair is a served request then the same generation in-process, back to back; "
               "added = median of the per-pair differences (* plain: TTFT as the server reports it). Plain, split: "
               f"the Generator's own time (arrival to done) - in-process p50 {plain.get('generator_added_ms_p50', 0):.1f} ms; "
               f"served - the Generator's own time (HTTP, proxy, ingress, Ray hop) p50 {plain.get('transport_ms_p50', 0):.1f} ms.")
    goals = targets(rows, base, pair)
    if goals:
        md += "\n\n| target (issue 14) | measured | goal | met |\n|---|---:|---:|---|\n" + "\n".join(
            f"| {g['target']}{' (' + g['from'] + ')' if g['from'] else ''} | {g['measured']:,.1f} | {g['goal']} | "
            f"{'yes' if g['met'] else 'no'} |" for g in goals)
    return md
