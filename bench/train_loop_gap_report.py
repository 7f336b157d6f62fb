"""The tables of a ``bench/train_loop_gap.py`` result: tokens/s of the training step alone, with
the host-to-device copy, and inside the curriculum loop, over all stages and per stage."""

from __future__ import annotations

from common import fmt_num, md_table

TITLE = "The curriculum loop against the model's own training step (`bench/train_loop_gap.py`)"
WHAT = ("Tokens/s of train_step on batches already on the device, with the host-to-device copy, and "
        "inside the loop that generates each batch and feeds the per-task losses back to the "
        "curriculum, over the same batch sequence (the loop's own shapes), per curriculum stage.")


def render(res: dict) -> str:
    """The body of a train_loop_gap result's entry in ``bench/README.md`` (results from before the
    per-stage measurement have no ``stages`` and show the first table only)."""
    rows = [[mode, fmt_num(v["tokens_per_s"]), f"{v['median_step_s'] * 1e3:.1f}", fmt_num(v["tokens"])]
            for mode, v in res["results"].items()]
    compile_ = (res.get("train_config") or {}).get("compile", False)
    lines = [f"Device: {res.get('device')}; torch {res.get('torch')}; commit {res.get('commit') or 'unknown'}; "
             f"train.compile: {compile_}", ""]
    stages = res.get("stages") or []
    if stages:
        lines += [f"All {len(stages)} stages together:", ""]
    lines += md_table(["mode", "tokens/s", "median step ms", "tokens timed"], rows, "lrrr")
    lines += ["", f"loop / step = {res['loop_over_step']:.3f} ({sum(res['corpus_batches'])} of "
                  f"{len(res['corpus_batches'])} timed batches from the corpus)", ""]
    if stages:
        srows = []
        for st in stages:
            r = st["results"]
            shapes = sorted({tuple(s) for s in st["shapes"]})
            paths = st.get("graph_paths")
            srows.append([st["stage"], ", ".join(f"{b}x{t}" for b, t in shapes),
                          ", ".join(str(n) for n in st.get("segments", [])),
                          fmt_num(r["step"]["tokens_per_s"]), fmt_num(r["step+h2d"]["tokens_per_s"]),
                          fmt_num(r["loop"]["tokens_per_s"]), f"{st['loop_over_step']:.3f}",
                          "—" if paths is None else f"{paths.get('graphs', 0)} / {paths.get('eager', 0)}"])
        lines += ["Per stage (B x T shapes drawn; segments per sequence; graph paths = forwards through the "
                  "graphs / the eager step under `graphs_min_segments`):", ""]
        lines += md_table(["stage", "shapes", "segments", "step tok/s", "step+h2d tok/s", "loop tok/s",
                           "loop / step", "graph paths"], srows, "lllrrrrl")
        lines += [""]
    return "\n".join(lines)
