"""Recompiles of the compiled training segment step (``train.compile: segment``), or captures of its
CUDA graphs (``train.compile: graphs``), through curriculum stage changes, and what they cost: the
real :class:`dnc.training.Trainer` loop (curriculum batches, corpus batches, evaluation and
promotion) with every stage cut to ``--stage-steps`` steps, so a short run crosses every stage
change the full run makes (the batch size changes per stage: small, 512-token
segments, 65,536 batch tokens: 128, 32, 16, 8, 8, 8 rows; corpus batches 8 x 8k).

Modes, each from the same seed, in one process (``torch._dynamo.reset()`` between them):
  off      eager (the reference for tokens/s);
  static   one graph per batch size (``train.compile_dynamic_batch: false``, sessions 8-14);
  dynamic  the batch dim marked dynamic: one graph for every batch size >= 2 (the default);
  graphs   CUDA graphs of the same step, no torch.compile (``train.compile: graphs``): one pair of
           graphs (forward, recomputing backward) per batch size, captured rather than compiled
           (on a CPU: the same recompute with plain calls, for a smoke run).

Per mode: graphs compiled (or captured) and at which step/batch, their seconds, steps, the
steady tokens/s (steps that compiled nothing, evaluation time excluded) and the loss of every step.

    python bench/train_loop_gap_compile.py --config configs/train/small.yaml \\
        --set curriculum_dir=configs/ablations/time_boxed_stdlib --stage-steps 20          # GPU
    python bench/train_loop_gap_compile.py --config configs/train/small.yaml --preset tiny \\
        --set batch_tokens=1024 --set max_len=1024 --backend aot_eager --stage-steps 3      # CPU
    python bench/train_loop_gap_compile.py --config configs/train/small.yaml \\
        --set curriculum_dir=configs/ablations/time_boxed_stdlib --stage-steps 20 --modes off,graphs  # GPU

Writes ``bench/results/train_loop_gap_compile_<tag>.json`` (provenance of bench/common.py) and
prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from common import HelpFormatter, device_tag, md_table, parse_pairs, provenance, write_json  # noqa: E402

from dnc.parallel import compile_segments, graph_segments  # noqa: E402
from dnc.training import TrainConfig, Trainer, corpus_windows, model_config_for  # noqa: E402
from dnc.training.config import resolve_path  # noqa: E402

MODES = ("off", "static", "dynamic", "graphs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/train/small.yaml", help="training YAML (its model and train sections)")
    p.add_argument("--preset", default=None, help="model preset instead of the config's, without the config's model overrides (e.g. tiny on CPU)")
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. curriculum_dir=... (repeatable)")
    p.add_argument("--stage-steps", type=int, default=20,
                   help="steps per curriculum stage (every stage's min/max_steps and the eval interval); default 20")
    p.add_argument("--stages", type=int, default=None, help="stages to run through (default: all)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}; default all")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager on a CPU without time "
                                                         "for C++ builds); default inductor")
    p.add_argument("--corpus-ratio", type=float, default=0.25, help="share of corpus batches (as the run); default 0.25")
    p.add_argument("--eval-samples", type=int, default=4, help="eval samples per task at each promotion; default 4")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--tag", default=None, help="result name suffix (default: the device)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON")
    return p


def cut_curriculum(src: str, steps: int, dest: Path) -> int:
    """Copy the stage YAMLs of ``src`` to ``dest`` with ``min_steps``/``max_steps`` = ``steps``, so
    every stage promotes at its first evaluation. Returns the number of stages."""
    files = sorted(Path(resolve_path(src)).glob("*.yaml"))
    for f in files:
        raw = yaml.safe_load(f.read_text()) or {}
        raw["min_steps"], raw["max_steps"] = min(int(raw.get("min_steps", 0)), steps), steps
        (dest / f.name).write_text(yaml.safe_dump(raw))
    return len(files)


def run_mode(mode: str, cfg: TrainConfig, mcfg, args, device: torch.device, corpus: list[bytes]) -> dict[str, Any]:
    """One training run of ``cfg.max_steps`` steps in ``mode``; per-step records and the runner's graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    trainer = Trainer(cfg, mcfg, run_name=f"compile-{mode}", device=device, progress=False,
                      corpus_batches=corpus_windows(corpus, cfg.max_len, cfg.batch_size, seed=cfg.seed)
                      if cfg.corpus_ratio > 0 else None)
    if mode == "graphs":  # as Trainer does for train.compile: graphs
        graph_segments(trainer.model)
    elif mode != "off":  # as Trainer does for train.compile: segment, with this script's backend
        compile_segments(trainer.model, backend=args.backend, mode=cfg.compile_mode, dynamic_batch=mode == "dynamic")
    runner = trainer.model.step_runner if mode != "off" else None
    shapes: list[tuple[int, int]] = []
    draw = trainer._next_batch

    def recorded():
        b, tasks = draw()
        shapes.append(tuple(b["tokens"].shape))
        return b, tasks

    trainer._next_batch = recorded  # the trainer's own batches, with their shapes noted
    steps: list[dict[str, Any]] = []
    clock = [time.perf_counter()]

    def report(step: int, metrics: dict[str, float], _ckpt) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        graphs = len(runner.graphs) if runner is not None else 0
        steps.append({"step": step, "shape": list(shapes[-1]), "seconds": now - clock[0],
                      "eval_s": float(metrics.get("eval/seconds", 0.0)), "loss": metrics.get("train/loss"),
                      "stage": int(metrics.get("curriculum/stage_index", -1)), "graphs": graphs})
        clock[0] = now

    trainer.run(report)
    prev = 0
    for s in steps:  # a step compiled when the graph count rose during it
        s["compiled"], prev = s["graphs"] > prev, s["graphs"]
    steady = [s for s in steps[1:] if not s["compiled"]]  # the first step also pays one-off setup
    tok = sum(s["shape"][0] * s["shape"][1] for s in steady)
    sec = sum(s["seconds"] - s["eval_s"] for s in steady)
    return {"mode": mode, "steps": steps, "graphs": list(runner.graphs) if runner is not None else [],
            "compile_s": sum(g["seconds"] for g in runner.graphs) if runner is not None else 0.0,
            "compiled_segments": runner.compiled_steps if runner is not None else 0,
            "eager_segments": runner.eager_steps if runner is not None else 0,
            "batch_sizes": sorted({s["shape"][0] for s in steps}), "stages": sorted({s["stage"] for s in steps}),
            "steady_steps": len(steady), "steady_tokens_per_s": tok / sec if sec > 0 else None,
            "wall_s": sum(s["seconds"] for s in steps)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes takes {', '.join(MODES)}; got {', '.join(bad)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    raw = yaml.safe_load(cfg_path.read_text())
    section = dict(raw.get("train") or {})
    section.update({"corpus_ratio": args.corpus_ratio, "eval_samples": args.eval_samples, "compile": False,
                    "log_interval": 1, "checkpoint_interval": 10**9, "corpus_eval_bytes": 0})
    section.update(parse_pairs("--set", args.overrides))
    work = Path(tempfile.mkdtemp(prefix="dnc-compile-curriculum-"))
    n_stages = cut_curriculum(section.get("curriculum_dir") or "configs/ablations/local_first", args.stage_steps, work)
    n_stages = min(n_stages, args.stages or n_stages)
    section.update({"curriculum_dir": str(work), "eval_interval": args.stage_steps,
                    "max_steps": n_stages * args.stage_steps})
    cfg = TrainConfig.from_dict(section)
    model_raw = raw.get("model") or {}
    overrides = {} if args.preset else dict(model_raw.get("overrides") or {})  # the config's fit its preset
    overrides.update(parse_pairs("--model-set", args.model_overrides))
    mcfg = model_config_for(cfg, args.preset or model_raw.get("preset", "small"), **overrides)
    from dnc.data.corpus import stdlib_source_files

    corpus = [Path(f).read_bytes() for f in stdlib_source_files("train")] if cfg.corpus_ratio > 0 else []
    result: dict[str, Any] = {**provenance("train_loop_gap_compile", argv, device, script="train_loop_gap_compile"),
                              "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
                              "stage_steps": args.stage_steps, "backend": args.backend, "modes": {}}
    for mode in modes:
        print(f"[train_loop_gap_compile] {mode}: {cfg.max_steps} steps over {n_stages} stages", file=sys.stderr, flush=True)
        result["modes"][mode] = run_mode(mode, cfg, mcfg, args, device, corpus)
    rows = []
    base = result["modes"].get("off", {}).get("steady_tokens_per_s")
    off_losses = [s["loss"] for s in result["modes"].get("off", {}).get("steps", [])]
    for mode, r in result["modes"].items():
        tps = r["steady_tokens_per_s"]
        # the same seed and batches: a mode that computes the same maths tracks eager's losses
        diffs = [abs(s["loss"] - o) for s, o in zip(r["steps"], off_losses) if s["loss"] is not None and o is not None]
        r["max_loss_diff_vs_off"] = max(diffs) if diffs else None
        rows.append([mode, str(len(r["steps"])), ",".join(map(str, r["batch_sizes"])), str(len(r["graphs"])),
                     f"{r['compile_s']:.1f}", f"{r['compiled_segments']}/{r['eager_segments']}",
                     f"{tps / 1e3:.1f}k" if tps else "-", f"{tps / base:.2f}x" if (tps and base) else "-",
                     "-" if r["max_loss_diff_vs_off"] is None else f"{r['max_loss_diff_vs_off']:.2g}",
                     f"{r['wall_s']:.1f}"])
    table = md_table(["mode", "steps", "batch sizes", "graphs", "compile/capture s", "segments graphed/eager",
                      "steady tokens/s", "vs off", "max loss diff vs off", "wall s"], rows)
    result["markdown"] = "\n".join(table)
    print("\n".join(table))
    for mode, r in result["modes"].items():
        for g in r["graphs"]:
            print(f"  {mode}: graph {g['key']} batch {g['batch']} at segment {g['at_step']}: {g['seconds']:.1f} s")
    tag = args.tag or device_tag(device)
    out = write_json(Path(args.out) / f"train_loop_gap_compile_{tag}.json", result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
