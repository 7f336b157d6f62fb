"""The per-worker training loop Ray Train runs in each worker process.

It applies the parallelism (DDP through ``ray.train.torch.prepare_model``, or FSDP2
``fully_shard`` per block), restores from ``ray.train.get_checkpoint()`` (a restarted worker
group or a rerun with the same run name), and runs :class:`dnc.training.Trainer` with a report
callback that calls ``ray.train.report`` on every rank at the same steps (it is a barrier).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn


def parallelize_fn(strategy: str, device: torch.device, world_size: int, find_unused: bool = False,
                   grad_reduce: str = "fp32"):
    """``model -> model`` applying DDP (via Ray) or FSDP2 to a model already on ``device``;
    ``grad_reduce="bf16"`` all-reduces gradients in bf16 (NCCL; FSDP also gathers bf16 params)."""
    bf16 = grad_reduce == "bf16" and device.type == "cuda"
    if strategy == "fsdp":
        def fsdp(model: nn.Module) -> nn.Module:
            from dnc.parallel import apply_fsdp

            return apply_fsdp(model, mp_bf16=bf16, reduce_bf16=bf16) if world_size > 1 else model
        return fsdp

    def apply_ddp(model: nn.Module) -> nn.Module:
        import ray.train.torch

        from dnc.parallel import reduce_grads_in_bf16

        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})
        return reduce_grads_in_bf16(model) if bf16 and world_size > 1 else model
    return apply_ddp


def _ckpt_step(checkpoint: Any) -> int:
    if checkpoint is None:
        return -1
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else -1


def newest_complete_checkpoint(run_dir: str, newer_than: int = -1) -> str | None:
    """The newest ``<run_dir>/step_N`` with ``N > newer_than`` whose files are all there: model,
    optimizer, ``train_state.json`` and one RNG file per rank of the run that wrote it."""
    import fsspec

    from dnc.training import TrainState

    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(root):
        return None
    steps = []
    for d in fs.ls(root, detail=False):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) > newer_than:
            steps.append((int(name[5:]), d))
    for _, d in sorted(steps, reverse=True):
        try:
            with fs.open(f"{d}/train_state.json", "r") as f:
                st = TrainState.from_json(f.read())
        except (FileNotFoundError, ValueError):
            continue
        need = ["model.safetensors", "config.json", "optimizer.pt",
                *[f"rng/rank_{r:05d}.pt" for r in range(st.world_size)]]
        if all(fs.exists(f"{d}/{n}") for n in need):
            return d if "://" not in run_dir else fs.unstrip_protocol(d)
    return None


def quiet_report_log() -> None:
    """Drop Ray Train's per-report INFO line ("Reporting training result N: TrainingReport(...,
    metrics={...})", the whole metrics dict) from the worker's console. Its logger is named by the
    module's file path, so ``RunConfig(logging_config=LoggingConfig("WARNING"))``, which covers the
    ``ray.train.*`` loggers, misses it. The driver prints one short line per checkpoint instead."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``job`` (the typed, validated ``JobConfig``) and
    ``eval_text`` (held-out corpus bytes or None)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from dnc.training import MetricsLogger, Trainer, read_train_state
    from ray_jobs.config import JobConfig
    from ray_jobs.data import shard_batches

    quiet_report_log()
    job: JobConfig = config["job"]
    tcfg = job.train
    model_cfg = job.model_config()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.run.cpus_per_worker)))

    corpus = None
    if job.run.corpus:
        shard = ray.train.get_dataset_shard("train")
        corpus = shard_batches(shard, tcfg.batch_size, seed=tcfg.seed)

    def report(step: int, metrics: dict[str, float], ckpt_dir: str | None) -> None:
        # Only checkpoint steps go to Ray (same steps on every rank: report is a barrier). Metrics
        # of the other log steps go to JSONL/W&B only: the controller takes one queued report per
        # poll, and reports still queued when a worker dies are lost, so frequent metric-only
        # reports would delay (and on a crash drop) the checkpoint registrations behind them.
        if ckpt_dir is not None:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir),
                             checkpoint_dir_name=f"step_{step:08d}")

    checkpoint = ray.train.get_checkpoint()
    newer = newest_complete_checkpoint(job.run_dir, newer_than=_ckpt_step(checkpoint))
    if newer is not None:
        # Written and uploaded before a crash, but its report was still queued on the worker
        # when it died, so the controller never registered it: resume from it anyway.
        print(f"[ray_jobs.worker] resuming from {newer} (newer than Ray's registered checkpoint)", flush=True)
        checkpoint = Checkpoint(newer)
    logger = None

    def run(resume_dir: str | None) -> None:
        nonlocal logger
        if rank == 0:
            resume_step = read_train_state(resume_dir).step if resume_dir else None
            logger = MetricsLogger(job.run_dir, job.run.name,
                                   {"model": model_cfg.to_dict(), "train": tcfg.to_dict(),
                                    "run": dataclasses.asdict(job.run)},
                                   wandb=job.run.wandb, resume_step=resume_step, project=job.run.wandb_project)
            logger.log({"event/start": 1.0, "world_size": float(world),
                        "resumed_from": float(resume_step if resume_step is not None else -1)},
                       resume_step or 0)
        trainer = Trainer(tcfg, model_cfg, run_name=job.run.name, device=device, rank=rank, world_size=world,
                          parallelize=parallelize_fn(job.run.strategy, device, world, job.run.ddp_find_unused,
                                                     job.run.grad_reduce),
                          resume_from=resume_dir,
                          corpus_batches=corpus, eval_text=config.get("eval_text"), logger=logger,
                          progress=False)   # the driver shows progress (ray_jobs/progress.py)
        if rank == 0 and resume_dir:
            print(f"[ray_jobs.worker] resumed from {resume_dir} at step {trainer.step} "
                  f"(stage {trainer.state.data.get('stage')})", flush=True)
        trainer.run(report)

    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                run(d)
        else:
            run(None)
    finally:
        if logger is not None:
            logger.close()
