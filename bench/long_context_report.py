"""The long-context record (``bench/long_context.py``) and its report: the result dict a run
fills and writes after every cell (:class:`Run`), the issue-5 targets computed from its cells,
its markdown tables and its plots.

``render(result)`` is the section ``bench/report.py`` puts in ``bench/README.md``;
``markdown(result)`` is the ``.md`` file the run writes next to its JSON. Needs no torch.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence

from common import (command_line, device_name, device_tag, fmt_count, fmt_len, fmt_num, fmt_pct, git_commit, git_dirty,
                    length_axis, md_table, pyplot, save_png, verdict_word, write_json)

TITLE = "Long-context accuracy (`bench/long_context.py`)"
WHAT = ("Trains the DNC with the curriculum (plus Python-stdlib text) and the Transformer baseline "
        "the same way for the same wall-clock budget, then measures greedy exact match: passkey "
        "retrieval over needle depth x context length up to 1M tokens, two-hop relational recall "
        "and key/value retrieval at long contexts, multi-query associative recall (MQAR), and bits "
        "per byte on held-out stdlib source. The baseline runs only where it fits.")

MODELS = ("dnc", "baseline")
MODEL_LABEL = {"dnc": "DNC", "baseline": "baseline"}
RECALL_SUITES = ("relational_2hop", "kv_retrieval")
GENERALISATION_SUITES = ("passkey",) + RECALL_SUITES

TARGETS = {
    "passkey": 0.99,          # exact match at every length up to 1M tokens
    "passkey_max_len": 1 << 20,
    "two_hop": 0.90,          # two-hop relational recall at 16k
    "two_hop_len": 16384,
    "mqar": 0.99,             # per-query exact match (the usual MQAR metric)
    "bpb_ratio": 1.02,        # DNC bits per byte <= 1.02 x baseline
}


# ==============================================================================================
# The record
# ==============================================================================================
class Run:
    """Holds the result dict of one run and writes it: JSON after every cell, markdown + plots
    after every phase, so a run cut short keeps what it measured. ``args`` is the parsed command
    line, ``argv`` its arguments, ``ds`` the settings derived from them."""

    def __init__(self, args, argv: Sequence[str], device, ds: dict[str, Any]):
        import torch  # only a run needs it: rendering a stored result does not

        self.args, self.device, self.ds = args, device, ds
        self.tag = args.tag or f"{args.preset}_{device_tag(device)}"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / f"long_context_{self.tag}.json"
        self.res: dict[str, Any] = {
            "benchmark": "long_context", "format_version": 1, "tag": self.tag,
            "command": command_line("long_context", argv), "argv": list(argv),
            "env": {"device": device_name(device),
                    "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                    "cpus": os.cpu_count(), "commit": git_commit(), "uncommitted": git_dirty()},
            "config": {k: ds[k] for k in ds} | {"preset": args.preset},
            "args": vars(args), "status": "running", "phase": "start",
            "train_config": {}, "models": {}, "notes": [], "cells": [],
        }

    def save(self) -> None:
        self.res["summary"] = {"passkey_by_length": {m: {str(L): v["acc"] for L, v in passkey_by_length(self.res, m).items()}
                                                     for m in self.res["models"]}}
        self.res["targets"] = targets(self.res)
        write_json(self.json_path, self.res)

    def render(self, phase: str) -> None:
        self.res["phase"] = phase
        self.save()
        (self.out / f"long_context_{self.tag}.md").write_text(markdown(self.res))
        plots(self.res, self.out, f"long_context_{self.tag}")

    def add(self, cell: dict[str, Any]) -> None:
        self.res["cells"].append(cell)
        self.save()


# ==============================================================================================
# Cells and targets
# ==============================================================================================
def is_base_cell(c: dict) -> bool:
    """A cell of the suites' original wording with markers (results written before the phrasing
    and marker dimensions existed have only these)."""
    return c.get("phrasing", "template") == "template" and c.get("markers", True) is True


def _cells(res: dict, suite: str, model: str | None = None, *, every_variant: bool = False) -> list[dict]:
    """Cells of ``suite`` (and ``model``); only the original wording with markers unless
    ``every_variant`` (the headline tables, targets and plots are about that one)."""
    return [c for c in res.get("cells", []) if c.get("suite") == suite and (model is None or c.get("model") == model)
            and (every_variant or is_base_cell(c))]


def _subset_line(cells: list[dict[str, Any]], key: str, what: str) -> list[str]:
    """One line, "<what>: right/n (pct); the others: right/n (pct).", for the passkey samples a cell
    counts under ``<key>_n`` / ``<key>_correct``; nothing when no cell has such samples."""
    cells = [c for c in cells if f"{key}_n" in c]
    n = sum(c[f"{key}_n"] for c in cells)
    if not n:
        return []
    right = sum(c[f"{key}_correct"] for c in cells)
    rest_n = sum(c["n"] for c in cells) - n
    rest = sum(c["correct"] for c in cells) - right
    return [f"{what}: {right}/{n} ({fmt_pct(right / n)}); the others: {rest}/{rest_n}"
            + (f" ({fmt_pct(rest / rest_n)})." if rest_n else "."), ""]


def passkey_by_length(res: dict, model: str) -> dict[int, dict[str, Any]]:
    """``{length: {"acc": mean over depths or None, "complete": every depth evaluated}}``."""
    out: dict[int, dict[str, Any]] = {}
    depths = res.get("config", {}).get("depths") or sorted({c["depth"] for c in _cells(res, "passkey")})
    for L in sorted({c["length"] for c in _cells(res, "passkey", model)}):
        cs = [c for c in _cells(res, "passkey", model) if c["length"] == L]
        ok = [c for c in cs if c.get("acc") is not None]
        n = sum(c["n"] for c in ok)
        out[L] = {"acc": sum(c["correct"] for c in ok) / n if n else None,
                  "complete": len(ok) == len(depths) and len(cs) == len(depths)}
    return out


def targets(res: dict) -> list[dict[str, Any]]:
    """The issue-5 targets from the cells: ``[{"target", "measured", "met"}]`` (met None = not measured)."""
    T = TARGETS
    out = []
    pk = passkey_by_length(res, "dnc")
    if pk:
        accs = {L: v["acc"] for L, v in pk.items()}
        failing = [L for L, a in accs.items() if a is not None and a < T["passkey"]]
        reached = max(accs) >= T["passkey_max_len"] and all(v["complete"] for v in pk.values())
        met = False if failing else (True if reached else None)
        lo = min((a for a in accs.values() if a is not None), default=None)
        measured = f"min {fmt_pct(lo)} over {fmt_len(min(accs))}..{fmt_len(max(accs))}"
        if failing:
            measured += f"; below at {', '.join(fmt_len(L) for L in failing)}"
    else:
        met, measured = None, "not run"
    out.append({"target": f"passkey >= {T['passkey']:.0%} at every length up to {fmt_len(T['passkey_max_len'])}",
                "measured": measured, "met": met})

    c = next((c for c in _cells(res, "relational_2hop", "dnc") if c["length"] == T["two_hop_len"]), None)
    a = c.get("acc") if c else None
    out.append({"target": f"two-hop recall >= {T['two_hop']:.0%} at {fmt_len(T['two_hop_len'])}",
                "measured": fmt_pct(a) if a is not None else "not run at this length",
                "met": None if a is None else a >= T["two_hop"]})

    c = next(iter(_cells(res, "mqar", "dnc")), None)
    a = c.get("query_acc") if c else None
    out.append({"target": f"MQAR >= {T['mqar']:.0%} (per-query exact match)",
                "measured": "not run" if a is None
                else f"{fmt_pct(a)} per query, {fmt_pct(c.get('sample_acc'))} all-correct",
                "met": None if a is None else a >= T["mqar"]})

    d = next((c.get("bpb") for c in _cells(res, "bpb", "dnc")), None)
    b = next((c.get("bpb") for c in _cells(res, "bpb", "baseline")), None)
    ratio = d / b if d and b else None
    out.append({"target": f"DNC bits per byte within {T['bpb_ratio'] - 1:.0%} of the baseline",
                "measured": "not measured" if ratio is None else f"{d:.3f} vs {b:.3f} ({ratio:.3f}x)",
                "met": None if ratio is None else ratio <= T["bpb_ratio"]})
    return out


def summary_line(res: dict) -> str:
    env = res.get("env", {})
    dirty = f" (+ uncommitted changes to {len(env['uncommitted'])} files)" if env.get("uncommitted") else ""
    # a given checkpoint brings its own model: --preset (recorded either way) did not choose it
    ckpt = res.get("args", {}).get("checkpoint")
    model = f"checkpoint `{ckpt}`" if ckpt else f"preset `{res.get('config', {}).get('preset', '?')}`"
    return (f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; commit {env.get('commit') or 'unknown'}"
            f"{dirty}; {model}; status: {res.get('status', '?')}")


def tables(res: dict, heading: str = "###") -> list[str]:
    """Markdown for one long_context result (training, passkey, recall, MQAR, bpb, targets)."""
    cfg = res.get("config", {})
    L: list[str] = []
    models = [m for m in MODELS if m in res.get("models", {})]

    # training
    trows, stage_rows = [], []
    for m in models:
        info = res["models"][m]
        t = info.get("training") or {}
        trows.append([MODEL_LABEL[m], fmt_num(info.get("params")), fmt_num(t.get("steps")),
                      fmt_num(t.get("train_minutes"), "{:.1f}"), fmt_num(t.get("wall_minutes"), "{:.1f}"),
                      fmt_num(t.get("tokens_seen")), str(t.get("final_stage", "—")),
                      "given" if info.get("checkpoint_given") else "trained here"])
        for s in t.get("stages", []):
            accs = ", ".join(f"{k} {fmt_pct(v, 0)}" for k, v in sorted(s.get("last_acc", {}).items()))
            stage_rows.append([MODEL_LABEL[m], s["stage"], str(s["evals"]), str(s["last_step"]),
                               fmt_pct(s.get("last_mean")), fmt_pct(s.get("best_mean")), accs or "—"])
    if trows:
        L += [f"{heading} Training", ""]
        L += md_table(["model", "params", "steps", "train min", "wall min", "tokens seen", "final stage", "weights"],
                      trows, "lrrrrrll") + [""]
        if stage_rows:
            L += ["Curriculum evaluations during training (exact match on the stage's own tasks and lengths; "
                  "last and best mean per stage):", ""]
            L += md_table(["model", "stage", "evals", "last step", "last mean", "best mean", "last per task"],
                          stage_rows, "llrrrrl") + [""]
        for m in models:
            split = (res["models"][m].get("training") or {}).get("time_split")
            if not split:
                continue
            parts = [k for k, v in split.items() if isinstance(v, dict) and k != "wall"]
            L += [f"Where {MODEL_LABEL[m]}'s training time went (`train.time_accounting`, "
                  f"{split.get('intervals', '?')} log intervals, {split['wall']['seconds']:.0f} s in all):", ""]
            L += md_table(["part"] + parts, [["seconds"] + [f"{split[k]['seconds']:.1f}" for k in parts],
                                             ["share"] + [fmt_pct(split[k]["share"]) for k in parts]],
                          "l" + "r" * len(parts)) + [""]
        notes = res.get("notes") or []
        L += [f"- {n}" for n in notes] + ([""] if notes else [])

    # passkey
    pcells = _cells(res, "passkey")
    if pcells:
        lengths = sorted({c["length"] for c in pcells})
        depths = sorted({c["depth"] for c in pcells})
        L += [f"{heading} Passkey retrieval", "",
              f"Exact match (greedy) per depth x length, {cfg.get('n', '?')} samples per cell, "
              f"{cfg.get('decoys', 0)} decoys. `—` = not run (baseline above {fmt_len(cfg.get('baseline_max_len'))} "
              f"tokens), `OOM` = out of memory.", ""]
        for m in models:
            rows = []
            for d in depths:
                r = [f"{d:g}"]
                for Ln in lengths:
                    c = next((c for c in pcells if c["model"] == m and c["length"] == Ln and c["depth"] == d), None)
                    r.append("" if c is None else ("OOM" if c.get("status") == "oom" else fmt_pct(c.get("acc"), 0)))
                rows.append(r)
            bl = passkey_by_length(res, m)
            rows.append(["**all**"] + [fmt_pct(bl[Ln]["acc"]) if Ln in bl else "" for Ln in lengths])
            L += [f"{MODEL_LABEL[m]}:", ""]
            L += md_table(["depth"] + [fmt_len(x) for x in lengths], rows) + [""]
            for key, what in (("boundary", "Needles whose digits cross a segment boundary"),
                              ("split_fact", "Needles whose words end in the segment before their digits")):
                L += _subset_line([c for c in pcells if c["model"] == m], key, what)

    # recall
    rcells = [c for s in RECALL_SUITES for c in _cells(res, s)]
    if rcells:
        lengths = sorted({c["length"] for c in rcells})
        rows = []
        for s in RECALL_SUITES:
            for m in models:
                cs = {c["length"]: c for c in _cells(res, s, m)}
                if cs:
                    rows.append([s, MODEL_LABEL[m]] + [
                        ("OOM" if cs[x].get("status") == "oom" else fmt_pct(cs[x].get("acc"))) if x in cs else ""
                        for x in lengths])
        L += [f"{heading} Recall", "",
              f"Exact match, {cfg.get('n_recall', '?')} samples per cell, difficulty {cfg.get('recall_difficulty', '?')} "
              f"(relational: 2 hops).", ""]
        L += md_table(["task", "model"] + [fmt_len(x) for x in lengths], rows, "ll" + "r" * len(lengths)) + [""]

    # mqar
    mcells = _cells(res, "mqar")
    if mcells:
        rows = [[MODEL_LABEL[c["model"]], fmt_len(c["length"]), str(c.get("n_pairs")), str(c.get("n")),
                 "OOM" if c.get("status") == "oom" else fmt_pct(c.get("query_acc")),
                 "OOM" if c.get("status") == "oom" else fmt_pct(c.get("sample_acc"))] for c in mcells]
        L += [f"{heading} MQAR", ""]
        L += md_table(["model", "length", "pairs", "samples", "per-query exact match", "all queries right"], rows,
                      "lrrrrr") + [""]
        note = next((c.get("note") for c in mcells if c.get("note")), None)
        if note:
            L += [f"- {note}", ""]

    # bits per byte
    bcells = _cells(res, "bpb")
    if bcells:
        rows = [[MODEL_LABEL[c["model"]], fmt_len(c.get("context")), fmt_num(c.get("bytes")),
                 "OOM" if c.get("status") == "oom" else fmt_num(c.get("bpb"), "{:.4f}")] for c in bcells]
        L += [f"{heading} Bits per byte (held-out Python stdlib)", ""]
        L += md_table(["model", "context", "bytes", "bits/byte"], rows) + [""]

    L += generalisation_table(res, models, heading)

    # targets
    ts = res.get("targets") or targets(res)
    L += [f"{heading} Targets", ""]
    L += md_table(["target", "measured (DNC)", "verdict"],
                  [[t["target"], t["measured"], verdict_word(t["met"])] for t in ts], "lll") + [""]
    return L




def generalisation_table(res: dict, models: list[str], heading: str = "###") -> list[str]:
    """Every suite by wording (phrasing x markers x filler) and length, with sample counts; empty
    when the run had only the original wording (``--phrasings``/``--markers`` not widened)."""
    cells = [c for s in GENERALISATION_SUITES for c in _cells(res, s, every_variant=True)]
    mq = _cells(res, "mqar", every_variant=True)
    if all(is_base_cell(c) for c in cells + mq):
        return []
    lengths = sorted({c["length"] for c in cells})
    keys = list(dict.fromkeys((c["suite"], c["model"], c.get("phrasing", "template"), c.get("markers", True),
                               c.get("filler", "words")) for c in cells))
    keys = [k for k in keys if k[1] in models]
    rows = []
    for suite, m, ph, mk, fl in keys:
        r = [suite, MODEL_LABEL[m], ph, "on" if mk else "off", fl]
        for Ln in lengths:
            cs = [c for c in cells if (c["suite"], c["model"], c.get("phrasing", "template"), c.get("markers", True),
                                       c.get("filler", "words"), c["length"]) == (suite, m, ph, mk, fl, Ln)]
            ok = [c for c in cs if c.get("acc") is not None]
            if not cs:
                r.append("")
            elif not ok:
                r.append("OOM" if any(c.get("status") == "oom" for c in cs) else "—")
            else:
                r.append(fmt_count(sum(c["correct"] for c in ok), sum(c["n"] for c in ok)))
        rows.append(r)
    L = [f"{heading} Generalisation: held-out phrasings and filler, no markers", "",
         "Exact match per wording: `template` = the generators' original wording (the tables above), `train` = "
         "phrasings and stdlib filler that training draws, `heldout` = phrasings (subjects, fact and question "
         "frames) and stdlib modules that training never sees; markers = the `<needle>`/`<key>`/`<query>` tokens. "
         "Passkey pooled over depths. Correct/samples in brackets; 95% Wilson interval where a cell has fewer than "
         "50 samples.", ""]
    if rows:
        L += md_table(["suite", "model", "phrasing", "markers", "filler"] + [fmt_len(x) for x in lengths], rows,
                      "lllll" + "r" * len(lengths)) + [""]
    mrows = [[MODEL_LABEL[c["model"]], c.get("phrasing", "template"), "on" if c.get("markers", True) else "off",
              c.get("filler", "words"), fmt_len(c["length"]), str(c.get("n_pairs")),
              "OOM" if c.get("acc") is None else fmt_count(c["query_correct"], c["queries"]),
              "OOM" if c.get("acc") is None else fmt_count(c["correct"], c["n"])]
             for c in mq if c["model"] in models]
    if mrows:
        L += ["MQAR by wording (worded pairs are longer, so their samples are too; each query is one trial):", ""]
        L += md_table(["model", "phrasing", "markers", "filler", "length", "pairs", "per query", "all queries right"],
                      mrows, "llllrrrr") + [""]
    return L


def markdown(res: dict) -> str:
    """The ``.md`` file ``bench/long_context.py`` writes next to its JSON."""
    lines = [f"# Long-context accuracy ({res.get('tag', '')})", "", summary_line(res), "",
             "```bash", res.get("command", ""), "```", ""]
    lines += tables(res, "##")
    return "\n".join(lines).rstrip("\n") + "\n"


def plots(res: dict, folder: Path, stem: str) -> list[tuple[str, Path]]:
    """Passkey heatmap (depth x length, one panel per model) and accuracy vs length lines."""
    plt = pyplot()
    if plt is None:
        return []
    import numpy as np

    out = []
    pcells = _cells(res, "passkey")
    models = [m for m in MODELS if _cells(res, "passkey", m)]
    if pcells and models:
        lengths = sorted({c["length"] for c in pcells})
        depths = sorted({c["depth"] for c in pcells})
        w = 1.6 + 0.55 * len(lengths)
        fig, axes = plt.subplots(1, len(models), figsize=(w * len(models) + 0.8, max(2.6, 1.2 + 0.26 * len(depths))),
                                 squeeze=False, layout="constrained")
        cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
        im = None
        for ax, m in zip(axes[0], models):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in _cells(res, "passkey", m):
                if c.get("acc") is not None:
                    grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["acc"]
            im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [fmt_len(x) for x in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("context length (tokens)", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
            ax.set_title(f"passkey: {MODEL_LABEL[m]}", fontsize=9)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    v = grid[i, j]
                    ax.text(j, i, "n/a" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if np.isnan(v) or v >= 0.6 else "white")
        fig.colorbar(im, ax=list(axes[0]), fraction=0.05, pad=0.02, label="exact match")
        out.append(("Passkey accuracy, needle depth x context length (grey = not run)",
                    save_png(fig, folder / f"{stem}_passkey.png")))

    # accuracy vs length
    series = []
    for m in MODELS:
        pk = passkey_by_length(res, m)
        xs = [L for L, v in pk.items() if v["acc"] is not None]
        if xs:
            series.append(("passkey", m, xs, [pk[L]["acc"] for L in xs]))
        for s in RECALL_SUITES:
            cs = sorted((c["length"], c["acc"]) for c in _cells(res, s, m) if c.get("acc") is not None)
            if cs:
                series.append((s, m, [c[0] for c in cs], [c[1] for c in cs]))
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 3.2), layout="constrained")
        colors = {"passkey": "C0", "relational_2hop": "C1", "kv_retrieval": "C2"}
        for s, m, xs, ys in series:
            ax.plot(xs, ys, "-" if m == "dnc" else "--", marker="o", ms=3, color=colors[s], label=f"{s} {MODEL_LABEL[m]}")
        length_axis(ax, [x for s in series for x in s[2]])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("exact match")
        ax.set_title("accuracy vs context length (DNC solid, baseline dashed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=3, loc="center left", bbox_to_anchor=(1.01, 0.5))
        out.append(("Accuracy vs context length", save_png(fig, folder / f"{stem}_accuracy.png")))
    return out




def render(res: dict) -> str:
    """The body of a long-context result's entry in ``bench/README.md`` (under its ``### <file>``
    heading): where it ran, then every table and the targets."""
    return "\n".join([summary_line(res), ""] + tables(res, "####"))
