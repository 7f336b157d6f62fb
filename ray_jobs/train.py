"""Train the DNC on Ray Train (Train V2 ``TorchTrainer``): curriculum tasks and optional corpus text.

    dnc train --config configs/train/tiny.yaml [--run.num_workers N] [--run.gpu true]
        [--run.strategy ddp|fsdp] [--run.storage PATH_OR_URI] [--run.name RUN] [--train.max_steps N]
        [--run.corpus stdlib] [--train.lr 1e-3] [--model.overrides.d_model 64] ...
    (python -m ray_jobs.train ... is the same command)

Checkpoints go to ``<storage>/<name>/step_XXXXXXXX`` (Ray Train's run dir), metrics to
``<storage>/<name>/metrics.jsonl``. Rerunning with the same name and storage resumes from the
newest checkpoint (step, curriculum stage, optimizer, RNG). Workers that die are restarted from
the newest checkpoint up to ``run.max_failures`` times.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Sequence

from ray_jobs.config import JobConfig
from ray_jobs.progress import RunProgress
from ray_jobs.signals import stop_on_sigterm


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    # "local", not None: with None Ray joins the machine's last `ray start` cluster (its address file
    # in /tmp/ray), and hangs retrying when that cluster is gone
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    stop_on_sigterm()  # ray.init replaced it with Ray's (ray_jobs.signals)


def _write_json(uri: str, obj: Any) -> None:
    import fsspec

    fs, p = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(json.dumps(obj, indent=1, default=str))


def fit_interruptibly(trainer) -> Any:
    """``trainer.fit()`` in a helper thread, so that one Ctrl-C stops it within seconds.

    In the main thread, Ray Train installs a SIGINT handler that outlives ``fit()``: the first two
    Ctrl-C only print "Gracefully aborting the training run", ``fit()`` then returns as if the run
    had ended, and a later server swallows Ctrl-C too. Off the main thread it installs none; the
    main thread gets ``KeyboardInterrupt``, shuts Ray down (workers, controller, a local cluster)
    and re-raises."""
    import ray

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("\n[dnc] interrupted: stopping the training run", file=sys.stderr, flush=True)
        ray.shutdown()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_training(job: JobConfig, *, address: str | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the job on Ray Train; returns a summary dict (metrics, checkpoint path,
    run dir). Raises ``ray.train.TrainingFailedError`` when the run fails past ``max_failures``.
    ``callbacks``: Ray Train ``UserCallback``s (``tune.sweep`` passes ``TuneReportCallback``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_jobs import data as rdata
    from ray_jobs.worker import train_loop_per_worker

    init_ray(address)
    if job.train.fail_at_step is not None and not job.train.fail_marker:
        job = job.replace(train={"fail_marker": f"{job.run_dir}/.fault_injected"})

    datasets = None
    eval_text = None
    if job.run.corpus:
        # Ray Data's own bars (rows/s per operator) would be a second and third bar in a terminal
        # and thousands of lines in a log; the run's progress is the driver's RunProgress.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        train_files, held = rdata.expand_corpus(job.run.corpus, job.run.corpus_holdout)
        print(f"[ray_jobs.train] corpus: {len(train_files)} training files, {len(held)} held out for bits/byte")
        datasets = {"train": rdata.build_dataset(train_files, job.train.max_len, job.run.corpus_text_column)}
        if held and job.train.corpus_eval_bytes:
            eval_text = rdata.read_bytes(held, job.train.corpus_eval_bytes, job.run.corpus_text_column)

    resources = {"CPU": job.run.cpus_per_worker}
    if job.run.gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "eval_text": eval_text},   # the typed config itself (pickled)
        scaling_config=ScalingConfig(num_workers=job.run.num_workers, use_gpu=job.run.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run.name, storage_path=job.run.storage,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            callbacks=list(callbacks or []),
            # Ray Train's INFO lines (each report's metrics dict, "Checkpoint successfully created")
            # would repeat what the driver's progress shows; warnings and errors still print.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
                                             "WANDB_SILENT": "true"}}),
        datasets=datasets,
    )
    _write_json(f"{job.run_dir}/job.json", {"job": job.to_dict(), "argv": sys.argv, "time": time.time()})
    t0 = time.time()
    progress = RunProgress(job.run_dir, job.train.stop_step).start() if job.run.progress else None
    try:
        result = fit_interruptibly(trainer)
    finally:
        if progress is not None:
            progress.close()
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
    from rich.console import Console
    from rich.table import Table

    t = Table(title="dnc train", show_header=False)
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ray_jobs.train`` = ``dnc train``."""
    from ray_jobs.cli import main as dnc_main

    return dnc_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
