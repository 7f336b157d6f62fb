"""Ragged decode batches: rows of *different* state layouts decode one token each in one model call.

A :class:`RaggedBatch` holds up to ``capacity`` rows (a bucket: 1, 2, 4, ..., 64) in static,
preallocated tensors, so one decode step has the same shapes whatever each row holds:

- per layer, the KV cache ``k``/``v`` ``[C, H, Lmax, Dh]`` with ``Lmax = kv_window + segment_len``
  (the carried window plus a whole segment); row ``i`` uses positions ``0 .. length[i]-1`` and a
  mask hides the rest (``RaggedBatch.kv_attention = "flex"``: the attention reads only the KV
  blocks up to each row's length, so its cost follows the row's length, not ``Lmax``);
- per memory layer, the segment's *read view* of the row's bank (``MemoryRead.build_view``) padded to
  the bank's full capacity ``Smax = l0 + l1 + l2`` (+1 null slot): padding slots have zero keys and
  values and the invalid-slot bias (-1e4) in the bias channel, so their read weight is exactly 0;
  the read mass ``[C, Smax]`` and the segment's memory inputs ``write_h [C, segment_len, D]``;
- with ``DNCConfig.self_read``, the view has ``segment_len`` more slots after the bank's: the row's
  write slot of segment position ``j`` at ``Smax + 1 + j`` (augmented by ``MemoryRead.self_slots``,
  written by the step that reads it), hidden from the read until the row reaches ``j`` by a mask
  made from ``seg_pos``; ``write_prev [C, 1, D]`` is the memory input before the row's next token
  (its write key's token shift);
- per row on the device: ``length`` (KV length = carry + tokens of this segment, the new token's
  RoPE position), ``seg_pos`` (which positions feed the salience statistics, where the memory input
  goes) and ``active`` (0 for a free slot: its counters stay put and its outputs are ignored).

:func:`ragged_decode_step` is the one-token step over those tensors, in place, with no host
synchronisation: what ``dnc.cuda_graphs.DecodeGraphs`` captures per bucket (on CPU it runs eagerly).
``dnc.ragged_prefill`` steps the same tensors by up to T prompt tokens per row (admissions).
Every op is row-wise, and padding only adds terms of weight exactly 0, so each row gets what it
would get alone (up to float summation order: greedy tokens equal, logits ``assert_close``).

**Segment commits.** The bank is constant within a segment; it changes only when a row's segment is
full (write into L0, compress, evict, carry the KV window). That happens once per ``segment_len``
tokens of a row and changes the level sizes, so it is done outside the step, eagerly, for the rows
that reached their boundary: :meth:`RaggedBatch.extract` gives each as an ordinary batch-1
``DNCState``, the model's own commit runs on it (the very code every other path uses, so commits
cannot diverge), and :meth:`RaggedBatch.insert` puts it back with a rebuilt read view. Rows that
reach a boundary in the same step with equal layouts (sessions that started together) are stacked
and commit as one batch. Rows of different layouts commit one by one: a batched commit of those
would need a ragged compression cascade, and a commit inside the captured graph would need the
bank itself at full capacity with that ragged cascade; neither is worth it at one commit per row
per segment (for ``small``, one in 2,048 steps).

The banks themselves (and ``prev_write``, the last committed memory input) stay per row on the host
side, as ordinary ``StateBank`` objects: only commits read them. Shapes: C capacity (rows), H heads,
Dh head dim, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .attention import KVCache, LengthMask, kv_length_attention
from .layers import apply_rope_full, rope_table_full
from .memory import LEVELS, ReadView, StateBank
from .state import DNCState, LayerState

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Batch capacities decode steps are shaped (and captured) for; more rows use powers of two."""

PAD_BIAS = -1e4
"""Read bias of a padding slot: the value ``MemoryRead.build_view`` gives invalid slots."""


