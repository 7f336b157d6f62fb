"""Training throughput and scaling: 1 GPU, then DDP and FSDP on N GPUs through Ray Train and
under torchrun, in one run. Writes ``bench/results/train_scaling.json`` and prints a markdown table.

    python bench/train_scaling.py                      # base preset, 2k tokens, all modes, 2 GPUs
    python bench/train_scaling.py --compile --steps 40 --batch-size 8
    python bench/train_scaling.py --dry-run            # the plan, params, FLOPs/token; runs nothing
    python bench/train_scaling.py --device cpu --steps 2   # tiny CPU smoke run of the same code

Every mode runs the real training step (``dnc.training.train_step``: bf16 autocast, clipping, AdamW
fused on CUDA) on random tokens with every position counted, so data loading is not measured.

MFU = tokens/s x FLOPs/token / (GPUs x peak bf16 dense FLOP/s), with the PaLM convention
FLOPs/token = 6 N + 12 L d T (N = parameters, L layers, d width, T = attended span, i.e.
min(seq_len, segment_len + kv_window)); memory-read attention over bank slots is not counted
(at 2k context with 2k segments the bank is still empty when it is read).

Targets (issue 3): >= 40% MFU on one GPU, 2-GPU scaling >= 1.9x, Ray Train / torchrun >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):  # the project (dnc) and bench/ (common)
    if _p not in sys.path:
        sys.path.insert(0, _p)
from common import HelpFormatter, fmt_num, git_commit, md_table, provenance, targets_section, write_json  # noqa: E402

TITLE = "Training throughput and scaling (`bench/train_scaling.py`)"
WHAT = ("Tokens/s, step time, MFU and peak memory of the real training step on one GPU, then DDP "
        "and FSDP2 on N GPUs through Ray Train and under torchrun, on random tokens.")

ALL_MODES = ("single", "ray-ddp", "ray-fsdp", "torchrun-ddp", "torchrun-fsdp")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "RTX 4090": 165.0}


# ---------------------------------------------------------------------------------- shared
def model_config(args_d: dict[str, Any]):
    from dnc.config import preset

    over = dict(args_d.get("overrides") or {})
    seg = args_d.get("segment_len")
    if seg:
        over["segment_len"] = seg
        over.setdefault("l0_slots", max(seg // max(1, over.get("write_pool", 1)), 8))
    if args_d.get("grad_checkpointing"):
        over["grad_checkpointing"] = True
    if args_d.get("no_memory"):
        return preset(args_d["preset"], **over).baseline(args_d["seq_len"])
    return preset(args_d["preset"], **over)


def flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    span = min(seq_len, cfg.segment_len + cfg.kv_window)
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.d_model * span


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tf * 1e12
    return None


def bench_worker(a: dict[str, Any], rank: int, world: int, device_str: str, strategy: str) -> dict[str, Any]:
    """Build, wrap (none/ddp/fsdp), warm up and time ``a["steps"]`` training steps on this rank.
    Collective when ``world > 1``: returns world-aggregated numbers on every rank."""
    import torch
    import torch.distributed as dist

    from dnc.model import DNC
    from dnc.parallel import apply_fsdp, compile_blocks, reduce_grads_in_bf16
    from dnc.training import TrainConfig, build_optimizer, train_step

    device = torch.device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(a)
    torch.manual_seed(0)
    model = DNC(cfg).to(device)
    n_params = model.num_params()
    if a.get("compile"):
        compile_blocks(model)
    bf16_reduce = a.get("grad_reduce") == "bf16"
    if world > 1 and strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    elif world > 1 and strategy == "fsdp":
        model = apply_fsdp(model, mp_bf16=a.get("fsdp_bf16_params", False), reduce_bf16=bf16_reduce)
    elif world > 1 and strategy == "ray-ddp":
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    if world > 1 and strategy in ("ddp", "ray-ddp") and bf16_reduce:
        reduce_grads_in_bf16(model)
    tcfg = TrainConfig(lr=3e-4, warmup_steps=0, total_steps=10_000, bf16=a.get("bf16", True))
    opt = build_optimizer(model, tcfg)
    g = torch.Generator().manual_seed(1234 + rank)
    B, T = a["batch_size"], a["seq_len"]
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    batch = {"tokens": tokens[:, :-1].contiguous().to(device), "targets": tokens[:, 1:].contiguous().to(device)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(a["warmup"]):
        train_step(model, batch, opt, clip=1.0, bf16=tcfg.bf16, device=device)
    sync()
    if world > 1:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = []
    for _ in range(a["steps"]):
        m = train_step(model, batch, opt, clip=1.0, bf16=tcfg.bf16, device=device)
        losses.append(m["loss"])
    sync()
    dt = time.perf_counter() - t0
    tok = B * T * a["steps"]
    local = torch.tensor([tok / dt, dt / a["steps"],
                          (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else 0.0],
                         dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if world > 1:
        tps = local[0:1].clone()
        dist.all_reduce(tps)                                  # total tokens/s
        mx = local[1:3].clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)             # slowest rank's step time, peak memory
        total_tps, step_s, peak_gb = float(tps[0]), float(mx[0]), float(mx[1])
    else:
        total_tps, step_s, peak_gb = float(local[0]), float(local[1]), float(local[2])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"world": world, "tokens_per_s": total_tps, "tokens_per_s_per_gpu": total_tps / world,
            "step_ms": step_s * 1e3, "peak_mem_gb": peak_gb, "n_params": n_params,
            "flops_per_token": flops_per_token(cfg, n_params, T), "device_name": name,
            "final_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------- modes
def run_single(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    dev = "cuda:0" if a["device"] == "cuda" else "cpu"
    out = bench_worker(a, 0, 1, dev, "none")
    if a["device"] == "cuda":
        torch.cuda.empty_cache()
    return out


def _ray_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    dev = ray.train.torch.get_device()
    strategy = "fsdp" if config["strategy"] == "fsdp" else "ray-ddp"
    res = bench_worker(config["args"], ctx.get_world_rank(), ctx.get_world_size(), str(dev), strategy)
    # Train V2 keeps metrics only with a checkpoint: rank 0 attaches one holding the result.
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if ctx.get_world_rank() == 0:
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump(res, f)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(res, checkpoint=ckpt)


def run_ray(a: dict[str, Any], strategy: str) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=a.get("verbose", False))
    gpu = a["device"] == "cuda"
    trainer = TorchTrainer(
        _ray_loop, train_loop_config={"args": a, "strategy": strategy},
        scaling_config=ScalingConfig(num_workers=a["gpus"], use_gpu=gpu,
                                     resources_per_worker={"CPU": a.get("cpus_per_worker", 1), **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=f"bench-{strategy}-{int(time.time())}", storage_path=a["storage"]))
    res = trainer.fit()
    with res.checkpoint.as_directory() as d, open(os.path.join(d, "result.json")) as f:
        return json.load(f)


def run_torchrun(a: dict[str, Any], strategy: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "result.json")
        args_path = os.path.join(td, "args.json")
        with open(args_path, "w") as f:
            json.dump(a, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a['gpus']}",
               os.path.abspath(__file__), "--worker", strategy, "--worker-args", args_path, "--worker-out", out]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.get("cpus_per_worker", 1)))
        proc = subprocess.run(cmd, env=env, capture_output=not a.get("verbose"), text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun {strategy} failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
        with open(out) as f:
            return json.load(f)


def torchrun_worker(strategy: str, args_path: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    with open(args_path) as f:
        a = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = a["device"] == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(f"cuda:{local}") if cuda else None)
    try:
        res = bench_worker(a, rank, world, f"cuda:{local}" if cuda else "cpu", strategy)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- report
def environment() -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    env["commit"] = git_commit()
    return env


def add_derived(report: dict[str, Any], peak: float | None) -> None:
    res = report["results"]
    for r in res.values():
        if "tokens_per_s" in r and peak:
            r["mfu"] = r["tokens_per_s_per_gpu"] * r["flops_per_token"] / peak
    d: dict[str, Any] = {}
    single = res.get("single", {}).get("tokens_per_s")
    for m in ("ray-ddp", "ray-fsdp", "torchrun-ddp", "torchrun-fsdp"):
        if single and "tokens_per_s" in res.get(m, {}):
            d[f"scaling/{m}"] = res[m]["tokens_per_s"] / single
    for s in ("ddp", "fsdp"):
        a, b = res.get(f"ray-{s}", {}), res.get(f"torchrun-{s}", {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            d[f"ray_over_torchrun/{s}"] = a["tokens_per_s"] / b["tokens_per_s"]
    report["derived"] = d
    t = report["targets"] = {}
    if "mfu" in res.get("single", {}):
        t["single MFU >= 40%"] = res["single"]["mfu"] >= 0.40
    for m in ("ray-ddp", "ray-fsdp"):
        if f"scaling/{m}" in d and report["config"]["gpus"] == 2:
            t[f"{m} 2-GPU scaling >= 1.9x"] = d[f"scaling/{m}"] >= 1.9
    for s in ("ddp", "fsdp"):
        if f"ray_over_torchrun/{s}" in d:
            t[f"Ray/torchrun {s} >= 0.97"] = d[f"ray_over_torchrun/{s}"] >= 0.97


def tables(res: dict) -> list[str]:
    """One row per mode (single GPU, Ray Train and torchrun, DDP and FSDP) and the derived ratios."""
    results = res.get("results", {})
    derived = res.get("derived", {})
    rows = []
    for mode, r in results.items():
        if "error" in r:
            msg = str(r["error"]).splitlines()[0][:90]
            rows.append([mode, "—", "—", "—", "—", "—", "—", "—", f"failed: {msg}"])
            continue
        sc = derived.get(f"scaling/{mode}")
        rows.append([mode, str(r.get("world", "—")), fmt_num(r.get("tokens_per_s")),
                     fmt_num(r.get("tokens_per_s_per_gpu")),
                     fmt_num(r.get("step_ms"), "{:.1f}"), fmt_num(r.get("mfu"), "{:.1%}"),
                     fmt_num(sc, "{:.2f}x") if sc else "-", fmt_num(r.get("peak_mem_gb"), "{:.1f}"), ""])
    lines = md_table(["mode", "GPUs", "tokens/s", "tokens/s/GPU", "step ms", "MFU", "scaling vs 1 GPU", "peak GiB",
                      "note"], rows, "l" + "r" * 7 + "l") + [""]
    ratios = {k: v for k, v in derived.items() if not k.startswith("scaling/")}
    if ratios:
        lines += ["Derived: " + ", ".join(f"{k} = {v:.3f}" for k, v in sorted(ratios.items())), ""]
    return lines


def targets(res: dict) -> list[dict[str, Any]]:
    """The verdicts the script stored, with the measured value looked up by the target's wording
    (``single MFU ...``, ``<mode> 2-GPU scaling ...``, ``Ray/torchrun <strategy> ...``)."""
    results, derived = res.get("results", {}), res.get("derived", {})
    out = []
    for name, met in res.get("targets", {}).items():
        shown = None
        if "MFU" in name:
            v = results.get(name.split()[0], {}).get("mfu")
            shown = fmt_num(v, "{:.1%}") if v is not None else None
        elif "scaling" in name:
            v = derived.get(f"scaling/{name.split()[0]}")
            shown = fmt_num(v, "{:.2f}x") if v is not None else None
        elif name.startswith("Ray/torchrun"):
            v = derived.get(f"ray_over_torchrun/{name.split()[1]}")
            shown = fmt_num(v, "{:.3f}") if v is not None else None
        out.append({"target": name, "measured": shown, "met": bool(met) if met is not None else None})
    return out


def render(res: dict[str, Any]) -> str:
    """Markdown of one result: where it ran, the table of modes, the targets; the body of its
    entry in ``bench/README.md`` and the ``.md`` file written next to the JSON."""
    e = res.get("env", {})
    where = f"{e.get('gpu_count')}x {e.get('gpu')}" if e.get("gpu_count") else f"CPU ({res.get('device', '?')})"
    lines = [f"Device: {where}; torch {e.get('torch')}; CUDA {e.get('cuda')}; "
             f"ray {e.get('ray')}; commit {e.get('commit') or 'unknown'}", ""] + tables(res)
    return "\n".join(lines + targets_section(targets(res)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default: base on cuda, tiny on cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048 cuda, 256 cpu)")
    p.add_argument("--segment-len", type=int, default=None, help="override the preset's segment_len")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per GPU per step (default: 8 cuda, 2 cpu)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5, 10 with --compile)")
    p.add_argument("--gpus", type=int, default=2, help="workers for the multi-GPU modes (default: 2)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(ALL_MODES)} "
                                                 "(default: all on cuda, single on cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32")
    p.add_argument("--grad-reduce", choices=["fp32", "bf16"], default="fp32",
                   help="gradient all-reduce dtype for DDP/FSDP (bf16 halves the bytes; default fp32)")
    p.add_argument("--fsdp-bf16-params", action="store_true",
                   help="FSDP all-gathers and computes parameters in bf16 (MixedPrecisionPolicy)")
    p.add_argument("--no-memory", action="store_true", help="the Transformer baseline (memory off, one segment)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU for MFU "
                                                                   "(default: from the GPU name)")
    p.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "dnc-bench-ray"),
                   help="Ray Train storage for the ray modes")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_scaling.json"))
    p.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs/token, run nothing")
    p.add_argument("--verbose", action="store_true", help="show worker logs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = device == "cpu"
    modes = [m.strip() for m in (ns.modes or ("single" if cpu else ",".join(ALL_MODES))).split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        raise SystemExit(f"error: unknown modes {bad}; choose from {ALL_MODES}")
    if device == "cuda" and not ns.dry_run:
        have = torch.cuda.device_count()
        if any(m != "single" for m in modes) and have < ns.gpus:
            raise SystemExit(f"error: {ns.gpus} GPUs needed for the multi-GPU modes, {have} visible; "
                             f"use --gpus {have} or --modes single")
    return {"preset": ns.preset or ("tiny" if cpu else "base"), "seq_len": ns.seq_len or (256 if cpu else 2048),
            "segment_len": ns.segment_len, "batch_size": ns.batch_size or (2 if cpu else 8), "steps": ns.steps,
            "warmup": ns.warmup if ns.warmup is not None else (10 if ns.compile else (1 if cpu else 5)),
            "gpus": ns.gpus, "modes": modes, "device": device, "compile": ns.compile, "bf16": not ns.no_bf16,
            "grad_reduce": ns.grad_reduce, "fsdp_bf16_params": ns.fsdp_bf16_params, "no_memory": ns.no_memory,
            "grad_checkpointing": ns.grad_checkpointing, "storage": ns.storage,
            "verbose": ns.verbose, "cpus_per_worker": 1 if cpu else 8, "peak_tflops": ns.peak_tflops}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    if ns.worker:
        torchrun_worker(ns.worker, ns.worker_args, ns.worker_out)
        return 0
    a = resolve_args(ns)
    from dnc.model import DNC

    cfg = model_config(a)
    import torch

    with torch.device("meta"):
        n_params = DNC(cfg).num_params()
    fpt = flops_per_token(cfg, n_params, a["seq_len"])
    if ns.dry_run:
        print(json.dumps({"plan": a, "model": {"params": n_params, "segment_len": cfg.segment_len,
                                               "memory": cfg.memory, "flops_per_token": fpt}}, indent=1))
        return 0
    report: dict[str, Any] = {**provenance("train_scaling", argv, a["device"]),
                              "config": {k: v for k, v in a.items() if k != "verbose"}, "env": environment(),
                              "results": {}, "time": time.time()}
    runners = {"single": run_single, "ray-ddp": lambda x: run_ray(x, "ddp"), "ray-fsdp": lambda x: run_ray(x, "fsdp"),
               "torchrun-ddp": lambda x: run_torchrun(x, "ddp"), "torchrun-fsdp": lambda x: run_torchrun(x, "fsdp")}
    for m in a["modes"]:
        print(f"[train_scaling] {m} ...", flush=True)
        t0 = time.time()
        try:
            report["results"][m] = runners[m](a)
            report["results"][m]["wall_s"] = time.time() - t0
            print(f"[train_scaling] {m}: {report['results'][m]['tokens_per_s']:,.0f} tokens/s", flush=True)
        except Exception as e:  # keep the other modes' numbers
            report["results"][m] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[train_scaling] {m} failed: {e}", flush=True)
    name = next((r["device_name"] for r in report["results"].values() if "device_name" in r), "")
    peak = peak_flops(name, a["peak_tflops"]) if a["device"] == "cuda" else None
    report["peak_flops"] = peak
    add_derived(report, peak)
    write_json(ns.out, report)
    md = render(report)
    with open(os.path.splitext(ns.out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {ns.out}")
    return 0 if all("error" not in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
