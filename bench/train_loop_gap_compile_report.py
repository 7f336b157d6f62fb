"""The table of a ``bench/train_loop_gap_compile.py`` result: the real training loop through stage
changes, eager against the compiled segment step with static or dynamic batch shapes, or its CUDA
graphs (``graphs``)."""

from __future__ import annotations

TITLE = "Compiled training segment through curriculum stages (`bench/train_loop_gap_compile.py`)"
WHAT = ("Steps of the Trainer's own loop with every stage cut short, per compile mode: the batch sizes "
        "the stages gave, graphs compiled or captured, seconds spent on them, segments run through them or "
        "eagerly, steady tokens/s against eager and the largest loss difference from eager's at the same step.")


def render(res: dict) -> str:
    """The body of a train_loop_gap_compile result's entry in ``bench/README.md``: where it ran and
    the table the script printed (stored in the result)."""
    where = (f"Device: {res.get('gpu') or res.get('device')}; torch {res.get('torch')}; backend "
             f"{res.get('backend')}; commit {res.get('commit') or 'unknown'}; {res.get('stage_steps')} steps per stage")
    return where + "\n\n" + str(res.get("markdown", "")).strip() + "\n"
