"""The ``dnc`` command: one entry point that dispatches to the project's tools.

    dnc demo                  train the tiny preset briefly on Ray Train, then serve it with the UI
    dnc train ...             = python -m ray_jobs.train ...
    dnc evaluate ...          = python -m ray_jobs.evaluate ...
    dnc sweep ...             = python -m tune.sweep ...
    dnc serve [--checkpoint PATH] [--port 8000]
    dnc generate --prompt TEXT [--checkpoint PATH]   (plain PyTorch, no Ray)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence


def _serve_forever(checkpoint: str | None, port: int, seconds: float | None, storage: str) -> None:
    import ray
    from ray import serve

    from serve.app import build_app

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"storage": storage}
    if checkpoint:
        args["checkpoint"] = checkpoint
    serve.run(build_app(args), name="bwr-dnc", route_prefix="/", blocking=False)
    print(f"\nBWR-DNC is serving: UI http://127.0.0.1:{port}/ui  API docs http://127.0.0.1:{port}/docs", flush=True)
    print("Ctrl-C stops it.", flush=True)
    deadline = time.time() + seconds if seconds else None
    try:
        while deadline is None or time.time() < deadline:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        from serve.app import teardown

        teardown(args)


def cmd_demo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dnc demo", description="Train the tiny preset briefly on the curriculum "
                                "through Ray Train (local Ray, local storage, W&B offline), then serve it with "
                                "the UI at http://127.0.0.1:PORT/ui.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps (a resumed demo continues from its step)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP)")
    p.add_argument("--storage", default="runs", help="where checkpoints, metrics and session banks go")
    p.add_argument("--name", default="demo", help="run name (same name = resume)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="stop after training")
    p.add_argument("--serve-seconds", type=float, default=None, help="serve this long, then exit (default: forever)")
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from ray_jobs.train import build_parser, job_from_args, print_summary, run_training

    targs = build_parser().parse_args(["--config", "configs/train/tiny.yaml", "--name", a.name, "--storage",
                                       a.storage, "--num-workers", str(a.workers), "--max-steps", str(a.steps)])
    job = job_from_args(targs)
    print(f"[dnc demo] training tiny for {a.steps} steps with {a.workers} Ray Train workers -> {job.run_dir}")
    summary = run_training(job)
    print_summary(summary)
    if a.no_serve:
        return 0
    _serve_forever(summary["checkpoint"], a.port, a.serve_seconds, os.path.join(a.storage, "serve-storage"))
    return 0


def cmd_serve(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dnc serve", description="Serve a checkpoint (or an untrained tiny model) "
                                "with Ray Serve: HTTP/WebSocket API and the UI.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint dir or fsspec URI")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--storage", default="runs/serve-storage", help="session-bank storage (dir or fsspec URI)")
    p.add_argument("--seconds", type=float, default=None, help="serve this long, then exit (default: forever)")
    a = p.parse_args(argv)
    _serve_forever(a.checkpoint, a.port, a.seconds, a.storage)
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dnc generate", description="Generate text with plain PyTorch (no Ray).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint dir or fsspec URI (default: untrained tiny)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.temperature < 0 or not 0 < a.top_p <= 1:
        p.error("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    import torch

    from dnc.checkpoint import CheckpointError, load_checkpoint
    from dnc.config import preset
    from dnc.model import DNC
    from dnc.tokenizer import ByteTokenizer

    torch.manual_seed(a.seed)
    try:
        model = load_checkpoint(a.checkpoint)[0] if a.checkpoint else DNC(preset("tiny"))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(a.seed)
    for t in model.generate_stream(tok.encode(a.prompt, bos=True), max_new_tokens=a.max_new_tokens,
                                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                   stop_tokens=(tok.eos_id,), generator=gen):
        sys.stdout.write(tok.decode([t]))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _module_main(module: str):
    def run(argv: Sequence[str]) -> int:
        import importlib

        return importlib.import_module(module).main(list(argv)) or 0
    return run


COMMANDS = {
    "demo": cmd_demo,
    "train": _module_main("ray_jobs.train"),
    "evaluate": _module_main("ray_jobs.evaluate"),
    "sweep": _module_main("tune.sweep"),
    "serve": cmd_serve,
    "generate": cmd_generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    raise SystemExit(main())