def bucket_for(n: int) -> int:
    """The smallest bucket holding ``n`` rows (powers of two past the last of :data:`BUCKETS`)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return 1 << (max(n, 1) - 1).bit_length()


@dataclass
class LayerBuffers:
    """One block's static decode tensors (see the module docstring)."""

    k: torch.Tensor                      # [C, H, Lmax, Dh]
    v: torch.Tensor                      # [C, H, Lmax, Dh]
    prev_x: torch.Tensor                 # [C, 1, D] normed attention input of each row's last token
    view_k: torch.Tensor | None = None   # [C, H, Smax+1(+L), Dq] augmented read keys (slot 0 = null slot;
    view_v: torch.Tensor | None = None   #   self_read: + segment_len write slots) and values
    mass: torch.Tensor | None = None     # [C, Smax] float32 read mass of the segment so far
    write_h: torch.Tensor | None = None  # [C, segment_len, D] normed memory inputs of the segment
    write_prev: torch.Tensor | None = None  # [C, 1, D] self_read: memory input of each row's last token
    succ_idx: torch.Tensor | None = None  # [C, Smax+1+L] long, forward_read: view index of each slot's successor (0 = none)


@dataclass
class RowMeta:
    """Host-side bookkeeping of one occupied slot (what the layout of its DNCState holds)."""

    seg_pos: int
    tokens_seen: int
    segments: int
    carry_len: list[int]                          # per layer
    banks: list[StateBank | None]                 # per layer (None: no memory)
    prev_write: list[torch.Tensor | None]         # per layer [1, 1, D]
    has_prev_x: list[bool]                        # per layer
    has_mass: list[bool]                          # per layer: DNCState.mass is a tensor (not None)
    slots: list[int] = field(default_factory=list)  # per layer: the bank's slot count S (0: no memory)
    settled: bool = False  # has_prev_x and has_mass are all True where they can be: after_step skips them


def _shallow_bank(bank: StateBank) -> StateBank:
    """A new StateBank object over the same tensors. The write path replaces a bank's tensors rather
    than editing them, so a commit on the copy leaves the original as it was."""
    new = StateBank.__new__(StateBank)
    new.capacities, new.clock, new.sizes = bank.capacities, bank.clock, list(bank.sizes)
    new.kv, new.meta, new.valid, new.alpha, new.clock_t = bank.kv, bank.meta, bank.valid, bank.alpha, bank.clock_t
    return new


