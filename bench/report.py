"""Builds ``bench/README.md`` from every ``bench/results/*.json``.

    python bench/report.py                                   # bench/results -> bench/README.md
    python bench/report.py --results /tmp/res --readme /tmp/res/README.md

Each benchmark owns its presentation: the module :data:`BENCHMARKS` names for it has ``TITLE``,
``WHAT`` (what it measures), ``render(result) -> str`` (markdown: where it ran, its tables and
targets) and, where it draws any, ``plots(result, folder, stem) -> [(caption, png path)]``. This
file only finds the results, groups them by benchmark, calls those functions and assembles the
README: per result its file name, the command stored in it (``command``; ``command_source`` says
where an older result's command came from), the rendered body and the plots.

The README shows each benchmark's latest results in full (:func:`latest`: the newest result's
session, else its batch: those within an hour of it) and every older one on one line: its device,
its command and links to its JSON (and the ``.md`` its script wrote, where there is one).
``--full`` renders every result in full (default: into a temporary folder, not bench/README.md).

Regenerating from the same JSON files gives the same README and the same PNGs (no timestamps;
PNG metadata is stripped; stale PNGs in the plot folder are removed).
"""

from __future__ import annotations

import argparse
import calendar
import importlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # the project (dnc) and bench/ (the renderers)
    if _p not in sys.path:
        sys.path.insert(0, _p)
# Re-exported for the scripts (and their tests) that still import them from here: serve_load.py
# (and tests/test_serve_load.py), model_speed.py, train_loop_gap.py; they belong to bench/common.py.
from common import HelpFormatter, git_commit, parse_pairs  # noqa: E402,F401

BENCHMARKS: dict[str, str] = {
    # benchmark (a result's "benchmark" field, else its file name's prefix) -> the module that
    # renders it, in the order of the README's sections
    "model_speed": "model_speed_report",
    "train_scaling": "train_scaling",
    "serve_load": "serve_load_report",
    "long_context": "long_context_report",
    "needle_probe": "needle_probe_report",
    "needle_fate": "needle_fate",
    "heldout_parts": "heldout_parts",
    "recall_placement": "recall_placement_report",
    "eval_speed": "eval_speed",
    "segment_transfer": "segment_transfer",
    "op_counts": "profile_model",
    "train_loop_gap": "train_loop_gap_report",
    "train_loop_gap_compile": "train_loop_gap_compile_report",
    "decode_loop_gap": "decode_loop_gap_report",
    "decode_bytes": "decode_bytes",
    "decode_churn": "decode_churn",
    "admission_prefill": "admission_prefill",
    "durability": "durability_report",
    "abuse": "abuse",
}


def benchmark_of(name: str, res: dict) -> str | None:
    """The benchmark a result belongs to: its ``benchmark`` field, else the prefix of its file name."""
    if res.get("benchmark") in BENCHMARKS:
        return res["benchmark"]
    return next((b for b in BENCHMARKS if name.startswith(b)), None)


def stored_command(res: dict, benchmark: str | None = None) -> str | None:
    """The command a result stored: its ``command`` (or its ``env``'s), else the one its ``argv``
    spells: ``["bench/x.py", ...]`` (some scripts store ``sys.argv``) or the arguments of
    ``bench/<benchmark>.py``."""
    cmd = res.get("command") or (res.get("env") if isinstance(res.get("env"), dict) else {}).get("command")
    argv = res.get("argv")
    if cmd or not isinstance(argv, list):
        return cmd or None
    if argv and str(argv[0]).endswith(".py"):
        return shlex.join(["python", *map(str, argv)])
    if benchmark and (HERE / f"{benchmark}.py").exists():
        return shlex.join(["python", f"bench/{benchmark}.py", *map(str, argv)])
    return None


# the session a result belongs to, from its file name: "_s15_", "-s8-", "_s12b", "_session6"
_SESSION = re.compile(r"(?:^|[_-])(?:s|session)(\d+)(?=[a-z]?(?:[_-]|$))")
BATCH_S = 3600  # results without a session within this many seconds of the newest form its batch


