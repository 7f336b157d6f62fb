"""Where the curriculum loop loses time: the model's own training step against the loop, at the
loop's own batch shapes (issue 11: "the curriculum loop's tokens/s vs the model's own training step
at the same shapes, >= 0.9x").

For every curriculum stage (``--stages``: all by default; each stage's own batch shapes), three
timings over the same sequence of batches (the loop's mix of curriculum and corpus batches, drawn
once with the training config's seeds):
  step    ``train_step`` on batches generated beforehand and already on the device: the model alone;
  step+h2d  the same batches moved from host memory each step (what the loop must pay at least);
  loop    generate each batch when it is needed, move it, ``train_step``, feed the per-task losses
          back to the curriculum (what ``Trainer.run`` does per step, minus logging/checkpoints;
          the feedback moves the task mix, so its batches, and tokens counted, can differ).
Evaluation, checkpoints and logging are not here: ``TrainConfig.time_accounting`` splits a real
run's time (``bench/long_context.py`` turns it on). A stage starts as ``curriculum_start`` would
begin it; ``--count-syncs`` (CUDA) counts the host syncs of one ``train_step`` per stage.

    python bench/train_loop_gap.py --config configs/train/small.yaml --model-set segment_len=512 --steps 40
    python bench/train_loop_gap.py ... --compile segment    # the compiled segment step (train.compile)
    python bench/train_loop_gap.py ... --compile segment --compile-batch static   # a graph per batch size
    python bench/train_loop_gap.py ... --compile graphs     # CUDA graphs, gated by graphs_min_segments
    python bench/train_loop_gap.py ... --set curriculum_dir=configs/ablations/time_boxed_stdlib --stages local,expert

Writes ``bench/results/train_loop_gap_<tag>.json`` (argv, device, torch, commit) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from report import git_commit, parse_pairs  # noqa: E402

from dnc.model import DNC  # noqa: E402
from dnc.parallel import compile_blocks, compile_segments, graph_segments  # noqa: E402
from dnc.training import TaskSource, TrainConfig, build_optimizer, corpus_windows, model_config_for, train_step  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common import HelpFormatter  # bench/common.py (on sys.path above)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/train/small.yaml", help="training YAML (its model and train sections)")
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DNCConfig field, e.g. segment_len=512 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (repeatable)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode per stage; default 40")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (per mode per stage); default 5")
    p.add_argument("--stages", default="all",
                   help="comma-separated curriculum stage names to measure, or 'all' (default)")
    p.add_argument("--corpus-ratio", type=float, default=0.25, help="share of corpus batches (as the run); default 0.25")
    p.add_argument("--compile", choices=("off", "blocks", "segment", "graphs"), default=None,
                   help="torch.compile nothing, each block, or the whole training segment step, or "
                        "the segment step as CUDA graphs (TrainConfig.compile; default: the config's; "
                        "graphs only for sequences of >= graphs_min_segments segments: --set "
                        "graphs_min_segments=0 forces them everywhere)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (TrainConfig.compile_mode)")
    p.add_argument("--compile-batch", choices=("dynamic", "static"), default=None,
                   help="--compile segment: one graph for every batch size, or one per size "
                        "(TrainConfig.compile_dynamic_batch; default: the config's)")
    p.add_argument("--count-syncs", action="store_true",
                   help="CUDA only: after the timings, run one more train_step per stage under "
                        "torch.cuda.set_sync_debug_mode('warn') and record how many host syncs it made "
                        "and where (the loop needs one: the per-sample losses for the curriculum)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--tag", default=None, help="result name suffix (default: gpu or cpu name)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON")
    return p


def stdlib_corpus() -> list[bytes]:
    from dnc.data.corpus import stdlib_source_files

    return [Path(f).read_bytes() for f in stdlib_source_files("train")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn) -> dict:
    """Host syncs ``fn()`` makes on CUDA (``torch.cuda.set_sync_debug_mode``): their number and the
    innermost project frame of each (file:line, counted)."""
    import warnings

    sync(torch.device("cuda"))
    where: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # a warning raised from C++ carries the Python frame that called the syncing op
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"count": sum(where.values()), "where": dict(sorted(where.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raw = yaml.safe_load((ROOT / args.config).read_text() if not Path(args.config).is_absolute()
                         else Path(args.config).read_text())
    section = dict(raw.get("train") or {})
    section["corpus_ratio"] = args.corpus_ratio
    section.update(parse_pairs("--set", args.overrides))
    if args.compile is not None:
        section["compile"] = False if args.compile == "off" else args.compile
    if args.compile_mode is not None:
        section["compile_mode"] = args.compile_mode
    if args.compile_batch is not None:
        section["compile_dynamic_batch"] = args.compile_batch == "dynamic"
    cfg = TrainConfig.from_dict(section)
    overrides = dict((raw.get("model") or {}).get("overrides") or {})
    overrides.update(parse_pairs("--model-set", args.model_overrides))
    mcfg = model_config_for(cfg, (raw.get("model") or {}).get("preset", "small"), **overrides)
    torch.manual_seed(cfg.seed)
    model = DNC(mcfg).to(device)
    if cfg.compile_target == "blocks":
        compile_blocks(model)
    elif cfg.compile_target == "segment":
        compile_segments(model, mode=cfg.compile_mode, dynamic_batch=cfg.compile_dynamic_batch)
    elif cfg.compile_target == "graphs":
        graph_segments(model)
        model.step_runner.min_segments = cfg.graphs_min_segments  # as the Trainer sets it
    opt = build_optimizer(model, cfg)
    bf16 = cfg.bf16 and device.type == "cuda"
    seg_len = min(64, mcfg.segment_len)

    def task_source(stage: str) -> TaskSource:
        src = TaskSource(cfg, 0, seg_len, mcfg.segment_len)
        src.enter_stage(stage)  # as a run with curriculum_start=<stage> begins
        return src

    all_names = TaskSource(cfg, 0, seg_len, mcfg.segment_len).stage_names
    names = all_names if args.stages == "all" else [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {unknown}; this curriculum has {all_names}")
    corpus_texts = stdlib_corpus() if args.corpus_ratio > 0 else None
    n_total = args.warmup + args.steps

    def measure(stage: str) -> dict:
        source = task_source(stage)
        corpus = corpus_windows(corpus_texts, cfg.max_len, cfg.batch_size, seed=cfg.seed) if corpus_texts else None
        mix = np.random.default_rng([cfg.seed, 10_000])
        plan = [bool(corpus is not None and mix.random() < cfg.corpus_ratio) for _ in range(n_total)]
        pre = [(next(corpus), None) if c else source.next_batch() for c in plan]
        shapes = [tuple(b["tokens"].shape) for b, _ in pre]

        def timed(mode: str) -> tuple[list[float], int]:
            # the loop's curriculum feedback moves its task mix, so its batches can differ from the
            # pre-drawn ones: tokens are counted from the batches each mode actually trained on
            times, tok = [], 0
            on_device = [({k: v.to(device) for k, v in b.items()}, t) for b, t in pre] if mode == "step" else None
            gen_source = task_source(stage)
            gen_corpus = corpus_windows(corpus_texts, cfg.max_len, cfg.batch_size, seed=cfg.seed) \
                if (mode == "loop" and corpus_texts) else None
            for i in range(n_total):
                sync(device)
                t0 = time.perf_counter()
                if mode == "step":
                    batch, tasks = on_device[i]
                elif mode == "step+h2d":
                    batch, tasks = pre[i]
                else:
                    batch, tasks = (next(gen_corpus), None) if plan[i] else gen_source.next_batch()
                m = train_step(model, batch, opt, clip=cfg.grad_clip, bf16=bf16, device=device)
                if mode == "loop" and tasks is not None:
                    gen_source.record(tasks, m["sample_losses"].tolist(), i)
                sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    tok += int(batch["tokens"].numel())
            return times, tok

        results = {}
        runner = getattr(model, "step_runner", None)
        paths_before = dict(getattr(runner, "paths", {}))
        for mode in ("step", "step+h2d", "loop"):
            t, tok = timed(mode)
            results[mode] = {"seconds": sum(t), "median_step_s": statistics.median(t), "tokens": tok,
                             "tokens_per_s": tok / sum(t)}
            print(f"{stage:16s} {mode:9s} {tok / sum(t) / 1e3:9.1f}k tokens/s  median step "
                  f"{statistics.median(t) * 1e3:7.1f} ms", flush=True)
        ratio = results["loop"]["tokens_per_s"] / results["step"]["tokens_per_s"]
        timed_shapes = sorted({s for s in shapes[args.warmup:]})
        print(f"{stage:16s} loop / step = {ratio:.3f} over {args.steps} steps, shapes {timed_shapes} "
              f"({sum(plan[args.warmup:])} corpus batches)", flush=True)
        out = {"stage": stage, "shapes": [list(s) for s in shapes], "corpus_batches": plan,
               "segments": sorted({-(-s[1] // mcfg.segment_len) for s in timed_shapes}),
               "results": results, "loop_over_step": ratio}
        if hasattr(runner, "paths"):  # the graphs' length gate: forwards per path in this stage
            out["graph_paths"] = {k: v - paths_before.get(k, 0) for k, v in runner.paths.items()}
        if args.count_syncs and device.type == "cuda":
            out["host_syncs"] = count_syncs(lambda: train_step(model, pre[-1][0], opt, clip=cfg.grad_clip,
                                                               bf16=bf16, device=device))
            print(f"{stage:16s} host syncs in one train_step: {out['host_syncs']['count']}", flush=True)
        return out

    stages = [measure(name) for name in names]
    # over every stage: tokens and seconds summed (each stage timed for the same number of steps)
    results = {}
    for mode in ("step", "step+h2d", "loop"):
        sec = sum(st["results"][mode]["seconds"] for st in stages)
        tok = sum(st["results"][mode]["tokens"] for st in stages)
        results[mode] = {"seconds": sec, "median_step_s": statistics.median(
            [st["results"][mode]["median_step_s"] for st in stages]), "tokens": tok, "tokens_per_s": tok / sec}
    ratio = results["loop"]["tokens_per_s"] / results["step"]["tokens_per_s"]
    print(f"all stages: loop / step = {ratio:.3f} ({len(stages)} stages x {args.steps} steps)")
    tag = args.tag or (torch.cuda.get_device_name(device).split()[-1].lower() if device.type == "cuda" else "cpu")
    out = Path(args.out) / f"train_loop_gap_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "argv": ["bench/train_loop_gap.py", *argv], "commit": git_commit(), "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(), "stages": stages,
        "corpus_batches": [c for st in stages for c in st["corpus_batches"][args.warmup:]],
        "results": results, "loop_over_step": ratio}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
