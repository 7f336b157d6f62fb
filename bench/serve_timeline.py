"""Where a served request's time goes, for bench/serve_load.py: each request's client-measured
latency (and, streamed, its time to first token) split into stages from the server's timeline
(``serve.schemas.Timeline``, returned in ``timing.timeline``), and the Generator's own figures over
a load level (from ``/model/stats`` before and after it).

The split uses durations only, each within one process's clock: the client's own latency, the
ingress's stages (ms after it received the request) and the Generator's (ms after it received it).
What one process cannot see is the difference of two durations:

==============  =============================================================================
``http``        client latency - ingress time: the client, HTTP, Serve's proxy and its hop to the
                ingress replica, and the answer's way back
``body``        the ingress app reading the request body (in a Serve replica each ``receive()`` is
                a Ray call back to the proxy)
``asgi``        the rest of the ingress app before the route's handler (middleware, parsing,
                validation, dependencies)
``ingress``     the route's handler before it calls the Generator (auth, quota, tokenize)
``ray``         ingress time after that call - Generator time: the Ray hops both ways
                (routing, the Generator replica's queue, the streamed events' transport)
``session``     Generator: the session's state made resident (session turns)
``queue``       Generator: waiting for a place in the decode batch (and for the driver)
``prefill``     Generator: the admitting iteration's prefill
``decode``      Generator: prefill done to the last token made (every decode step it rode in)
``tail``        Generator: last token to the result ready (hand-out, loop, session commit)
==============  =============================================================================

For the first token of a stream, ``decode`` and ``tail`` are replaced by ``first step`` (prefill
done to the first token), ``handout`` (to its event in the queue) and ``loop`` (the asyncio loop
taking it from the queue); ``ray`` and ``http`` are then the first event's hops.
"""

from __future__ import annotations

from typing import Any

LATENCY_STAGES = ("http", "body", "asgi", "ingress", "ray", "session", "queue", "prefill", "decode", "tail")
TTFT_STAGES = ("http", "body", "asgi", "ingress", "ray", "session", "queue", "prefill", "first step", "handout", "loop")
GENERATOR_COUNTERS = ("batches", "batched_requests", "iterations", "model_busy_s", "model_step_s",
                      "model_prefill_s", "model_hop_s")


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank ``q``-quantile (None for no values)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _front(t: dict[str, Any]) -> tuple[float, float]:
    """(body, asgi) ms: the ingress app's time before the handler, split at the body's end (0 for
    what a server without those stamps did not report: it counts in "ingress")."""
    handler = t.get("ingress_handler_ms") or 0.0
    body = min(t.get("ingress_body_ms") or 0.0, handler)
    return body, handler - body


def latency_stages(latency_ms: float, t: dict[str, Any]) -> dict[str, float] | None:
    """``latency_ms`` (the client's) split into :data:`LATENCY_STAGES` (ms, summing to it); None when
    the timeline lacks a stage (a server without timelines, a failed request)."""
    try:
        ready = t.get("session_ready_ms") or 0.0
        body, asgi = _front(t)
        return {"http": latency_ms - t["ingress_done_ms"], "body": body, "asgi": asgi,
                "ingress": t["ingress_sent_ms"] - body - asgi,
                "ray": t["ingress_done_ms"] - t["ingress_sent_ms"] - t["done_ms"], "session": ready,
                "queue": t["admitted_ms"] - ready, "prefill": t["prefilled_ms"] - t["admitted_ms"],
                "decode": t["last_token_ms"] - t["prefilled_ms"], "tail": t["done_ms"] - t["last_token_ms"]}
    except (KeyError, TypeError):
        return None


def ttft_stages(ttft_ms: float, t: dict[str, Any]) -> dict[str, float] | None:
    """A stream's client TTFT split into :data:`TTFT_STAGES` (ms, summing to it); None as above."""
    try:
        ready = t.get("session_ready_ms") or 0.0
        body, asgi = _front(t)
        return {"http": ttft_ms - t["ingress_first_event_ms"], "body": body, "asgi": asgi,
                "ingress": t["ingress_sent_ms"] - body - asgi,
                "ray": t["ingress_first_event_ms"] - t["ingress_sent_ms"] - t["first_yield_ms"], "session": ready,
                "queue": t["admitted_ms"] - ready, "prefill": t["prefilled_ms"] - t["admitted_ms"],
                "first step": t["first_token_ms"] - t["prefilled_ms"],
                "handout": t["first_event_ms"] - t["first_token_ms"], "loop": t["first_yield_ms"] - t["first_event_ms"]}
    except (KeyError, TypeError):
        return None


def _summary(splits: list[tuple[float, dict[str, float]]], stages: tuple[str, ...]) -> dict[str, Any]:
    """Per stage: p50 ms and p50 of its share of the whole (each request's stage / its total)."""
    out: dict[str, Any] = {"n": len(splits)}
    for s in stages:
        out[s] = {"p50_ms": pct([d[s] for _, d in splits], 0.5),
                  "share_p50": pct([d[s] / total for total, d in splits if total > 0], 0.5)}
    return out


