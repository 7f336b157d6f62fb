"""Typed model configuration with a docstring per field, validation and presets.

Presets: ``tiny`` (CPU tests and the demo, 0.54M params), ``small`` (28M), ``base`` (92M).
A config is saved with every checkpoint (``to_dict``/``from_dict``) so a model can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

EvictionPolicyName = Literal["lru", "lfu", "salience", "hybrid", "adaptive"]
AttnImpl = Literal["auto", "sdpa", "flash", "math"]


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and what to use."""


@dataclass
class DNCConfig:
    vocab_size: int = 272
    """Number of token ids (byte tokenizer: 256 bytes + 16 special tokens = 272)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads for both local attention and memory reads; ``d_model % n_heads == 0``."""
    ffn_mult: float = 8 / 3
    """SwiGLU hidden width as a multiple of ``d_model`` (rounded up to a multiple of 64)."""
    segment_len: int = 64
    """Tokens per segment: local attention never looks further back than this plus ``kv_window``."""
    kv_window: int = 0
    """Keys/values carried from the previous segment into local attention (0 = none)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    attn_impl: AttnImpl = "auto"
    """Local attention kernel: ``auto`` (flash-attn on CUDA if installed, else SDPA), ``sdpa``,
    ``flash`` (requires flash-attn and CUDA) or ``math`` (reference einsum)."""
    dropout: float = 0.0
    """Dropout on attention/FFN outputs during training."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    key_shift: bool = True
    """Local-attention keys also carry the *query* projection of the previous token (a tied token
    shift, as the memory keys do): a query "like token t-1" then finds the token that followed it,
    which is the induction/copy/lookup step every long-range task needs. Without it a model must
    first grow previous-token heads, which answer-only losses teach slowly."""

    # --- memory ------------------------------------------------------------------------------
    memory: bool = True
    """Enable the StateBank. ``False`` (with one segment spanning the input) is the baseline."""
    memory_layers: tuple[int, ...] | None = None
    """Block indices with a memory read; ``None`` = every block from index 1 on (block 0 builds
    the token features the memory keys are made of)."""
    l0_slots: int = 128
    """Capacity of level 0 (raw, 1x) in slots per layer and sequence."""
    l1_slots: int = 64
    """Capacity of level 1 (2x compressed)."""
    l2_slots: int = 32
    """Capacity of level 2 (4x compressed)."""
    write_pool: int = 1
    """Tokens pooled into one L0 slot on write (1 = one slot per token)."""
    compress_group: int = 8
    """Raw slots compressed together by the LearnedCompressor (2:1, so ``group/2`` outputs)."""
    mem_temperature: float = 0.0
    """Initial read temperature: the learned per-head scale of the unit-norm query-key cosine
    (0 = auto, ``1.5 * ln(bank_slots + 1)``). A slot's key carries the previous token's query
    projection next to its own, so a perfect match has cosine ~0.7 rather than 1; with the scale at
    ``1.5 ln S`` that slot outweighs all S others. A fixed scale of 8 (tiny's auto value) caps a
    perfect match at ~7% of the read over small's 3,584 slots, which also starves its gradient."""
    write_importance: float = 0.0
    """Weight of a learned slot importance in the choice of what L0/L1 compress first and what L2
    evicts (0 = off, and no parameters are added). The importance is a per-head linear function of a
    slot's key and value that is also added to the slot's read logit, so reads train it: slots that
    later queries need score high. Exact recall lasts only while a fact is a raw L0 slot (tiny, CPU:
    kv_retrieval 1.00 at 4 segments back, 0.06 at 16 with a 4-segment L0), so keeping such slots
    raw is what lets a fixed-size bank recall them far back."""
    self_read: bool = False
    """The memory read also sees this segment's own writes, causally: at segment position t a read
    attends, in one softmax, over the null slot, the bank and the segment's write slots 0..t, each
    seen as a raw L0 slot of age 0 (the key and value the commit will write). The read's lookup
    (unit-norm keys, learned temperature, token-shifted keys) learns fast; local attention was
    measured not to keep an in-segment lookup (small, ~7 min: a passkey in the question's own
    segment 5/56 against 26/40 from the bank), so with this on one learned lookup serves every
    distance. Requires ``write_pool == 1`` (one slot per position). Off: behaviour and
    checkpoints exactly as before (it adds no parameters)."""
    forward_read: bool = False
    """A second, *forward* memory read (the DNC's temporal links, Graves et al. 2016): at position
    t, what token t-1's read attended, moved one slot later,
    ``fwd_t = sum_s softmax(q'_{t-1} . K)[s] * V[succ(s)]`` (one more SDPA call with the previous
    position's augmented query and successor-shifted values), added per head as
    ``content_t + g_t * fwd_t`` with a learned gate ``g_t = scale_h * sigmoid(w_h . h_t + b_h)``
    (``scale`` starts at 0, so a fresh model computes exactly what it computes without this).
    Why: a fact is copied out of memory token by token, and a content read finds each next token
    only by "a slot whose previous token looks like mine", which thousands of slots of code and
    prose also match (copies drift: 52157 -> 521212); the forward read follows the slot order
    instead. ``succ`` is the next slot of the same level, the last L0 slot's is the segment's first
    write slot (L0 is in write order, its last slot the previous segment's last token), the last
    slot of L1 / L2 / the segment's writes has none (zero). Requires ``self_read`` (the previous
    token's memory input and the segment's own slots). Off: no parameters, exactly as before."""
    mem_topk: int = 0
    """Slots each query reads when the bank holds more than this (0 = dense read over all)."""
    eviction: EvictionPolicyName = "hybrid"
    """Policy that picks the L2 slots to drop: lru, lfu, salience, hybrid (LRU+salience), adaptive."""
    salience_decay: float = 0.9
    """EMA decay of per-slot salience (attention mass received per segment)."""
    protect_salient: float = 1.0
    """Weight of log-salience when choosing which L0/L1 slots to compress first: higher keeps
    salient slots uncompressed longer."""
    bptt_segments: int = 4
    """Truncated BPTT: gradients flow through the memory of at most this many past segments (the
    bank and carried state are detached every ``bptt_segments`` segments). The loss at a question
    must reach the segment whose writes hold the fact: on the tiny curriculum's first stage
    (facts 1-3 segments back, batch 32) 4 segments reach a mean exact match of 0.87 after 800
    steps, 2 segments stay at 0.02 after 1,000. Activations are kept for the whole sequence either
    way (one backward per sequence), so a longer window costs little memory."""
    recon_weight: float = 0.1
    """Weight of the compressor's reconstruction loss."""
    max_age_buckets: int = 16
    """Age embedding buckets (log2 of age in segments) that tell reads how old a slot is."""

    # --- training-time options the model honours ----------------------------------------------
    grad_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    init_std: float = 0.02
    """Std of the normal init for linear/embedding weights."""

    def __post_init__(self) -> None:
        if isinstance(self.memory_layers, list):
            self.memory_layers = tuple(self.memory_layers)
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}")
        need(self.d_model > 0 and self.n_layers > 0, "d_model and n_layers must be positive")
        need(self.n_heads > 0 and self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need((self.d_model // self.n_heads) % 2 == 0, "head dim (d_model/n_heads) must be even for RoPE")
        need(self.segment_len >= 1, f"segment_len must be >= 1, got {self.segment_len}")
        need(0 <= self.kv_window <= self.segment_len,
             f"kv_window must be in [0, segment_len={self.segment_len}], got {self.kv_window}")
        need(self.attn_impl in ("auto", "sdpa", "flash", "math"),
             f"attn_impl must be auto|sdpa|flash|math, got {self.attn_impl!r}")
        need(self.eviction in ("lru", "lfu", "salience", "hybrid", "adaptive"),
             f"eviction must be lru|lfu|salience|hybrid|adaptive, got {self.eviction!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.write_pool >= 1 and self.segment_len % self.write_pool == 0,
             f"write_pool ({self.write_pool}) must divide segment_len ({self.segment_len})")
        need(self.compress_group >= 2 and self.compress_group % 2 == 0,
             f"compress_group must be an even number >= 2, got {self.compress_group}")
        if self.memory:
            for name in ("l0_slots", "l1_slots", "l2_slots"):
                need(getattr(self, name) >= self.compress_group,
                     f"{name} must be >= compress_group ({self.compress_group}), got {getattr(self, name)}")
            need(self.l0_slots >= self.segment_len // self.write_pool,
                 f"l0_slots ({self.l0_slots}) must hold one segment's writes "
                 f"(segment_len/write_pool = {self.segment_len // self.write_pool})")
            for i in self.memory_layer_ids:
                need(0 <= i < self.n_layers, f"memory_layers entry {i} is outside [0, {self.n_layers})")
        need(not self.self_read or self.write_pool == 1,
             f"self_read reads each position's own write slot, so it needs write_pool == 1 "
             f"(got {self.write_pool}); set write_pool=1 or self_read=false")
        need(not self.forward_read or self.self_read,
             "forward_read follows the previous token's read one slot on, which needs self_read "
             "(the segment's own write slots in the read); set self_read=true or forward_read=false")
        need(self.mem_topk >= 0, f"mem_topk must be >= 0, got {self.mem_topk}")
        need(self.write_importance >= 0, f"write_importance must be >= 0 (0 = off), got {self.write_importance}")
        need(self.mem_temperature >= 0, f"mem_temperature must be >= 0 (0 = auto), got {self.mem_temperature}")
        need(0.0 <= self.salience_decay < 1.0, "salience_decay must be in [0, 1)")
        need(self.bptt_segments >= 1, "bptt_segments must be >= 1")

    # ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        h = int(self.ffn_mult * self.d_model)
        return ((h + 63) // 64) * 64

    @property
    def read_temperature(self) -> float:
        """Initial memory-read temperature (``mem_temperature``, or its auto value)."""
        return self.mem_temperature or 1.5 * math.log(self.bank_slots + 1)

    @property
    def memory_layer_ids(self) -> tuple[int, ...]:
        if not self.memory:
            return ()
        if self.memory_layers is None:
            return tuple(range(1, self.n_layers)) if self.n_layers > 1 else (0,)
        return tuple(self.memory_layers)

    @property
    def bank_slots(self) -> int:
        """Total slots one memory layer holds per sequence (all levels)."""
        return self.l0_slots + self.l1_slots + self.l2_slots

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["memory_layers"] is not None:
            d["memory_layers"] = list(d["memory_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DNCConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "DNCConfig":
        return dataclasses.replace(self, **changes)

    def baseline(self, seq_len: int) -> "DNCConfig":
        """The plain-Transformer baseline of this config: memory off, one segment of ``seq_len``."""
        return self.replace(memory=False, segment_len=seq_len, kv_window=0, memory_layers=None)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: ~0.5M params, reads 4 segments of raw memory.
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, segment_len=32, l0_slots=128, l1_slots=64,
                 l2_slots=32, compress_group=8),
    # 28.0M params (issue target ~25M; the two memory blocks add 2.1M).
    # Memory reads on a few blocks only: each adds ~4 d^2 params/FLOPs per token, and a couple of
    # layers suffice to route long-range information (measured in bench/model_speed.py).
    # write_pool=1: one raw slot per token. Pooling tokens on write averages a key's slot with its
    # neighbours' and breaks exact recall: on the tiny preset's cross-segment recall test
    # (tests/test_memory_learning.py, 300 steps) pooling 2 or 4 tokens gives 13% / 10% (chance 10%)
    # against 100% without pooling. Older text is still compressed 2x/4x in L1/L2.
    "small": dict(d_model=512, n_layers=8, n_heads=8, segment_len=2048, l0_slots=2048, l1_slots=1024,
                  l2_slots=512, write_pool=1, compress_group=8, mem_topk=0, memory_layers=(2, 5)),
    # 92.4M params (issue target ~85M; the three memory blocks add 7.1M).
    "base": dict(d_model=768, n_layers=12, n_heads=12, segment_len=2048, l0_slots=2048, l1_slots=1024,
                 l2_slots=512, write_pool=1, compress_group=8, mem_topk=0, memory_layers=(3, 7, 10)),
}


def preset(name: str, **overrides: Any) -> DNCConfig:
    """A named preset with optional field overrides, e.g. ``preset("tiny", memory=False)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DNCConfig(**{**PRESETS[name], **overrides})
