"""Parallelism applied to a model from outside it: FSDP2 per block, bf16 DDP gradient reduction,
``torch.compile`` of the blocks or of the whole training segment step, CUDA graphs of that step, and the helpers that see
through these wrappers. No Ray here."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DDP wrapper or ``torch.compile`` (FSDP2 shards in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2-sharded DTensors."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def compile_blocks(model: nn.Module, *, backend: str = "inductor") -> None:
    """``torch.compile`` each transformer block in place (the segment/memory loop stays eager).

    Blocks see a few shape families (segment length, bank size as it fills, memory/no-memory
    blocks), so the recompile limit is raised above dynamo's default of 8. ``backend="aot_eager"``
    traces the same graphs (forward and backward) without generating code: CPU tests use it, since
    inductor's C++ build of every shape family takes minutes on a small CPU."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    for blocks in block_lists(model):
        for b in blocks:
            b.compile(backend=backend)


def compile_segments(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                     compile: bool = True, dynamic_batch: bool = False) -> nn.Module:
    """``torch.compile`` the model's whole training segment step (``TrainConfig.compile: segment``):
    every whole segment of a training forward runs through one graph over fixed-capacity banks
    (:class:`dnc.training.compiled_segment.CompiledTrainSegments`, installed as the model's step
    runner; the runner it replaces still serves what it served, e.g. inference CUDA graphs). Eval
    and generation stay as they were. ``backend="aot_eager"`` runs without a C++ compiler (CPU
    tests); ``compile=False`` runs the same fixed-shape step eagerly. ``dynamic_batch``: try one graph
    for every batch size >= 2 (``TrainConfig.compile_dynamic_batch``). Apply before DDP wrapping.
    Returns the model."""
    import torch._dynamo

    from dnc.training.compiled_segment import CompiledTrainSegments

    # the runner caps its own graphs (max_graphs, with a warning); dynamo's limit must not cut in first
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    m = unwrap(model)
    m.step_runner = CompiledTrainSegments(m, backend=backend, mode=mode, compile=compile, fallback=m.step_runner,
                                          dynamic_batch=dynamic_batch)
    return model


def graph_segments(model: nn.Module, *, max_graphs: int = 8) -> nn.Module:
    """Capture the model's whole training segment step as CUDA graphs (``TrainConfig.compile:
    graphs``): each whole segment of a training forward replays a no-grad forward graph, and its
    backward one graph that recomputes the segment with grad
    (:class:`dnc.training.graphed_segment.GraphedTrainSegments`, installed as the model's step
    runner over the one it replaces). One pair of graphs per batch size (and autocast dtype), each
    captured in about the time of two eager segments, none compiled; past ``max_graphs`` new
    shapes run eagerly with a warning. Without CUDA the same recompute runs with plain calls (what
    the CPU tests compare with eager). Not with FSDP; apply before DDP wrapping. Returns the model."""
    from dnc.training.graphed_segment import GraphedTrainSegments

    m = unwrap(model)
    m.step_runner = GraphedTrainSegments(m, fallback=m.step_runner, max_graphs=max_graphs)
    return model


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    m = unwrap(model)
    for name in ("blocks", "layers", "h"):
        if isinstance(getattr(m, name, None), nn.ModuleList):
            return [getattr(m, name)]
    return [c for c in m.children() if isinstance(c, nn.ModuleList)]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a DNC (what FSDP shards and ``compile`` wraps one by one)."""
    return [b for bl in block_lists(model) for b in bl]


def reduce_grads_in_bf16(ddp_model: nn.Module) -> nn.Module:
    """All-reduce a DDP model's gradients in bf16: half the bytes of fp32 on the wire, cast back
    into the fp32 buckets after the sum (DDP's ``bf16_compress_hook``). Worth it when the
    all-reduce is bandwidth-bound (PCIe, cross-node); NCCL only. Returns the model."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"reduce_grads_in_bf16 needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    ddp_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp_model


def apply_fsdp(model: nn.Module, reshard_after_forward: bool = True, mp_bf16: bool = False,
               reduce_bf16: bool = False) -> nn.Module:
    """FSDP2 (``fully_shard``) per block, in place; needs an initialised process group.

    Each block's local attention and SwiGLU (most of its weights) is one FSDP unit, all-gathered
    right before it runs. The memory-read module stays in the root unit with the embeddings and
    compressors: the segment loop calls ``MemoryRead.build_view``/``write_kv``/``queries`` outside
    ``Block.forward``, where a block-level unit would still be sharded. Ranks must run the same
    number of segments per step (FSDP all-gathers per call): :class:`Trainer` pads batches to a
    common length under FSDP. ``mp_bf16``: parameters all-gathered and computed in bf16 (half the
    bytes), gradients reduced in fp32, or in bf16 too with ``reduce_bf16``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if mp_bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.bfloat16 if reduce_bf16 else torch.float32)
    for block in transformer_blocks(model):
        units = [getattr(block, n) for n in ("attn", "ffn") if isinstance(getattr(block, n, None), nn.Module)]
        for u in units or [block]:
            fully_shard(u, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, **kw)
    return model