def aggregate(records: list[dict[str, Any]], stream: bool) -> dict[str, Any] | None:
    """The level's ok records (serve_clients.one_request) -> ``{"latency": {n, stage: {p50_ms,
    share_p50}}, "ttft": ... (streams), "events_p50", "event_lag_ms_p50"}``; None when no record has a
    timeline."""
    lat, first, events, lag = [], [], [], []
    for r in records:
        t = r.get("timeline")
        if not t:
            continue
        ms = r["latency"] * 1e3
        if (d := latency_stages(ms, t)) is not None:
            lat.append((ms, d))
        if stream and r.get("ttft") is not None and (d := ttft_stages(r["ttft"] * 1e3, t)) is not None:
            first.append((r["ttft"] * 1e3, d))
        events.append(t.get("events", 0))
        if t.get("event_lag_ms_mean") is not None:
            lag.append(t["event_lag_ms_mean"])
    if not lat:
        return None
    out = {"latency": _summary(lat, LATENCY_STAGES), "events_p50": pct(events, 0.5),
           "event_lag_ms_p50": pct(lag, 0.5)}
    if first:
        out["ttft"] = _summary(first, TTFT_STAGES)
    return out


def generator_figures(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any] | None:
    """The Generator over a level (``/model/stats`` serving.generator before and after it, the
    level's wall time): mean rows per model call, fraction of the wall time its model thread was in
    iterations (``busy``) and in decode steps (``stepping``), model calls and iterations per second,
    and the mean thread hop per iteration (ms the loop waited beyond the iteration's own work)."""
    if any(k not in after for k in GENERATOR_COUNTERS) or wall_s <= 0:
        return None
    d = {k: after[k] - before.get(k, 0) for k in GENERATOR_COUNTERS}
    return {"mean_rows_per_call": d["batched_requests"] / d["batches"] if d["batches"] else None,
            "busy_fraction": d["model_busy_s"] / wall_s, "stepping_fraction": d["model_step_s"] / wall_s,
            "prefill_fraction": d["model_prefill_s"] / wall_s, "steps_per_s": d["batches"] / wall_s,
            "iterations_per_s": d["iterations"] / wall_s,
            "hop_ms_per_iteration": d["model_hop_s"] * 1e3 / d["iterations"] if d["iterations"] else None,
            "steps_per_iteration": d["batches"] / d["iterations"] if d["iterations"] else None}


def tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: the latency split, the TTFT split (streams) and the Generator's figures, one line per
    level that has them."""
    def cell(st: dict[str, Any]) -> str:
        if st["p50_ms"] is None:
            return "-"
        share = st["share_p50"]
        return f"{st['p50_ms']:,.1f}" + ("" if share is None else f" ({100 * share:.0f}%)")
    out = []
    for key, stages, title in (("latency", LATENCY_STAGES, "client latency"), ("ttft", TTFT_STAGES, "client TTFT")):
        have = [r for r in rows if (r.get("timeline") or {}).get(key)]
        if not have:
            continue
        out += [f"Where the {title} goes: p50 ms of each stage (p50 of its share of the {title}), n requests:", "",
                "| mode | clients | n | " + " | ".join(stages) + " |", "|---|---:|---:|" + "---:|" * len(stages)]
        for r in have:
            s = r["timeline"][key]
            out.append(f"| {r['mode']} | {r['clients']} | {s['n']} | " + " | ".join(cell(s[k]) for k in stages) + " |")
        out.append("")
    gens = [r for r in rows if r.get("generator")]
    if gens:
        f = lambda v, spec="{:,.1f}": "-" if v is None else spec.format(v)  # noqa: E731
        out += ["The Generator over each level (model thread: in iterations / in decode steps, of the wall time):", "",
                "| mode | clients | rows per call | busy | stepping | prefill | steps/s | iterations/s | steps per "
                "iteration | hop ms per iteration | events per request p50 | event queue lag p50 ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in gens:
            g, t = r["generator"], r.get("timeline") or {}
            out.append(f"| {r['mode']} | {r['clients']} | {f(g['mean_rows_per_call'])} | {f(g['busy_fraction'] * 100, '{:.0f}%')} "
                       f"| {f(g['stepping_fraction'] * 100, '{:.0f}%')} | {f(g['prefill_fraction'] * 100, '{:.0f}%')} "
                       f"| {f(g['steps_per_s'])} | {f(g['iterations_per_s'])} | {f(g['steps_per_iteration'], '{:.2f}')} "
                       f"| {f(g['hop_ms_per_iteration'], '{:.2f}')} | {f(t.get('events_p50'), '{:.0f}')} "
                       f"| {f(t.get('event_lag_ms_p50'), '{:.2f}')} |")
        out.append("")
    if out:
        out.append("Stages (bench/serve_timeline.py): http = client latency - ingress time (client, HTTP, proxy); "
                   "body = reading the request body; asgi = the rest before the handler (middleware, validation); "
                   "ingress = the handler before the Generator call; ray = the Ray hops (ingress time - Generator "
                   "time); the rest inside the Generator. Durations only, each within one process's clock.")
    return "\n".join(out)