class RaggedBatch:
    """Static decode tensors for up to ``capacity`` rows of any layouts, plus their host bookkeeping.

    ``insert(slot, state, logits)`` / ``extract(slot)`` move a batch-1 ``DNCState`` in and out;
    ``after_step()`` advances the host counters after :func:`ragged_decode_step` and commits the rows
    whose segment is full (``commit`` is the model's ``commit_segment``). ``tokens [C]`` is the step's
    input and ``logits [C, V]`` each row's next-token logits."""

    KV_ATTENTION = "masked"
    """Default :attr:`kv_attention` of new batches (the one-line switch once the H200 has measured "flex")."""

    KV_BLOCK = 128
    """Default :attr:`kv_block`."""

    def __init__(self, model, capacity: int, device=None, dtype=None, kv_attention: str | None = None):
        cfg = model.config
        self.capacity = c = int(capacity)
        self.device = torch.device(device or model.device)
        self.dtype = dtype or model.embed.weight.dtype
        self.max_len = cfg.kv_window + cfg.segment_len
        self.segment_len = cfg.segment_len
        self.stride = max(1, cfg.segment_len // 64)  # as DNC._forward_chunk samples salience positions
        dev, dt, h, dh, d = self.device, self.dtype, cfg.n_heads, cfg.head_dim, cfg.d_model
        self.layers: list[LayerBuffers] = []
        for blk in model.blocks:
            lb = LayerBuffers(torch.zeros(c, h, self.max_len, dh, device=dev, dtype=dt),
                              torch.zeros(c, h, self.max_len, dh, device=dev, dtype=dt),
                              torch.zeros(c, 1, d, device=dev, dtype=dt))
            if blk.mem is not None:
                # self_read: the segment's own write slots follow the bank's in the view
                smax, dq = cfg.bank_slots, blk.mem.aug_dim
                n_view = smax + 1 + (cfg.segment_len if cfg.self_read else 0)
                lb.view_k = torch.zeros(c, h, n_view, dq, device=dev, dtype=dt)
                lb.view_v = torch.zeros(c, h, n_view, dq, device=dev, dtype=dt)
                lb.mass = torch.zeros(c, smax, device=dev, dtype=torch.float32)
                lb.write_h = torch.zeros(c, cfg.segment_len, d, device=dev, dtype=dt)
                if cfg.self_read:
                    lb.write_prev = torch.zeros(c, 1, d, device=dev, dtype=dt)
                if cfg.forward_read:
                    lb.succ_idx = torch.zeros(c, n_view, dtype=torch.long, device=dev)
            self.layers.append(lb)
        self.smax = cfg.bank_slots
        self.self_read = bool(cfg.self_read and cfg.memory)
        self.aug_dim = next((b.mem.aug_dim for b in model.blocks if b.mem is not None), 0)  # Dq
        # view slot index of every key (self_read): bank slots 0..Smax, then segment positions
        self.view_pos = torch.arange(self.smax + 1 + cfg.segment_len, device=dev) if self.self_read else None
        # forward_read: 1 for a row whose next token has a previous one (0 at the stream start)
        self.fwd_on = torch.zeros(c, device=dev) if self.self_read and cfg.forward_read else None
        self.length = torch.zeros(c, dtype=torch.long, device=dev)
        self.seg_pos = torch.zeros(c, dtype=torch.long, device=dev)
        self.active = torch.zeros(c, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(c, dtype=torch.long, device=dev)
        self.logits = torch.zeros(c, cfg.vocab_size, device=dev, dtype=torch.float32)
        # constants the step reads (made here, not in the step: a captured graph must not allocate them)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.sample0 = torch.zeros(1, dtype=torch.long, device=dev)
        self.row_ids = torch.arange(c, device=dev)
        self.has_memory = any(lb.mass is not None for lb in self.layers)
        self.mass_gather = True
        """The read mass of a step for its rows at a salience position only (:meth:`mass_rows`);
        False: for every row, every step, as before (A/B in ``bench/decode_bytes.py``)."""
        self.kv_attention = kv_attention or self.KV_ATTENTION
        """How the decode step attends over the KV cache: "masked" (SDPA over all ``Lmax`` keys with a
        boolean mask; every row costs ``Lmax``) or "flex" (``flex_attention`` with a block mask of
        each row's own length: a row reads ``ceil((length+1) / kv_block)`` blocks; see
        :func:`dnc.attention.kv_length_attention`). Set it before the batch's first step: a captured
        step keeps the choice it was captured with (``DecodeGraphs`` keys on it)."""
        self.kv_block = self.KV_BLOCK
        """KV block of the "flex" path (tokens): flex's default sparse block; tests use smaller ones."""
        self._length_mask: LengthMask | None = None
        self.rows: list[RowMeta | None] = [None] * c
        self._level_ids = torch.zeros(self.smax, dtype=torch.long, device=dev)  # ReadView.levels (trace only)

    def length_mask(self) -> LengthMask:
        """The "flex" path's block-mask builder over ``length`` (made once: its constants must exist
        before a capture, and its mask_mod stays one function object, so a compiled flex_attention
        is not traced again per step)."""
        kb = self.kv_block
        if isinstance(kb, bool) or not isinstance(kb, int) or kb < 1:  # (a bool is an int)
            raise ValueError(f"kv_block must be an int >= 1 (tokens per flex KV block), got {kb!r}")
        lm = self._length_mask
        if lm is None or lm.block != kb:
            lm = self._length_mask = LengthMask(self.length, self.max_len, kb)
        return lm

    # ------------------------------------------------------------------ slots
    @property
    def n_active(self) -> int:
        return sum(r is not None for r in self.rows)

    def mass_rows(self) -> int:
        """Rows whose read mass the next :func:`ragged_decode_step` computes (host bookkeeping, no
        device read): 0 when no occupied row is at a salience position (``seg_pos % stride ==
        stride - 1``, one position in ``stride``), else the power of two >= those rows, or the
        whole capacity when that is as many (or ``mass_gather`` is off). The mass reads each row's
        whole view in float32 (small, bf16: 2 memory layers x ~20 MB a row, more than the read
        itself), and a row keeps it one step in ``stride`` (32 for small): rows at other positions
        dropped it (``mass * sampled``). A captured step is shaped by this count (one graph per
        value: ``DecodeGraphs``)."""
        if not self.has_memory:
            return 0
        if not self.mass_gather:
            return self.capacity
        n = sum(1 for m in self.rows if m is not None and m.seg_pos % self.stride == self.stride - 1)
        if n == 0:
            return 0
        return min(1 << (n - 1).bit_length(), self.capacity)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    def views(self) -> list[ReadView | None]:
        """Per layer, the padded read view as ``MemoryRead.forward`` takes it (None: no memory)."""
        return [None if lb.view_k is None else ReadView(lb.view_k, lb.view_v, self._level_ids, self.smax)
                for lb in self.layers]

    @torch.no_grad()
    def insert(self, slot: int, state: DNCState, logits: torch.Tensor, model) -> None:
        """Put batch-1 ``state`` into free ``slot`` with its next-token ``logits [V]``. The state's
        tensors are copied; its banks are shared read-only (commits replace a bank's tensors)."""
        if state.batch_size != 1:
            raise ValueError(f"a ragged batch takes batch-1 states, got batch {state.batch_size}")
        if state.seg_pos >= self.segment_len:
            raise ValueError(f"a state at segment position {state.seg_pos} must be committed first")
        meta = RowMeta(state.seg_pos, state.tokens_seen, state.segments, [], [], [], [], [], [])
        length = state.layers[0].cache.length
        pad = None
        for blk, lb, ls in zip(model.blocks, self.layers, state.layers):
            n = ls.cache.length
            if n != length or n > self.max_len:
                raise ValueError(f"KV cache lengths {n} / {length} do not fit a decode batch (at most {self.max_len})")
            lb.k[slot].zero_()  # stale rows past the length are masked, but 0 * NaN would not be
            lb.v[slot].zero_()
            lb.k[slot, :, :n] = ls.cache.k[0]
            lb.v[slot, :, :n] = ls.cache.v[0]
            meta.carry_len.append(ls.cache.carry_len)
            meta.has_prev_x.append(ls.prev_x is not None)
            if ls.prev_x is not None:
                lb.prev_x[slot] = ls.prev_x[0]
            else:
                lb.prev_x[slot].zero_()  # the stream start: a zero input gives the zero key shift
            if blk.mem is None:
                meta.banks.append(None)
                meta.prev_write.append(None)
                meta.has_mass.append(False)
                meta.slots.append(0)
                continue
            bank = _shallow_bank(ls.bank)
            view = blk.mem.build_view(bank)  # [1, H, S+1, Dq]
            s = view.n_slots
            if s > self.smax:
                raise ValueError(f"a bank of {s} slots does not fit the model's capacity {self.smax}")
            if pad is None or pad.shape[-1] != lb.view_k.shape[-1]:
                pad = torch.zeros(lb.view_k.shape[-1], device=self.device, dtype=self.dtype)
                pad[model.config.head_dim + LEVELS] = PAD_BIAS
            lb.view_k[slot, :, :s + 1] = view.keys[0]
            lb.view_k[slot, :, s + 1:] = pad
            lb.view_v[slot, :, :s + 1] = view.values[0]
            lb.view_v[slot, :, s + 1:].zero_()
            if lb.succ_idx is not None:
                lb.succ_idx[slot] = successor_index(view.sizes, self.smax, self.segment_len).to(self.device, non_blocking=True)
            lb.mass[slot].zero_()
            if ls.mass is not None:
                lb.mass[slot, :s] = ls.mass[0]
            h = None
            if ls.write_buf:
                h = torch.cat(ls.write_buf, 1) if len(ls.write_buf) > 1 else ls.write_buf[0]
                lb.write_h[slot, :h.shape[1]] = h[0]
            if lb.write_prev is not None:
                self._insert_writes(slot, blk, lb, ls, h, model)
            meta.banks.append(bank)
            meta.prev_write.append(ls.prev_write)
            meta.has_mass.append(ls.mass is not None)
            meta.slots.append(s)
        self.length[slot] = length
        self.seg_pos[slot] = state.seg_pos
        if self.fwd_on is not None:
            self.fwd_on[slot] = 1.0 if state.tokens_seen else 0.0
        self.active[slot] = 1
        self.logits[slot] = logits.reshape(-1).float()
        self.rows[slot] = meta

    def _insert_writes(self, slot: int, blk, lb: LayerBuffers, ls: LayerState, h, model) -> None:
        """self_read: the row's write slots of the segment so far into the view after the bank's
        (the rest zeroed: masked, but 0 * NaN would not be), and its last memory input."""
        first = self.smax + 1
        lb.view_k[slot, :, first:].zero_()
        lb.view_v[slot, :, first:].zero_()
        kv = model.pending_writes(blk, ls, keep=False)  # [2, 1, H, n, Dh] (the caller's state stays as it was)
        if kv is not None:
            keys, vals = blk.mem.self_slots(kv, self.dtype)
            n = kv.shape[3]
            lb.view_k[slot, :, first:first + n] = keys[0]
            lb.view_v[slot, :, first:first + n] = vals[0]
        if h is not None:
            lb.write_prev[slot] = h[0, -1:]
        elif ls.prev_write is not None:
            lb.write_prev[slot] = ls.prev_write[0]
        else:
            lb.write_prev[slot].zero_()  # the stream start: a zero input gives the zero key shift

    @torch.no_grad()
    def extract(self, slot: int) -> DNCState:
        """The row in ``slot`` as an ordinary batch-1 ``DNCState`` (new tensors; the slot stays)."""
        meta = self.rows[slot]
        length = int(meta.carry_len[0]) + meta.seg_pos
        layers = []
        for i, lb in enumerate(self.layers):
            ls = LayerState(KVCache(lb.k[slot:slot + 1, :, :length].clone(), lb.v[slot:slot + 1, :, :length].clone(),
                                    meta.carry_len[i]))
            if meta.has_prev_x[i]:
                ls.prev_x = lb.prev_x[slot:slot + 1].clone()
            if meta.banks[i] is not None:
                ls.bank = _shallow_bank(meta.banks[i])
                ls.prev_write = meta.prev_write[i]
                if meta.seg_pos:  # (self_read: the model rebuilds the write slots from these)
                    ls.write_buf = [lb.write_h[slot:slot + 1, :meta.seg_pos].clone()]
                if meta.has_mass[i]:
                    ls.mass = lb.mass[slot:slot + 1, :meta.slots[i]].clone()
            layers.append(ls)
        return DNCState(layers, 1, meta.seg_pos, meta.tokens_seen, meta.segments)

    def release(self, slot: int) -> None:
        """Free ``slot`` (its tensors stay; the step ignores it)."""
        self.rows[slot] = None
        self.active[slot] = 0
        self.length[slot] = 0
        self.seg_pos[slot] = 0

    # ------------------------------------------------------------------ after a step
    def after_step(self, model) -> dict:
        """Host bookkeeping of one :func:`ragged_decode_step`: every occupied row took one token.
        Plain Python (no device sync) unless a row's segment is now full: those rows are committed
        (alone, eagerly: see the module docstring), which reads their tensors.
        Returns {"compressed": n, "evicted": n, "committed": rows}."""
        stats = {"compressed": 0, "evicted": 0, "committed": 0}
        full = []
        for slot, meta in enumerate(self.rows):
            if meta is None:
                continue
            if not meta.settled:  # a row's first tokens after insert: O(layers) once, then O(1) per step
                sampled = meta.seg_pos % self.stride == self.stride - 1
                for i in range(len(self.layers)):
                    meta.has_prev_x[i] = True
                    if sampled and meta.slots[i]:
                        meta.has_mass[i] = True
                meta.settled = all(h or not s for h, s in zip(meta.has_mass, meta.slots))
            meta.seg_pos += 1
            meta.tokens_seen += 1
            if meta.seg_pos == self.segment_len:
                full.append(slot)
        return self.commit_rows(model, full, stats)

    def commit_rows(self, model, full: list[int], stats: dict | None = None) -> dict:
        """Commit the rows in slots ``full`` (their host ``seg_pos`` is ``segment_len``): each is
        extracted, committed by the model (``commit`` is its ``commit_segment``) and put back with
        a rebuilt read view. Adds to ``stats`` {"compressed", "evicted", "committed"} and returns it."""
        stats = {"compressed": 0, "evicted": 0, "committed": 0} if stats is None else stats
        # rows whose states share a layout (e.g. sessions that started together) commit as one batch:
        # the commit is row-wise, so that is each row's own commit in fewer ops
        groups: dict[tuple, list[tuple[int, DNCState]]] = {}
        for slot in full:
            state = self.extract(slot)
            groups.setdefault(state.layout(), []).append((slot, state))
        for members in groups.values():
            state = members[0][1] if len(members) == 1 else DNCState.stack([st for _, st in members])
            c = model.commit_segment(state)
            # the model counts slot positions per bank, the same for every row of a batch: counted per row here
            stats["compressed"] += c["compressed"] * len(members)
            stats["evicted"] += c["evicted"] * len(members)
            stats["committed"] += len(members)
            for j, (slot, _) in enumerate(members):
                logits = self.logits[slot].clone()
                self.rows[slot] = None
                self.insert(slot, state if len(members) == 1 else state.select([j]), logits, model)
        return stats

    def clone_row(self, src: int, dst: list[int]) -> None:
        """Copies of the row in slot ``src`` into free slots ``dst`` (see :meth:`clone_rows_to`)."""
        self.clone_rows_to(self, [src] * len(dst), dst)

    def clone_rows_to(self, other: "RaggedBatch", src: list[int], dst: list[int]) -> None:
        """Copies of the rows in slots ``src`` of this batch into free slots ``dst`` of ``other`` (this
        batch or another of the same model; the source rows stay): one index copy per tensor
        whatever the number of rows (``insert`` is a few dozen ops per row), e.g. many fresh rows
        admitted together from one template row. The copies share the rows' banks read-only, as
        ``insert`` does. No host sync (the slot indices go up without waiting for the device)."""
        if not dst:
            return
        one = len(set(src)) == 1  # one source row (a template): broadcast it, no gather
        di = upload(dst, other.device)
        si = None if one else upload(src, self.device)
        for a, b in zip(self.layers, other.layers):
            for name in self._ROW_TENSORS:
                t = getattr(a, name)
                if t is not None:
                    _copy_rows(getattr(b, name), di, t, src[0] if one else si, len(dst))
        for name in ("length", "seg_pos", "active", "logits") + (("fwd_on",) if self.fwd_on is not None else ()):
            _copy_rows(getattr(other, name), di, getattr(self, name), src[0] if one else si, len(dst))
        for s, d in zip(src, dst):
            m = self.rows[s]
            other.rows[d] = RowMeta(m.seg_pos, m.tokens_seen, m.segments, list(m.carry_len),
                                    [None if b is None else _shallow_bank(b) for b in m.banks], list(m.prev_write),
                                    list(m.has_prev_x), list(m.has_mass), list(m.slots), m.settled)

    _ROW_TENSORS = ("k", "v", "prev_x", "view_k", "view_v", "mass", "write_h", "write_prev", "succ_idx")

    def copy_rows_to(self, other: "RaggedBatch", src: list[int], dst: list[int]) -> None:
        """Move the rows in slots ``src`` of this batch to free slots ``dst`` of ``other`` (a batch of
        the same model, e.g. another bucket); the source slots are freed."""
        if not src:
            return
        si = upload(src, self.device)  # (no host sync: see upload)
        di = upload(dst, other.device)
        for a, b in zip(self.layers, other.layers):
            for name in self._ROW_TENSORS:
                t = getattr(a, name)
                if t is not None:
                    _copy_rows(getattr(b, name), di, t, si, len(dst))
        for name in ("length", "seg_pos", "active", "logits") + (("fwd_on",) if self.fwd_on is not None else ()):
            _copy_rows(getattr(other, name), di, getattr(self, name), si, len(dst))
        for s, d in zip(src, dst):
            other.rows[d] = self.rows[s]
            self.rows[s] = None
        for name in ("active", "length", "seg_pos"):  # release(src): one op per tensor for all rows
            getattr(self, name).index_fill_(0, si, 0)


def upload(data: Sequence, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``torch.tensor(data, dtype)`` on ``device`` without a host sync. ``torch.tensor(data,
    device=cuda)`` copies from pageable memory and then waits for the stream, i.e. for every queued
    decode step; a non-blocking copy only stages the bytes (the host tensor may then go)."""
    t = torch.tensor(data, dtype=dtype)
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def _copy_rows(dst: torch.Tensor, di: torch.Tensor, src: torch.Tensor, si, n: int) -> None:
    """``dst[di] = src[si]`` as one index copy (``si`` an int: that row broadcast to ``n`` rows)."""
    rows = src[si:si + 1].expand(n, *src.shape[1:]) if isinstance(si, int) else src.index_select(0, si)
    dst.index_copy_(0, di, rows.to(dst.dtype))


def ragged_decode_step(model, batch: RaggedBatch) -> torch.Tensor:
    """One token for every row of ``batch``: ``batch.tokens [C]`` through every block, into the
    batch's tensors in place (KV at each row's ``length``, its memory input at ``seg_pos``, the read
    mass of sampled positions, ``prev_x``; ``length``/``seg_pos`` += ``active``). Static shapes and
    no host synchronisation, so it can be captured as a CUDA graph. Free slots compute garbage that
    nothing reads. Returns the next-token logits ``[C, V]`` float32 (a new tensor).
    The host side (:meth:`RaggedBatch.after_step`) must follow: it commits a row whose segment is
    full, and a step over an uncommitted full row (KV length ``Lmax``) indexes the RoPE table, the KV
    cache and ``write_h`` out of range (on CUDA a device-side assert that poisons the context)."""
    cfg = model.config
    c, h, dh = batch.capacity, cfg.n_heads, cfg.head_dim
    x = model.embed(batch.tokens).unsqueeze(1)                                      # [C, 1, D]
    d = x.shape[-1]
    cos_t, sin_t = rope_table_full(batch.max_len, dh, cfg.rope_theta, x.device)
    cos = cos_t.index_select(0, batch.length).view(c, 1, 1, dh)                     # each row at its position
    sin = sin_t.index_select(0, batch.length).view(c, 1, 1, dh)
    if batch.kv_attention == "masked":
        visible = batch.key_pos.view(1, 1, 1, -1) <= batch.length.view(c, 1, 1, 1)  # [C, 1, 1, Lmax]
    elif batch.kv_attention == "flex":  # a BlockMask of each row's length, shared by every layer
        visible = batch.length_mask().block_mask()
    else:
        raise ValueError(f"kv_attention must be 'masked' or 'flex', got {batch.kv_attention!r}")
    kv_at = batch.length.view(c, 1, 1, 1).expand(c, h, 1, dh)
    sampled = (batch.seg_pos % batch.stride == batch.stride - 1).view(c, 1)         # salience positions
    sample, mass_idx, mass_on = _mass_rows(batch, sampled)
    write_at = batch.seg_pos.view(c, 1, 1).expand(c, 1, d)
    self_mask = self_at = None
    if batch.self_read:
        # a row reads the bank and its writes up to its own position (this token's included)
        self_pos = (batch.smax + 1 + batch.seg_pos).view(c, 1, 1, 1)
        self_mask = batch.view_pos.view(1, 1, 1, -1) <= self_pos                   # [C, 1, 1, Smax+1+L]
        self_at = self_pos.expand(c, h, 1, batch.aug_dim)
    prev_mask = None
    if batch.fwd_on is not None:  # forward_read: the previous position's read (writes up to seg_pos - 1)
        prev_mask = batch.view_pos.view(1, 1, 1, -1) < self_pos
    for blk, lb, view in zip(model.blocks, batch.layers, batch.views()):
        xn = blk.attn_norm(x)
        x = x + _attend(blk.attn, xn, lb, cos, sin, visible, kv_at)
        if blk.mem is not None:
            mem_in = blk.mem_norm(x)
            if self_mask is not None:  # this token's write slot, as the commit will write it
                kv, _ = blk.mem.write_kv_packed(mem_in, h_before=lb.write_prev)      # [2, C, H, 1, Dh]
                keys, vals = blk.mem.self_slots(kv, lb.view_k.dtype)                  # [C, H, 1, Dq]
                lb.view_k.scatter_(2, self_at, keys)
                lb.view_v.scatter_(2, self_at, vals)
            fwd_view = h_prev = None
            if prev_mask is not None:  # successors gathered after this token's slot is in the view
                n_view = lb.view_v.shape[2]
                succ = lb.view_v.gather(2, lb.succ_idx.view(c, 1, n_view, 1).expand(c, h, n_view, batch.aug_dim))
                fwd_view, h_prev = (succ, prev_mask, batch.fwd_on), lb.write_prev.clone()
            if self_mask is not None:
                lb.write_prev.copy_(mem_in)
            m, mass, _ = blk.mem(mem_in, view, sample, cfg.mem_topk, mask=self_mask, h_prev=h_prev,
                                 fwd_view=fwd_view, mass_rows=mass_idx)
            x = x + m
            if mass_idx is not None:  # M rows: a padding entry adds exactly +0.0 (where, not a product: no 0 * inf)
                lb.mass.index_add_(0, mass_idx, torch.where(mass_on, mass, 0.0))
            elif mass is not None:
                lb.mass.add_(mass * sampled)
            lb.write_h.scatter_(1, write_at, mem_in.to(lb.write_h.dtype))
        x = x + blk.ffn(blk.ffn_norm(x))
        lb.prev_x.copy_(xn)
    batch.length.add_(batch.active)
    batch.seg_pos.add_(batch.active)
    if batch.fwd_on is not None:
        batch.fwd_on.fill_(1.0)  # every row's next token has a previous one
    return model._logits(x)[:, 0].float()


def _mass_rows(batch: RaggedBatch, sampled: torch.Tensor):
    """The read-mass rows of a step (see :meth:`RaggedBatch.mass_rows`): (sample positions or None,
    row indices [M] or None, rows on [M, 1] bool or None). None, None, None: no row keeps a mass
    this step; (sample0, None, None): every row's, kept where ``sampled`` (the rule before). Else
    the M rows are found on the device with static shapes (no sync; capturable): the rows at a
    salience position first, in slot order, then padding entries (row 0, off)."""
    m = batch.mass_rows()
    if m == 0:
        return None, None, None
    c = batch.capacity
    if m >= c:
        return batch.sample0, None, None
    on = sampled.view(c) & (batch.active > 0)                                       # [C] (free slots never)
    # each sampled row's rank among them; the others go to a spare entry M that is cut off
    # (the host counted the sampled rows: at most M)
    dest = torch.where(on, on.long().cumsum(0) - 1, m).clamp_max(m)
    idx = torch.zeros(m + 1, dtype=torch.long, device=batch.device).scatter_(0, dest, batch.row_ids)[:m]
    keep = torch.zeros(m + 1, dtype=torch.bool, device=batch.device).scatter_(0, dest, on)[:m]
    return batch.sample0, idx, keep.view(m, 1)


def successor_index(sizes: tuple[int, ...], smax: int, seg_len: int) -> torch.Tensor:
    """forward_read over a ragged view ``[null | bank (levels ``sizes``) | padding to Smax | seg_len
    write slots]``: LongTensor [Smax+1+seg_len], the view index of each slot's successor, 0 (the
    null slot, whose value is zero) for none: the map ``dnc.memory.read.successor_values`` applies
    to a view without padding (L0's last -> the first write slot; last of L1, L2, the writes -> none)."""
    idx = [0]
    first_write = smax + 1
    a = 1
    for i, n in enumerate(sizes):
        idx += list(range(a + 1, a + n)) + ([first_write if i == 0 else 0] if n else [])
        a += n
    idx += [0] * (smax + 1 - a)                                               # padding slots
    idx += list(range(first_write + 1, first_write + seg_len)) + [0]
    return torch.tensor(idx, dtype=torch.long)


def _attend(attn, xn: torch.Tensor, lb: LayerBuffers, cos, sin, visible, kv_at) -> torch.Tensor:
    """``LocalAttention.forward`` for one token per row over the padded cache (keys past a row's
    length masked out).
    xn: [C, 1, D] -> update [C, 1, D]; writes the token's key/value into ``lb.k``/``lb.v``."""
    b, _, d = xn.shape
    q, k, v = attn.qkv(xn).view(b, 1, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if attn.key_shift:  # tied token shift: + the query projection of the row's previous token
        k = k + attn.qkv(lb.prev_x)[..., :d].view(b, 1, attn.n_heads, attn.head_dim).transpose(1, 2).to(q.dtype)
    q, k = apply_rope_full(torch.stack([q, k]), cos, sin).unbind(0)
    lb.k.scatter_(2, kv_at, k.to(lb.k.dtype))
    lb.v.scatter_(2, kv_at, v.to(lb.v.dtype))
    if isinstance(visible, torch.Tensor):
        # one fused kernel over the static Lmax keys (the eager decode branch uses plain matmuls only
        # because a fused kernel plans anew for every key length; here the length never changes)
        y = F.scaled_dot_product_attention(q, lb.k.to(q.dtype), lb.v.to(q.dtype), attn_mask=visible)  # [C, H, 1, Dh]
    else:  # kv_attention="flex": a BlockMask; each row reads only its own length's blocks
        y = kv_length_attention(q, lb.k.to(q.dtype), lb.v.to(q.dtype), visible)             # [C, H, 1, Dh]
    return attn.dropout(attn.out(y.transpose(1, 2).reshape(b, 1, d)))
