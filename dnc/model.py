"""DNC: a segment-recurrent Transformer with a hierarchical learned memory (StateBank).

Input of any length is processed in segments of ``segment_len`` tokens. Each block does
``x += LocalAttn(norm(x))`` (causal, RoPE, within the segment plus an optional carried KV window),
``x += MemoryRead(norm(x))`` on memory layers, ``x += SwiGLU(norm(x))``. After each segment the
memory layers write the segment into their StateBank (L0), which compresses/evicts on overflow.
The bank is constant within a segment, so a full forward pass and token-by-token decoding compute
the same function (tested). With ``self_read`` a read also sees the segment's own writes so far
(causally, cached in the state as they are made), which keeps that equality. With ``memory=False``
and one segment spanning the input the same code is the plain Transformer baseline.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, causal_attention
from .config import ConfigError, DNCConfig
from .layers import RMSNorm, SwiGLU, apply_rope_full, rope_shift, rope_table_full
from .memory import LearnedCompressor, MemoryRead, StateBank, get_policy
from .generate import generate_stream, sample_next  # noqa: F401  (dnc.model.sample_next stays importable)
from .state import STATE_FORMAT_VERSION, DNCState, LayerState  # noqa: F401  (re-exported: dnc.model.DNCState)

@dataclass
class DNCOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    recon_loss: torch.Tensor | None = None
    state: DNCState | None = None
    metrics: dict = field(default_factory=dict)
    trace: list | None = None


@functools.lru_cache(maxsize=256)
def _positions(first: int, n: int, stride: int, device: torch.device) -> torch.Tensor:
    """LongTensor of chunk positions first, first+stride, ... < n (cached: made once per shape)."""
    return torch.arange(first, n, stride, device=device)


# ================================================================================== blocks
class LocalAttention(nn.Module):
    def __init__(self, cfg: DNCConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.impl = cfg.n_heads, cfg.head_dim, cfg.attn_impl
        self.key_shift = cfg.key_shift
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, past_k, past_v, cos, sin, x_prev=None, want_probs: bool = False):
        """x: [B, t, D]; past_k/v: [B, H, p, Dh] (carried window + earlier tokens of this segment);
        cos/sin: [t, Dh] full-width RoPE tables (``layers.rope_table_full``) of the chunk's positions;
        x_prev: [B, 1, D] the input of the token before ``x[:, 0]`` (None at the stream start).

        Returns (update [B, t, D], keys [B, H, p+t, Dh], values (past and this chunk's: the layer's
        new KV cache), probs [B, H, t, p+t] or None).
        """
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.key_shift:
            # tied token shift: key_t += query projection of token t-1, before RoPE places the key
            # at position t. Within the chunk that is q shifted by one; the chunk's first token
            # takes the previous chunk's last input from the state (zeros at the stream start).
            if x_prev is None:  # zeros for the first key: one pad op
                shift = F.pad(q[:, :, :-1], (0, 0, 1, 0))
            else:
                # x_prev through the whole qkv weight, then its q columns: the same numbers as a
                # projection through the weight's q rows, without slicing the weight (under autocast
                # a weight slice is cast per chunk and layer, and its backward is a full-size
                # zero-fill + copy into the weight's gradient)
                q_first = self.qkv(x_prev)[..., :d].view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)
                shift = q_first.to(q.dtype) if t == 1 else torch.cat([q_first.to(q.dtype), q[:, :, :-1]], 2)
            k = k + shift
        # q and k rotated together (one stack, then 4 ops instead of 2 x 7); unbind's backward is one stack
        q, k = apply_rope_full(torch.stack([q, k]), cos, sin).unbind(0)
        kk = torch.cat([past_k.to(k.dtype), k], 2) if past_k.shape[2] else k
        vv = torch.cat([past_v.to(v.dtype), v], 2) if past_v.shape[2] else v
        y = causal_attention(q, kk, vv, self.impl)
        probs = None
        if want_probs:
            with torch.no_grad():
                s = torch.einsum("bhqd,bhkd->bhqk", q.float(), kk.float()) / math.sqrt(self.head_dim)
                past = kk.shape[2] - t
                mask = torch.arange(kk.shape[2], device=x.device)[None] <= torch.arange(t, device=x.device)[:, None] + past
                probs = s.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.dropout(self.out(y.transpose(1, 2).reshape(b, t, d))), kk, vv, probs


class Block(nn.Module):
    def __init__(self, cfg: DNCConfig, has_memory: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = LocalAttention(cfg)
        self.mem_norm = RMSNorm(cfg.d_model) if has_memory else None
        self.mem = MemoryRead(cfg.d_model, cfg.n_heads, cfg.max_age_buckets, cfg.write_pool, cfg.init_std,
                              cfg.read_temperature, importance=cfg.write_importance > 0,
                              forward=cfg.forward_read) if has_memory else None
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.dropout)
        self.self_read = bool(cfg.self_read and has_memory)

    def forward(self, x, past_k, past_v, cos, sin, view, sample, topk: int, x_prev=None, trace: bool = False,
                self_past=None, write_prev=None):
        """One block on a chunk. Pure (no state mutation) so it can be checkpointed.

        x_prev: [B, 1, D] normed attention input of the previous token (None at the stream start).
        With ``self_read``: self_past [2, B, H, P, Dh] the write slots of the segment's earlier
        chunks (None: the chunk starts the segment), write_prev [B, 1, D] the memory input of the
        token before the chunk (the token shift of its first write key, and with ``forward_read`` the
        query of its first position's forward read; None at the stream start).
        Returns (x, k, v, mem_in [B,t,D] or None, mass [B,S] or None, trace dict, x_last [B,1,D],
        self_kv [2, B, H, P+t, Dh] or None (the segment's write slots so far; None without self_read));
        k/v [B, H, p+t, Dh] are the layer's new KV cache (past and this chunk's, concatenated once).
        """
        xn = self.attn_norm(x)
        a, k, v, probs = self.attn(xn, past_k, past_v, cos, sin, x_prev, want_probs=trace)
        x = x + a
        mem_in, mass, info = None, None, {}
        m = self_kv = None
        if self.mem is not None:
            mem_in = self.mem_norm(x)
            if self.self_read:
                # the chunk's write slots, exactly as the commit writes them (token shift included)
                kv, _ = self.mem.write_kv_packed(mem_in, h_before=write_prev)
                self_kv = kv if self_past is None else torch.cat([self_past.to(kv.dtype), kv], 3)
            m, mass, info = self.mem(mem_in, view, sample, topk, trace, self_kv=self_kv, h_prev=write_prev)
            x = x + m
        f = self.ffn(self.ffn_norm(x))
        x = x + f
        if trace:
            info = dict(info)
            info["attn_update_norm"] = a.detach().float().norm(dim=-1)
            info["mem_update_norm"] = (m.detach().float().norm(dim=-1) if m is not None
                                       else torch.zeros_like(info["attn_update_norm"]))
            info["ffn_update_norm"] = f.detach().float().norm(dim=-1)
            if probs is not None and probs.shape[-1] <= 512:
                info["local_attn"] = probs
        return x, k, v, mem_in, mass, info, xn[:, -1:], self_kv


# ================================================================================== model
class DNC(nn.Module):
    def __init__(self, config: DNCConfig):
        super().__init__()
        self.config = cfg = config
        mem_ids = set(cfg.memory_layer_ids)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in mem_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # one compressor per level transition (L0->L1, L1->L2), shared by all memory layers
        self.compressors = nn.ModuleList(LearnedCompressor(cfg.head_dim, cfg.compress_group) for _ in range(2)) \
            if cfg.memory else nn.ModuleList()
        self.policy = get_policy(cfg.eviction)
        # Optional runner of whole segment steps, applied from outside (gpt-fast style): an object with
        # ``eligible(tokens, state) -> bool`` and ``step(tokens, state) -> (logits, stats)`` computing what
        # :meth:`segment_step` computes, e.g. dnc.cuda_graphs.SegmentGraphs. None = eager.
        self.step_runner = None
        # Optional runner of one-token decode steps over a dnc.ragged.RaggedBatch, applied from outside:
        # ``step(batch) -> logits [C, V]`` computing what dnc.ragged.ragged_decode_step computes, and
        # ``acquire(capacity)`` / ``release(batch)`` of the batches it keeps (dnc.cuda_graphs.DecodeGraphs).
        self.decode_runner = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("attn.out.weight", "ffn.w2.weight", "mem.out.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
        elif isinstance(m, LearnedCompressor):  # zero correction: starts as mean pooling
            nn.init.zeros_(m.out_k.weight)
            nn.init.zeros_(m.out_v.weight)
        elif isinstance(m, MemoryRead):
            nn.init.zeros_(m.router.proj.weight)
            nn.init.zeros_(m.router.proj.bias)

    # ------------------------------------------------------------------ helpers
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int = 1, device=None, dtype=None) -> DNCState:
        cfg = self.config
        device = device or self.device
        dtype = dtype or self.embed.weight.dtype
        layers = []
        for blk in self.blocks:
            ls = LayerState(KVCache.empty(batch_size, cfg.n_heads, cfg.head_dim, device, dtype))
            if blk.mem is not None:
                ls.bank = StateBank.empty(batch_size, cfg.n_heads, cfg.head_dim,
                                          (cfg.l0_slots, cfg.l1_slots, cfg.l2_slots), device, dtype)
            layers.append(ls)
        return DNCState(layers, batch_size)

    def reconfigured(self, **changes) -> "DNC":
        """A new model with ``config.replace(**changes)`` and a copy of these weights, e.g. another
        ``segment_len`` or bank capacity (no weight's shape depends on them). Raises ConfigError
        naming the parameters when a change alters weight shapes."""
        model = DNC(self.config.replace(**changes))
        try:
            model.load_state_dict(self.state_dict())  # strict: torch names every mismatching tensor
        except RuntimeError as e:
            raise ConfigError(f"{changes} changes the shapes of the weights: {e}") from None
        return model.to(self.device)

    def enable_cuda_graphs(self, enabled: bool = True) -> "DNC":
        """Replay whole-segment inference steps as CUDA graphs (``dnc.cuda_graphs``): the same
        function, one launch per segment instead of ~1,000. Used by ``forward`` under ``no_grad`` in
        eval mode on CUDA for chunks that are one whole segment; everything else runs eagerly.
        The one-token decode steps of ``dnc.generate.BatchDecoder`` are replayed too, one graph per
        batch bucket (``dnc.cuda_graphs.DecodeGraphs``).
        Call again (or ``enable_cuda_graphs(False)``) after replacing parameter tensors.
        A shorthand for ``set_step_runner(SegmentGraphs(model))`` and ``set_decode_runner(DecodeGraphs(model))``."""
        from .cuda_graphs import DecodeGraphs, SegmentGraphs  # here, not at module level: they build on this module

        if enabled and self.config.forward_read:
            # the graphs do not capture the forward read yet: stay eager (slower, same numbers), so a
            # forward_read checkpoint still evaluates and serves on a GPU
            warnings.warn("forward_read has no CUDA-graph path yet: inference runs eagerly", stacklevel=2)
            enabled = False
        self.set_step_runner(SegmentGraphs(self) if enabled else None)
        self.set_decode_runner(DecodeGraphs(self) if enabled else None)
        return self

    def set_decode_runner(self, runner) -> "DNC":
        """Run the one-token decode steps of ``dnc.generate.BatchDecoder`` through ``runner`` (see
        ``decode_runner``); None = eager. A runner with a ``clear()`` method is cleared when replaced."""
        if self.decode_runner is not None and hasattr(self.decode_runner, "clear"):
            self.decode_runner.clear()
        self.decode_runner = runner
        return self

    def set_step_runner(self, runner) -> "DNC":
        """Run eligible whole-segment steps through ``runner`` (see ``step_runner``); None = eager.
        A runner with a ``clear()`` method (captured graphs) is cleared when replaced."""
        if self.step_runner is not None and hasattr(self.step_runner, "clear"):
            self.step_runner.clear()
        self.step_runner = runner
        return self

    @property
    def _segment_graphs(self):
        """The step runner under its old name (bench/model_speed.py reads it)."""
        return self.step_runner

    def segment_step(self, tokens: torch.Tensor, state: DNCState) -> tuple[torch.Tensor, dict]:
        """The model's step function: ``tokens [B, n]`` (n <= segment_len - state.seg_pos) through every
        block into ``state`` (updated in place), then, when the segment is full, its commit (bank
        writes, compression, eviction, the carried KV window). ``forward`` is a loop of these.

        Returns (logits [B, n, V], {"compressed": n, "evicted": n, "recon_terms": [scalar tensors]})."""
        n = tokens.shape[1]
        if n < 1 or n > self.config.segment_len - state.seg_pos:
            raise ValueError(f"a segment step takes 1..{self.config.segment_len - state.seg_pos} tokens "
                             f"(the rest of the segment), got {n}")
        logits, _ = self._forward_chunk(tokens, state, trace=False)
        stats = {"compressed": 0, "evicted": 0, "recon_terms": []}
        if state.seg_pos == self.config.segment_len:
            commit = self._commit_segment(state)
            stats = {"compressed": commit["compressed"], "evicted": commit["evicted"],
                     "recon_terms": commit["recon_terms"]}
        return logits, stats

    def commit_segment(self, state: DNCState) -> dict:
        """Commit ``state``'s full segment (``state.seg_pos == segment_len``): bank writes, compression,
        eviction, the carried KV window; what ``segment_step`` does at a segment's end. Used by
        ``dnc.ragged`` for a decode row that reached its boundary. Returns {"compressed", "evicted", ...}."""
        if state.seg_pos != self.config.segment_len:
            raise ValueError(f"only a full segment can be committed (segment position {state.seg_pos} of "
                             f"{self.config.segment_len})")
        return self._commit_segment(state)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, state: DNCState | None = None,
                return_state: bool = False, trace: bool = False, last_logits_only: bool = False,
                metrics: bool = True) -> DNCOutput:
        """tokens: [B, T] -> DNCOutput (logits [B, T, V], or [B, 1, V] with last_logits_only).

        ``metrics=False`` skips the memory statistics (they synchronise with the device), which
        generation does for every token."""
        cfg = self.config
        b, t_total = tokens.shape
        keep_state = state is not None or return_state
        if state is None:
            state = self.init_state(b, tokens.device)
        elif state.batch_size != b:
            raise ValueError(f"state was made for batch size {state.batch_size}, got tokens of batch {b}")
        logits, traces = [], []
        recon_terms = []
        counters = {"compressed": 0, "evicted": 0}
        t0 = 0
        runner = None if trace else self.step_runner
        while t0 < t_total:
            n = min(t_total - t0, cfg.segment_len - state.seg_pos)
            if runner is not None and runner.eligible(tokens[:, t0:t0 + n], state):
                lg, stats = runner.step(tokens[:, t0:t0 + n], state)  # forward + commit (one graph launch)
                logits.append(lg[:, -1:] if last_logits_only else lg)
                counters["compressed"] += stats["compressed"]
                counters["evicted"] += stats["evicted"]
                recon_terms += stats.get("recon_terms", [])  # training runners return them
                t0 += n
                continue
            lg, tr = self._forward_chunk(tokens[:, t0:t0 + n], state, trace)
            logits.append(lg[:, -1:] if last_logits_only else lg)
            if trace:
                traces = tr  # keep the last chunk's trace (shapes per chunk)
            t0 += n
            if state.seg_pos == cfg.segment_len:
                stats = self._commit_segment(state)
                recon_terms += stats["recon_terms"]
                counters["compressed"] += stats["compressed"]
                counters["evicted"] += stats["evicted"]
        if last_logits_only:
            logits = logits[-1:]
        logits = torch.cat(logits, 1) if len(logits) > 1 else logits[0]
        recon = sum(recon_terms[1:], recon_terms[0]) if recon_terms else tokens.new_zeros((), dtype=torch.float32)
        out = DNCOutput(logits=logits, recon_loss=recon, state=state if keep_state else None,
                        trace=traces if trace else None)
        if targets is not None:
            tgt = targets
            if loss_mask is not None:
                tgt = tgt.masked_fill(~loss_mask.bool(), -100)
            lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            # keep every parameter in the graph (DDP/FSDP require it even when nothing was compressed)
            # (one cat + one sum rather than a sum per parameter: fewer ops forward and backward)
            unused = [p.reshape(-1) for p in self._maybe_unused_params()]
            touch = torch.cat(unused).sum() * 0.0 if unused else 0.0
            out.lm_loss = lm
            out.loss = lm + cfg.recon_weight * recon + touch
        out.metrics = self._metrics(state, counters) if metrics else {}
        return out

    def _forward_chunk(self, tokens: torch.Tensor, state: DNCState, trace: bool):
        cfg = self.config
        b, n = tokens.shape
        x = self.embed(tokens)
        pos0 = state.layers[0].cache.length  # carried window + tokens of this segment so far
        cos, sin = rope_table_full(pos0 + n, cfg.head_dim, cfg.rope_theta, x.device)
        cos, sin = cos[pos0:], sin[pos0:]
        stride = max(1, cfg.segment_len // 64)  # salience statistics from a fixed subset of positions
        # chosen on the host (no device sync): positions p with p % stride == stride - 1
        first = (stride - 1 - state.seg_pos % stride) % stride
        sample = _positions(first, n, stride, x.device) if first < n else None
        traces = []
        for blk, ls in zip(self.blocks, state.layers):
            if blk.mem is not None and ls.view is None:
                ls.view = blk.mem.build_view(ls.bank)
            args = (x, ls.cache.k, ls.cache.v, cos, sin, ls.view, sample, cfg.mem_topk, ls.prev_x)
            kw = {}
            if blk.self_read:
                kw = {"self_past": self.pending_writes(blk, ls),
                      "write_prev": ls.write_buf[-1][:, -1:] if ls.write_buf else ls.prev_write}
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled() and not trace:
                x, k, v, mem_in, mass, info, ls.prev_x, self_kv = checkpoint(blk, *args, use_reentrant=False, **kw)
            else:
                x, k, v, mem_in, mass, info, ls.prev_x, self_kv = blk(*args, trace=trace, **kw)
            ls.cache = KVCache(k, v, ls.cache.carry_len)  # the block already concatenated past + new
            if self_kv is not None:
                ls.self_kv = self_kv
            if mem_in is not None:
                ls.write_buf.append(mem_in)
                if mass is not None:
                    ls.mass = mass if ls.mass is None else ls.mass + mass
            traces.append(info)
        state.seg_pos += n
        state.tokens_seen += n
        return self._logits(x), traces

    @staticmethod
    def pending_writes(blk: Block, ls: LayerState, keep: bool = True) -> torch.Tensor | None:
        """``config.self_read``: the write slots of ``ls``'s segment so far, keys and values
        [2, B, H, P, Dh] as ``blk.mem.write_kv_packed`` makes them (None at a segment start). The
        state's cache (``ls.self_kv``), or, for a state without it (imported, extracted from a
        decode batch, made by a model without ``self_read``), rebuilt from its pending memory
        inputs (and, with ``keep``, cached in ``ls``)."""
        if not ls.write_buf:
            return None
        kv = ls.self_kv
        if kv is None:
            h = torch.cat(ls.write_buf, 1) if len(ls.write_buf) > 1 else ls.write_buf[0]
            kv, _ = blk.mem.write_kv_packed(h, h_before=ls.prev_write)
            if keep:
                ls.self_kv = kv
        return kv

    def _commit_segment(self, state: DNCState) -> dict:
        """End of a segment: write memory layers' banks, carry the KV window, cut BPTT."""
        cfg = self.config
        recon_terms = []
        compressed = evicted = 0
        state.segments += 1
        cut = state.segments % cfg.bptt_segments == 0
        mem = [(blk, ls) for blk, ls in zip(self.blocks, state.layers) if blk.mem is not None]
        writes = []  # per memory layer: (kv [2,B,H,m,Dh], valid [B,m], recon queries or None)
        for blk, ls in mem:
            h = torch.cat(ls.write_buf, 1) if len(ls.write_buf) > 1 else ls.write_buf[0]
            if blk.self_read:  # the reads already made these slots: write the very tensors they read
                kv = self.pending_writes(blk, ls)
                valid = torch.ones(kv.shape[1], kv.shape[3], dtype=torch.bool, device=kv.device)
            else:
                kv, valid = blk.mem.write_kv_packed(h, h_before=ls.prev_write)
            ls.prev_write = h[:, -1:]
            rq = None
            if self.training and torch.is_grad_enabled():
                stride = max(1, h.shape[1] // 16)
                rq = blk.mem.queries(h[:, stride - 1::stride]).detach()
            writes.append((kv, valid, rq))
        write_kw = dict(compressors=self.compressors, policy=self.policy, protect_salient=cfg.protect_salient,
                        group=cfg.compress_group, importance_weight=cfg.write_importance)
        # per memory layer, its importance weights for every row of its bank: [B, 2, H, Dh] (None = off)
        imp_w = [blk.mem.importance_rows(state.batch_size) for blk, _ in mem]
        banks = [ls.bank for _, ls in mem]
        masses = [ls.mass for _, ls in mem]
        # All memory layers' banks have the same shape (same writes, same capacities), so they are
        # written as one bank of L*B rows: one set of bookkeeping/compression ops, not one per layer.
        group = StateBank.stack(banks) if len(banks) > 1 and len({m is None for m in masses}) == 1 else None
        if group is not None:
            group.apply_read_mass(None if masses[0] is None else torch.cat(masses, 0), cfg.salience_decay)
            rqs = [w[2] for w in writes]
            stats = group.write_packed(torch.cat([w[0] for w in writes], 1), torch.cat([w[1] for w in writes], 0),
                                       recon_queries=None if rqs[0] is None else torch.cat(rqs, 0),
                                       recon_groups=len(banks),
                                       importance_w=None if imp_w[0] is None else torch.cat(imp_w, 0), **write_kw)
            if rqs[0] is not None and stats["compressed"]:
                recon_terms.append(stats["recon_loss"])
            compressed += stats["compressed"] * len(banks)
            evicted += stats["evicted"] * len(banks)
            if cut:
                group.detach_()
            group.unstack(banks)
        else:
            for bank, mass, (kv, valid, rq), w in zip(banks, masses, writes, imp_w):
                bank.apply_read_mass(mass, cfg.salience_decay)
                stats = bank.write_packed(kv, valid, recon_queries=rq, importance_w=w, **write_kw)
                if rq is not None and stats["compressed"]:
                    recon_terms.append(stats["recon_loss"])
                compressed += stats["compressed"]
                evicted += stats["evicted"]
                if cut:
                    bank.detach_()
        for _, ls in mem:
            ls.write_buf, ls.mass, ls.view, ls.self_kv = [], None, None, None
        for ls in state.layers:
            # carry the last kv_window keys/values, moved into the next segment's position frame
            w = min(cfg.kv_window, ls.cache.length)
            if w:
                shift = ls.cache.length - w
                ls.cache = KVCache(rope_shift(ls.cache.k[:, :, -w:], shift, cfg.head_dim, cfg.rope_theta),
                                   ls.cache.v[:, :, -w:], w)
            else:
                ls.cache = KVCache(ls.cache.k[:, :, :0], ls.cache.v[:, :, :0], 0)
            if cut:
                ls.cache.detach_()
                if ls.prev_x is not None:
                    ls.prev_x = ls.prev_x.detach()
                if ls.prev_write is not None:
                    ls.prev_write = ls.prev_write.detach()
        state.seg_pos = 0
        recon = sum(recon_terms[1:], recon_terms[0]) if recon_terms else torch.zeros((), device=self.device)
        return {"recon_loss": recon, "recon_terms": recon_terms, "compressed": compressed, "evicted": evicted}

    def _maybe_unused_params(self) -> list:
        """Parameters a step may not use (compressors before any overflow; slot embeddings while
        the bank is empty; write projections when nothing written is read back in this step). DDP and FSDP need every parameter in the graph."""
        params = list(self.compressors.parameters())
        for blk in self.blocks:
            if blk.mem is not None:
                params += [blk.mem.level_emb, blk.mem.age_emb, blk.mem.sal_scale, blk.mem.k_write.weight,
                           blk.mem.v_write.weight]
                if blk.mem.importance_w is not None:
                    params.append(blk.mem.importance_w)
        return params

    @torch.no_grad()
    def _metrics(self, state: DNCState, counters: dict) -> dict:
        banks = state.banks()
        if not banks:
            return {}
        # every statistic stays on the device until one .tolist(): a single host sync per call
        stats = [torch.stack([v.float().sum(1).mean() for v in b.valid.split(b.sizes, 1)]) for _, b in banks]
        n_div = 0
        for _, bank in banks:
            lvl = bank.levels[0]
            if lvl.n >= 2:
                k = F.normalize(lvl.keys[0].float().permute(1, 0, 2).reshape(lvl.n, -1)[-256:], dim=-1)
                sim = k @ k.T
                n = sim.shape[0]
                stats.append((1.0 - (sim.sum() - n) / (n * (n - 1))).view(1))
                n_div += 1
        values = torch.cat(stats).tolist()
        m = {f"mem/slots_l{i}": sum(values[3 * j + i] for j in range(len(banks))) / len(banks) for i in range(3)}
        if n_div:
            m["mem/slot_diversity"] = sum(values[3 * len(banks):]) / n_div
        m["mem/compressions"] = float(counters["compressed"])
        m["mem/evictions"] = float(counters["evicted"])
        return m

    # ------------------------------------------------------------------ memory maintenance
    @torch.no_grad()
    def compact_state(self, state: DNCState, keep_l0: int = 0) -> dict:
        """Push L0 slots down the hierarchy through the compressors until at most ``keep_l0`` (rounded
        to the compress group) raw slots remain. Used off the request path by the memory manager.
        Returns {"compressed": n, "evicted": n}."""
        cfg = self.config
        g = cfg.compress_group
        moved = {"compressed": 0, "evicted": 0}
        for i, bank in state.banks():
            count = ((bank.levels[0].n - keep_l0) // g) * g
            stats = bank.compact(count, compressors=self.compressors, policy=self.policy,
                                 protect_salient=cfg.protect_salient, group=g,
                                 importance_w=self.blocks[i].mem.importance_rows(state.batch_size),
                                 importance_weight=cfg.write_importance, pending_mass=state.layers[i].mass)
            state.layers[i].mass = stats["pending_mass"]  # re-indexed for the new slot layout (issue 12)
            moved["compressed"] += stats["compressed"]
            moved["evicted"] += stats["evicted"]
            state.layers[i].view = None
        return moved

    # ------------------------------------------------------------------ generation
    def generate_stream(self, prompt_ids, state: DNCState | None = None, max_new_tokens: int = 64,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None) -> Iterator[int]:
        """Stream new token ids for one sequence (``dnc.generate.generate_stream``: the batched
        decode loop with one row). ``state`` is updated in place and afterwards holds the prompt and
        every emitted token."""
        return generate_stream(self, prompt_ids, state=state, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, generator=generator)

    def generate(self, prompt_ids, state: DNCState | None = None, **kw) -> list[int]:
        return list(self.generate_stream(prompt_ids, state=state, **kw))