def session_of(name: str) -> int | None:
    """The session number in a result's file name (``serve_load_h200_s15_proxy`` -> 15), else None."""
    m = _SESSION.search(name)
    return int(m.group(1)) if m else None


def started_of(res: dict) -> float | None:
    """When a result was measured (epoch seconds) from its ``started``/``time`` field (or its
    ``env``'s): an ISO time (``2026-12-03T08:44:23[Z]``) or epoch seconds; None when not stored."""
    env = res.get("env") if isinstance(res.get("env"), dict) else {}
    for v in (res.get("started"), res.get("time"), env.get("started"), env.get("time")):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str) and v:
            try:
                return float(v)
            except ValueError:
                pass
            try:
                return float(calendar.timegm(time.strptime(v.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S")))
            except ValueError:
                continue
    return None


def latest(results: list[tuple[str, dict]]) -> set[str]:
    """The stems of a benchmark's latest results, the ones the README shows in full: order by
    (session in the name, time measured, name); the newest's session when it has one (a session's
    before/after pairs stay together), else its batch (measured within ``BATCH_S`` of it), else it."""
    key = {n: (session_of(n) if session_of(n) is not None else -1, started_of(r) or 0.0, n) for n, r in results}
    newest = max(key.values())
    if newest[0] >= 0:
        return {n for n, k in key.items() if k[0] == newest[0]}
    if newest[1]:
        return {n for n, k in key.items() if k[0] < 0 and k[1] and newest[1] - k[1] <= BATCH_S}
    return {newest[2]}


def renderer(benchmark: str) -> ModuleType:
    """The module that renders ``benchmark`` (imported on first use: only benchmarks with results
    load their dependencies)."""
    return importlib.import_module(BENCHMARKS[benchmark])


def render_result(name: str, res: dict, benchmark: str | None, plots: Path, readme_dir: Path) -> list[str]:
    """The README lines of one result file ``<name>.json``."""
    module = renderer(benchmark) if benchmark else None
    lines = [f"### `{name}.json`", ""]
    if module is None:
        return lines + [f"No benchmark in bench/report.py's BENCHMARKS renders this result (top-level keys: "
                        f"{', '.join(sorted(res))}).", ""]
    cmd = stored_command(res, benchmark)
    if cmd:
        lines += [f"Command ({res.get('command_source', 'stored in the result')}):", "", "```bash", cmd, "```", ""]
    else:
        lines += ["Command: not stored in this result (its script should store its argv with bench/common.py's "
                  "`provenance`; bench/migrate_commands.py fills older results).", ""]
    lines += module.render(res).rstrip("\n").split("\n") + [""]
    if hasattr(module, "plots"):
        for caption, path in module.plots(res, plots, name):
            rel = os.path.relpath(path, readme_dir).replace(os.sep, "/")
            lines += [f"![{caption}]({rel})", ""]
    return lines


def one_line(name: str, res: dict, benchmark: str | None, results_rel: str, results_dir: Path) -> str:
    """An older result's README line: links to its JSON (and its script's ``.md``), where it ran
    (the first line of its render) and its command."""
    links = f"[`{name}.json`]({results_rel}/{name}.json)"
    if (results_dir / f"{name}.md").exists():
        links += f" ([md]({results_rel}/{name}.md))"
    if benchmark is None:
        return f"- {links}: no renderer (top-level keys: {', '.join(sorted(res))})"
    where = renderer(benchmark).render(res).split("\n", 1)[0].removeprefix("Device: ").rstrip(" .")
    cmd = stored_command(res, benchmark)
    return f"- {links}: {where}" + (f"; `{cmd}`" if cmd else "; command not stored")


def load_results(results_dir: Path) -> dict[str | None, list[tuple[str, dict]]]:
    """``{benchmark or None: [(file stem, result)]}`` of every JSON object under ``results_dir``."""
    out: dict[str | None, list[tuple[str, dict]]] = {}
    for f in sorted(results_dir.glob("*.json")):
        try:
            res = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"[report] skipping {f}: not valid JSON ({e})", file=sys.stderr)
            continue
        if isinstance(res, dict):
            out.setdefault(benchmark_of(f.stem, res), []).append((f.stem, res))
    return out


def build(results_dir: Path, readme: Path, plots: Path, full: bool = False) -> str:
    """Render ``results_dir/*.json`` into ``readme`` (and PNGs into ``plots``): each benchmark's
    :func:`latest` results in full, the older ones a line each (every one in full with ``full``);
    returns the text."""
    by_bench = load_results(results_dir)
    old_pngs = set(plots.glob("*.png")) if plots.exists() else set()
    rel_results = os.path.relpath(results_dir, readme.parent).replace(os.sep, "/")
    order = [b for b in BENCHMARKS if b in by_bench]
    modules = {b: renderer(b) for b in order}
    titles = {b: modules[b].TITLE for b in order} | {None: "Other results"}
    if None in by_bench:
        order.append(None)
    lines = ["# Benchmark results", "",
             f"Generated by `python bench/report.py` from `{rel_results}/*.json`; do not edit by hand. "
             "Each section says what the benchmark measures and the command that reproduces it; "
             "every figure comes from the JSON file named in its heading. Each benchmark shows its latest "
             "results in full and older ones one line each (device, command, links to the JSON and its "
             "`.md`); `python bench/report.py --full` renders every result in full.", ""]
    lines += ["Contents: " + ", ".join(f"[{titles[b].split(' (')[0] if b else 'other'}](#{_anchor(titles[b])})"
                                       for b in order), ""]
    for b in order:
        lines += [f"## {titles[b]}", ""]
        if b is not None:
            lines += [modules[b].WHAT, ""]
        shown = {n for n, _ in by_bench[b]} if full else latest(by_bench[b])
        for name, res in by_bench[b]:
            if name in shown:
                lines += render_result(name, res, b, plots, readme.parent)
        older = [one_line(n, r, b, rel_results, results_dir) for n, r in by_bench[b] if n not in shown]
        if older:
            lines += [f"Older results ({len(older)}, one line each; `python bench/report.py --full` renders them "
                      "in full):", ""] + older + [""]
    missing = [b for b in BENCHMARKS if b not in by_bench]
    if missing:
        lines += ["## Not yet measured", ""]
        lines += [f"- {renderer(b).TITLE}: no result in `{rel_results}/` yet." for b in missing] + [""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    new_pngs = set(plots.glob("*.png")) if plots.exists() else set()
    written = {Path(p) for p in re.findall(r"\]\(([^)]+\.png)\)", text)}
    for stale in sorted(old_pngs | new_pngs):
        if Path(os.path.relpath(stale, readme.parent).replace(os.sep, "/")) not in written:
            stale.unlink()  # a plot of a result that no longer exists
    readme.write_text(text, encoding="utf-8")
    return text


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results", default=str(HERE / "results"), help="folder of result JSON files")
    p.add_argument("--readme", default=None, help="README to write (default: bench/README.md, or "
                                                  "<results>/README.md when --results is given)")
    p.add_argument("--plots", default=None, help="PNG folder (default: <results>/plots)")
    p.add_argument("--full", action="store_true",
                   help="every result in full, not only each benchmark's latest (default --readme: "
                        "<tmp>/bwr-dnc-bench-full/README.md, plots beside it)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results} is not a folder of result JSON files", file=sys.stderr)
        return 2
    default_readme = HERE / "README.md" if results.resolve() == (HERE / "results").resolve() else results / "README.md"
    if args.full and not args.readme:  # never over the committed README, nor its plots
        default_readme = Path(tempfile.gettempdir()) / "bwr-dnc-bench-full" / "README.md"
    readme = Path(args.readme) if args.readme else default_readme
    plots = Path(args.plots) if args.plots else (readme.parent / "plots" if args.full else results / "plots")
    readme.parent.mkdir(parents=True, exist_ok=True)
    build(results, readme, plots, full=args.full)
    n_png = len(list(plots.glob("*.png"))) if plots.exists() else 0
    size = sum(f.stat().st_size for f in plots.glob("*.png")) if plots.exists() else 0
    print(f"wrote {readme} ({n_png} plots, {size / 1024:.0f} KiB in {plots})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
