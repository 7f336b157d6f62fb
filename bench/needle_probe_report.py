"""The table of a ``bench/needle_probe.py`` result: passkey exact match by needle depth, how many
needles sat in the question's own segment, the needle-question distance and the first wrong
answers."""

from __future__ import annotations

from common import fmt_count, fmt_len, fmt_num, md_table

TITLE = "Where a passkey is lost (`bench/needle_probe.py`)"
WHAT = ("Greedy passkey answers of one trained DNC by needle depth: whether the needle sat in the "
        "question's own segment (read by local attention) or in an earlier one (read from the memory "
        "bank), the distance from needle to question, and the answers it gave when wrong.")


def render(res: dict) -> str:
    """The body of a needle_probe result's entry in ``bench/README.md`` (``bench/needle_probe_importance.py``
    results, ``kind`` "importance", render their own table)."""
    if res.get("kind") == "importance":
        from needle_probe_importance import render as render_importance  # imports torch: only for those results
        return render_importance(res)
    readers = next((list(r["correct_by_reader"]) for r in res.get("rows", []) if r.get("correct_by_reader")), [])
    rows = []
    for r in res.get("rows", []):
        wrong = "; ".join(f"{w['truth']} -> {w['got']!r}{' (in segment)' if w.get('in_segment') else ''}"
                          for w in r.get("wrong", [])).replace("|", "\\|")  # a decoded answer may hold a pipe
        rows.append([f"{r['depth']:g}", fmt_len(r.get("length")), fmt_count(r.get("correct"), r.get("n")),
                     f"{r.get('in_segment')}/{r.get('n')}", fmt_num(r.get("median_distance")), wrong or "—"]
                    + [fmt_count(r.get("correct_by_reader", {}).get(k), r.get("n")) for k in readers])
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
             f"segment_len {res.get('segment_len')}", ""]
    lines += md_table(["depth", "length", "exact match", "needle in the question's segment", "median distance",
                       "first wrong answers"] + [f"reader {k}" for k in readers], rows, "lrrrrl" + "r" * len(readers))
    return "\n".join(lines + [""])
