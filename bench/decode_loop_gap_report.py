"""The table of a ``bench/decode_loop_gap.py`` result: per batch size, the model's one-token decode
step against a whole ``BatchDecoder.step`` (median ms, their ratio) and the host work per loop step."""

from __future__ import annotations

from common import md_table

TITLE = "The decode loop against the model's own decode step (`bench/decode_loop_gap.py`)"
WHAT = ("The model's one-token ragged decode step (a CUDA-graph replay on CUDA, eager on CPU) against a "
        "whole `BatchDecoder.step` on the same batch (sampling, stop checks, the step, segment commits), "
        "interleaved so that load changes hit both; with the host reads, `.item()` calls, tensors built "
        "from Python lists, CUDA syncs and aten ops of each per step.")

COLUMNS = ["rows", "step ms", "loop ms", "loop/step", "loop-step ms", "host reads", "aten items", "tensor builds",
           "CUDA syncs", "loop aten ops", "step aten ops", "commits"]


def _num(d: dict, k: str, spec: str = "{:.1f}") -> str:
    return "-" if d.get(k) is None else spec.format(d[k])


def table(batches: list[dict]) -> list[str]:
    """Markdown lines: one row per batch size of ``batches`` (the result's ``batches`` list)."""
    rows = []
    for r in batches:
        lc, sc = r.get("loop_counts") or {}, r.get("step_counts") or {}
        rows.append([str(r["rows"]), f"{r['step_ms_median']:.3f}", f"{r['loop_ms_median']:.3f}",
                     f"{r['loop_over_step']:.2f}", f"{r['host_ms_median']:.3f}", _num(lc, "host_reads"),
                     _num(lc, "aten_items"), _num(lc, "tensor_builds"), _num(lc, "cuda_syncs"),
                     _num(lc, "aten_ops", "{:.0f}"), _num(sc, "aten_ops", "{:.0f}"), str(r["commits_in_loop"])])
    return md_table(COLUMNS, rows)


def render(res: dict) -> str:
    """The body of a decode_loop_gap result's entry in ``bench/README.md``."""
    steps = (res.get("batches") or [{}])[0].get("steps")
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
             f"preset {res.get('preset')}, {res.get('dtype')}, CUDA graphs {res.get('graphs')}, "
             f"{res.get('sampling')} sampling, {res.get('context')}-token prompts, median of {steps} steps", ""]
    return "\n".join(lines + table(res.get("batches", [])) + [""])
