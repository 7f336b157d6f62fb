"""Train the DNC on Ray Train (Train V2 ``TorchTrainer``): curriculum tasks and optional corpus text.

    python -m ray_jobs.train --config configs/train/tiny.yaml [--num-workers N] [--gpu]
        [--strategy ddp|fsdp] [--storage PATH_OR_URI] [--name RUN] [--max-steps N] [--corpus GLOB]
        [--set train.lr=1e-3 ...]

Checkpoints go to ``<storage>/<name>/step_XXXXXXXX`` (Ray Train's run dir), metrics to
``<storage>/<name>/metrics.jsonl``. Rerunning with the same ``--name`` and ``--storage`` resumes
from the newest checkpoint (step, curriculum stage, optimizer, RNG). Workers that die are
restarted from the newest checkpoint up to ``run.max_failures`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from ray_jobs.config import JobConfig, JobConfigError, deep_merge, load_job_config, parse_set


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_jobs.train",
        description="Train BWR-DNC with Ray Train (DDP or FSDP2) on the curriculum (+ optional corpus). "
                    "Rerun with the same --name to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/train/tiny.yaml", help="job YAML (model/train/run sections)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides run.num_workers)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (NCCL)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="data parallelism: DDP or FSDP2 per block")
    p.add_argument("--storage", help="checkpoint/log root: local dir or s3://, gs://... (run.storage)")
    p.add_argument("--name", help="run name; the same name resumes (run.name)")
    p.add_argument("--max-steps", type=int, help="stop after this global step (schedule unchanged)")
    p.add_argument("--corpus", action="append",
                   help="text/Parquet files by path or glob (repeatable, fsspec URIs ok; 'stdlib' = "
                        "Python's standard library source)")
    p.add_argument("--corpus-ratio", type=float, help="fraction of steps on corpus text (train.corpus_ratio; 0.5 when --corpus is given and the config sets none)")
    p.add_argument("--wandb", choices=["auto", "on", "off"], help="W&B on rank 0 (offline unless WANDB_MODE)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.lr=1e-3 --set model.overrides.d_model=64")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    return p


def job_from_args(args: argparse.Namespace) -> JobConfig:
    over: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for flag, key in (("num_workers", "num_workers"), ("strategy", "strategy"), ("storage", "storage"),
                      ("name", "name"), ("wandb", "wandb")):
        if getattr(args, flag) is not None:
            run[key] = getattr(args, flag)
    if args.gpu:
        run["gpu"] = True
    if args.corpus:
        run["corpus"] = [c for item in args.corpus for c in item.split(",") if c]
    if run:
        over["run"] = run
    train: dict[str, Any] = {}
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    if args.corpus_ratio is not None:
        train["corpus_ratio"] = args.corpus_ratio
    if train:
        over["train"] = train
    over = deep_merge(over, parse_set(args.sets))
    job = load_job_config(args.config, over)
    if args.corpus and not job.train.get("corpus_ratio"):
        # a corpus given without a ratio, to a config that names none: half the steps on text
        job.train["corpus_ratio"] = 0.5
    return job


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def _write_json(uri: str, obj: Any) -> None:
    import fsspec

    fs, p = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(json.dumps(obj, indent=1, default=str))


def run_training(job: JobConfig, *, address: str | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the job on Ray Train; returns a summary dict (metrics, checkpoint path,
    run dir). Raises ``ray.train.TrainingFailedError`` when the run fails past ``max_failures``.
    ``callbacks``: Ray Train ``UserCallback``s (``tune.sweep`` passes ``TuneReportCallback``)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_jobs import data as rdata
    from ray_jobs.worker import train_loop_per_worker

    _init_ray(address)
    tcfg = job.train_config
    if tcfg.fail_at_step is not None and not tcfg.fail_marker:
        tcfg = tcfg.replace(fail_marker=f"{job.run_dir}/.fault_injected")
    if tcfg.corpus_ratio > 0 and not job.run.corpus:
        raise JobConfigError("train.corpus_ratio > 0 needs a corpus: pass --corpus GLOB (or run.corpus)")

    datasets = None
    eval_text = None
    if job.run.corpus:
        train_files, held = rdata.expand_corpus(job.run.corpus, job.run.corpus_holdout)
        print(f"[ray_jobs.train] corpus: {len(train_files)} training files, {len(held)} held out for bits/byte")
        datasets = {"train": rdata.build_dataset(train_files, tcfg.max_len, job.run.corpus_text_column)}
        if held and tcfg.corpus_eval_bytes:
            eval_text = rdata.read_bytes(held, tcfg.corpus_eval_bytes, job.run.corpus_text_column)
        if tcfg.corpus_ratio == 0:
            tcfg = tcfg.replace(corpus_ratio=0.5)

    resources = {"CPU": job.run.cpus_per_worker}
    if job.run.gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(), "train": tcfg.to_dict(),
                           "has_corpus": datasets is not None, "eval_text": eval_text},
        scaling_config=ScalingConfig(num_workers=job.run.num_workers, use_gpu=job.run.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run.name, storage_path=job.storage_path,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            callbacks=list(callbacks or []),
            worker_runtime_env={"env_vars": {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
                                             "WANDB_SILENT": "true"}}),
        datasets=datasets,
    )
    _write_json(f"{job.run_dir}/job.json", {"job": job.model_dump(), "train_effective": tcfg.to_dict(),
                                            "argv": sys.argv, "time": time.time()})
    t0 = time.time()
    result = trainer.fit()
    summary = {
        "run_name": job.run.name,
        "run_dir": job.run_dir,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
        "wall_s": time.time() - t0,
        "error": repr(result.error) if getattr(result, "error", None) else None,
    }
    _write_json(f"{job.run_dir}/summary.json", summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    m = summary.get("metrics") or {}
    rows = [("run", summary["run_name"]), ("run dir", summary["run_dir"]),
            ("checkpoint", str(summary["checkpoint"])), ("wall s", f"{summary['wall_s']:.1f}")]
    for k in ("step", "train/loss", "curriculum/stage_index", "eval/acc", "eval/bpb",
              "throughput/tokens_per_s"):
        if k in m:
            v = m[k]
            rows.append((k, f"{v:.4g}" if isinstance(v, float) else str(v)))
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="ray_jobs.train", show_header=False)
        for k, v in rows:
            t.add_row(k, v)
        Console().print(t)
    except ImportError:  # pragma: no cover
        for k, v in rows:
            print(f"{k:>24}  {v}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        job = job_from_args(args)
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps({**job.model_dump(), "train": job.train}, indent=1))
        return 0
    try:
        summary = run_training(job, address=args.address)
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
