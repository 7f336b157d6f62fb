"""The ``dnc`` command: one entry point that dispatches to typed functions.

    dnc demo       train the tiny preset briefly (tasks + text) on Ray Train, then serve it with the UI
    dnc train      train on Ray Train: --config YAML plus --model.* / --train.* / --run.* overrides
    dnc evaluate   accuracy of a checkpoint (or run directory) per task x length
    dnc sweep      hyperparameter sweep with Ray Tune (ASHA or PBT); writes the best trial as a training YAML
    dnc serve      serve a checkpoint (or run directory) with Ray Serve: API and UI
    dnc generate   generate text with plain PyTorch (no Ray)

``dnc COMMAND --help`` lists a command's options (from the docstrings). ``python -m ray_jobs.train``,
``python -m ray_jobs.evaluate`` and ``python -m tune.sweep`` are the same commands. Argument errors
print one line and exit with status 2. SIGTERM (``kill``, systemd, Kubernetes) stops a command as one
Ctrl-C does: Ray and Serve shut down (status 143 where a Ctrl-C gives 130).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Literal, Sequence

from dnc.config import ConfigError
from ray_jobs.parsing import UsageError
from ray_jobs.signals import Terminated, stop_on_sigterm


# ------------------------------------------------------------------------------------- commands
def train(job, address: str | None = None) -> int:
    """Train BWR-DNC with Ray Train (DDP or FSDP2) on the curriculum (+ optional corpus text).
    Rerun with the same run.name and run.storage to resume."""
    from ray_jobs.train import print_summary, run_training

    print_summary(run_training(job, address=address))
    return 0


def evaluate(checkpoint: str, lengths: str = "1k,4k,16k", tasks: str | None = None, n: int = 16,
             difficulty: float = 0.5, seed: int = 1234, device: str | None = None, out: str = "runs/eval",
             ray_workers: int = 0, gpu: bool = False) -> int:
    """Exact-match accuracy of a checkpoint per task x length: eval.json, eval.md and an eval.png heatmap.

    Args:
        checkpoint: Checkpoint directory or run directory (its newest step_*), local or fsspec URI.
        lengths: Comma-separated token lengths with optional k/M suffixes (1k = 1024 tokens).
        tasks: Comma-separated task names; null = every task.
        n: Samples per task x length.
        difficulty: Task difficulty in [0, 1].
        seed: Seed of the samples.
        device: cpu or cuda; null = cuda when available.
        out: Output directory for eval.json, eval.md and eval.png.
        ray_workers: Spread the cells over this many Ray tasks (0 = in this process).
        gpu: One GPU per Ray task.
    """
    from ray_jobs.evaluate import run_evaluation

    return run_evaluation(checkpoint=checkpoint, lengths=lengths, tasks=tasks, n=n, difficulty=difficulty,
                          seed=seed, device=device, out=out, ray_workers=ray_workers, gpu=gpu)


def serve(checkpoint: str | None = None, port: int = 8000, storage: str = "runs/serve-storage",
          seconds: float | None = None, dtype: Literal["auto", "float32", "bfloat16"] = "auto",
          proxy: Literal["python", "haproxy"] | None = None, app: dict[str, Any] | None = None) -> int:
    """Serve a checkpoint (or an untrained tiny model) with Ray Serve: HTTP/WebSocket API and the UI.

    Args:
        checkpoint: Checkpoint directory or run directory (its newest step_*), local or fsspec URI.
        port: HTTP port on 127.0.0.1.
        storage: Session-bank storage (directory or fsspec URI).
        seconds: Seconds to serve before exiting; null = until Ctrl-C.
        dtype: Serving dtype of the weights and session states: auto = bfloat16 on CUDA, float32 on the CPU.
        proxy: What takes HTTP: Ray's Python proxy, or HAProxy (C, Ray 2.60; HTTP only) in front of the ingress;
            null = Ray's default (python), or the mode a RAY_ADDRESS cluster was started with.
        app: More app arguments (the fields of serve/config.yaml's args, serve.app.AppArgs) as a YAML or JSON
            mapping, e.g. '{kv_attention: flex, max_batch_size: 32, generator_replicas: 2}'.
    """
    from ray_jobs.serving import serve_forever

    serve_forever(resolve_checkpoint_arg(checkpoint), port, seconds, storage, dtype, proxy, app)
    return 0


def generate(prompt: str, checkpoint: str | None = None, max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> int:
    """Generate text from a prompt with plain PyTorch (no Ray).

    Args:
        prompt: Text to continue.
        checkpoint: Checkpoint directory or run directory; null = an untrained tiny model.
        max_new_tokens: Tokens to generate (>= 1).
        temperature: Sampling temperature (0 = greedy).
        top_k: Sample among the k most likely tokens (0 = all).
        top_p: Nucleus sampling mass in (0, 1].
        seed: Sampling seed.
    """
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UsageError("need --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    ckpt = resolve_checkpoint_arg(checkpoint)
    import torch

    from dnc.checkpoint import load_checkpoint
    from dnc.config import preset
    from dnc.model import DNC
    from dnc.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    model = load_checkpoint(ckpt)[0] if ckpt else DNC(preset("tiny"))
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(seed)
    for t in model.generate_stream(tok.encode(prompt, bos=True), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop_tokens=(tok.eos_id,), generator=gen):
        sys.stdout.write(tok.decode([t]))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def demo(steps: int = 200, workers: int = 2, storage: str = "runs", name: str = "demo", port: int = 8000,
         no_serve: bool = False, serve_seconds: float | None = None,
         train_config: str = "configs/train/tiny.yaml", corpus: list[str] | str | None = None) -> int:
    """Serve a model with the UI, train the tiny preset through Ray Train (local Ray, local storage,
    W&B offline) on the curriculum and on text (this Python's standard library) while the UI's
    training monitor follows the run live, then serve the trained checkpoint.

    Args:
        steps: Training steps (a resumed demo continues from its step).
        workers: Ray Train workers (DDP).
        storage: Where checkpoints, metrics and session banks go.
        name: Run name (the same name resumes; its newest checkpoint is served while it trains).
        port: HTTP port of the server on 127.0.0.1.
        no_serve: Train only (no server before or after).
        serve_seconds: Seconds to serve after training before exiting; null = until Ctrl-C.
        train_config: The training YAML (model and hyperparameters) the demo starts from.
        corpus: Text the demo trains on besides the curriculum: a path, glob or ``stdlib``, or a
            JSON list of them; null = this Python's standard library. A few files start Ray Data
            sooner (the tests).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    from ray_jobs.config import load_job_config

    job = load_job_config(config_path(train_config), {
        "train": {"max_steps": steps},
        "run": {"name": name, "storage": storage, "num_workers": workers, "corpus": [corpus] if isinstance(corpus, str) else (corpus or ["stdlib"]),
                "cpus_per_worker": 0.5}})
    if no_serve:
        from ray_jobs.train import print_summary, run_training

        print(f"[dnc demo] training tiny for {steps} steps with {workers} Ray Train workers -> {job.run_dir}")
        print_summary(run_training(job))
        return 0
    from ray_jobs.demo import run_demo

    run_demo(job, port=port, serve_seconds=serve_seconds)
    return 0


# ------------------------------------------------------------------------------------- helpers
def config_path(path: str) -> str:
    """A repo config path that works from any working directory."""
    if os.path.exists(path):
        return path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, path)


def resolve_checkpoint_arg(checkpoint: str | None) -> str | None:
    """A checkpoint or run directory -> the checkpoint directory, checked now (fails in a second)."""
    if not checkpoint:
        return None
    from dnc.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--checkpoint {checkpoint}: {e}") from None


# ------------------------------------------------------------------------------------- dispatch
COMMANDS = ("demo", "train", "evaluate", "sweep", "serve", "generate")
FUNCTIONS: dict[str, Callable[..., int]] = {"demo": demo, "evaluate": evaluate, "serve": serve,
                                            "generate": generate}


def command_parser(name: str):
    """The jsonargparse parser of one command (``train``: the job config; others: the function)."""
    from ray_jobs.parsing import new_parser

    if name == "train":
        from ray_jobs.config import job_parser

        p = job_parser(prog="dnc train", description=train.__doc__)
        p.add_argument("--address", type=str | None, default=None,
                       help="Ray address; null = RAY_ADDRESS, else a local cluster")
        return p
    if name == "sweep":
        from tune.sweep import sweep_parser

        return sweep_parser()
    fn = FUNCTIONS[name]
    p = new_parser(prog=f"dnc {name}", description=(fn.__doc__ or "").split("\n\n")[0])
    p.add_function_arguments(fn, as_group=False)
    return p


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for command ``name`` and call its typed function. Argument errors raise
    :class:`UsageError` (or ConfigError) with one line."""
    from jsonargparse import ArgumentError

    from ray_jobs.parsing import error_line

    p = command_parser(name)
    extra: dict = {}
    if name == "sweep":
        from tune.sweep import split_override_flags

        argv, extra = split_override_flags(argv)
    try:
        ns = p.parse_args(list(argv))
    except ArgumentError as e:
        raise UsageError(error_line(e)) from None
    if name == "train":
        from ray_jobs.config import job_from_namespace

        return train(job_from_namespace(p, ns), address=ns.address)
    if name == "sweep":
        from tune.sweep import run_sweep_command

        return run_sweep_command(p, ns, extra)
    kwargs = {k: v for k, v in ns.as_dict().items() if k != "config"}
    return FUNCTIONS[name](**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from ray_jobs.parsing import plain

        print(plain(__doc__))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    try:
        return run_command(name, rest)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
