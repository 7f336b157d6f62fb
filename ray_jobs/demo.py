"""``dnc demo`` (``make run``): serve first, train while the UI watches, then serve what was trained.

1. Serve the API and UI at once: the run's newest checkpoint when the demo ran before, else an
   untrained tiny model. The UI link is printed before training starts.
2. Train through Ray Train on the same local Ray cluster. The UI's training monitor follows
   ``<storage>/<name>/metrics.jsonl`` (Serve's ``runs_root`` is the demo's storage) while it grows.
3. Redeploy the app with the trained checkpoint (``serve.run`` on the same app name replaces it)
   and say so; serve until ``serve_seconds`` pass or Ctrl-C.

One Ctrl-C stops everything within seconds: during training ``fit_interruptibly`` shuts Ray down
(workers, Serve, the local cluster) and re-raises; during serving ``serving.wait`` returns and
``serving.stop`` tears Serve down.
"""

from __future__ import annotations

import os
from typing import Any

from ray_jobs import serving
from ray_jobs.config import JobConfig

DEMO_GENERATOR_CPUS = 0.5
"""CPUs the served model reserves during the demo, so that it and the training workers
(``run.cpus_per_worker`` each) fit on a 2-core machine together."""


def previous_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of an earlier demo run, or None."""
    from ray_jobs.worker import newest_complete_checkpoint

    try:
        return newest_complete_checkpoint(run_dir)
    except (OSError, ValueError):
        return None


def app_args(job: JobConfig, checkpoint: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"storage": os.path.join(job.run.storage, "serve-storage"),
                            "runs_root": job.run.storage, "generator_num_cpus": DEMO_GENERATOR_CPUS}
    if checkpoint:
        args["checkpoint"] = checkpoint
    return args


def run_demo(job: JobConfig, *, port: int, serve_seconds: float | None) -> dict[str, Any]:
    """Serve, train, swap in the trained checkpoint, serve. Returns the training summary; raises
    KeyboardInterrupt on Ctrl-C during training (after Ray is down)."""
    from ray_jobs.train import init_ray, print_summary, run_training

    first = previous_checkpoint(job.run_dir)
    args = app_args(job, first)
    serving.check_port(port)
    app = serving.checked_app(args)          # bad arguments fail here, before Ray starts
    init_ray()
    summary = None
    try:
        serving.start(port)
        serving.deploy(app)
        what = f"the checkpoint {first}" if first else "an untrained tiny model"
        print(f"[dnc demo] serving {what} while training", flush=True)
        serving.print_links(port)
        print(f"[dnc demo] training tiny to step {job.train.stop_step} with {job.run.num_workers} Ray Train "
              f"workers -> {job.run_dir}; the UI's Training tab follows it live "
              f"(http://127.0.0.1:{port}/ui)", flush=True)
        summary = run_training(job)          # Ctrl-C: Ray is shut down, KeyboardInterrupt raised
        print_summary(summary)
        if summary.get("checkpoint"):
            args = app_args(job, summary["checkpoint"])
            serving.deploy(serving.checked_app(args))
            print(f"[dnc demo] now serving the trained model: {summary['checkpoint']}", flush=True)
        serving.print_links(port)
        serving.wait(serve_seconds)
        return summary
    finally:
        serving.stop(args)
