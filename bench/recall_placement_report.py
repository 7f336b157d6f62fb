"""The table of a ``bench/recall_placement.py`` result: key/value recall with the facts in the bank
or in the questions' own segment, for each ``self_read`` arm and seed."""

from __future__ import annotations

from common import fmt_count, md_table

TITLE = "Recall by where the facts sit, memory self-read off and on (`bench/recall_placement.py`)"
WHAT = ("A tiny DNC trained on CPU with `self_read` off and on, on the same batches: exact match of "
        "held-out key/value questions whose pairs sit three segments back (read from the bank) or in "
        "the questions' own segment (read by local attention, or by the memory read with self_read).")


def render(res: dict) -> str:
    """The body of a recall_placement result's entry in ``bench/README.md``."""
    rows = [[("on" if r["self_read"] else "off"), str(r["seed"]),
             fmt_count(r["far"]["correct"], r["far"]["n"]), fmt_count(r["near"]["correct"], r["near"]["n"]),
             f"{r['train_s']:.0f}"] for r in res.get("runs", [])]
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
             f"tiny, segment_len {res.get('segment_len')}, {res.get('steps')} steps of {res.get('batch')} samples, "
             f"{res.get('near', 0):.0%} of them with the pairs in the questions' segment; chance "
             f"{res.get('chance', 0.1):.0%}", ""]
    lines += md_table(["self_read", "seed", "pairs in the bank (3 segments back)", "pairs in the questions' segment",
                       "train s"], rows, "lrrrr")
    return "\n".join(lines + [""])
