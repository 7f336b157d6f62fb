"""The table of a ``bench/train_loop_gap.py`` result: tokens/s of the training step alone, with
the host-to-device copy, and inside the curriculum loop."""

from __future__ import annotations

from common import fmt_num, md_table

TITLE = "The curriculum loop against the model's own training step (`bench/train_loop_gap.py`)"
WHAT = ("Tokens/s of train_step on batches already on the device, with the host-to-device copy, and "
        "inside the loop that generates each batch and feeds the per-task losses back to the "
        "curriculum, over the same batch sequence (the loop's own shapes).")


def render(res: dict) -> str:
    """The body of a train_loop_gap result's entry in ``bench/README.md``."""
    rows = [[mode, fmt_num(v["tokens_per_s"]), f"{v['median_step_s'] * 1e3:.1f}", fmt_num(v["tokens"])]
            for mode, v in res["results"].items()]
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}", ""]
    lines += md_table(["mode", "tokens/s", "median step ms", "tokens timed"], rows, "lrrr")
    lines += ["", f"loop / step = {res['loop_over_step']:.3f} ({sum(res['corpus_batches'])} of "
                  f"{len(res['corpus_batches'])} batches from the corpus)", ""]
    return "\n".join(lines)
