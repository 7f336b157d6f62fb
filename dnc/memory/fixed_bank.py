"""Fixed-capacity StateBank layout: the bank's write as one static-shape function (for ``torch.compile``).

A :class:`~dnc.memory.bank.StateBank` stores each level with exactly as many slot positions as it
holds, so its tensors grow while the bank fills and the host plans every write from the level
sizes. A compiled segment step would see a new shape (a recompile) after every write until the bank
is full. Here every level always has its *capacity* of positions; the slots a level holds are the
last ``fill[i]`` of its positions, in write order (oldest first), and the positions before them are
empty (``valid`` False, so reads give them exactly zero weight). Shapes never change, so one
compiled graph serves every segment, fresh bank or full.

What a write drops is decided as in ``StateBank._cascade``: L0/L1 compress their lowest-keep-score
slots 2:1 into the next level, L2 evicts by the policy. On the host, :class:`FixedLayout` runs the
bank's own overflow plan (``StateBank._plan``) on the fill counts; for the layouts this supports,
a level's drop is always either nothing or one fixed count ``drops[i]``, so a write is a fixed-shape
function of three on/off flags (a device tensor, no recompile). The numbers are those of the
packed bank up to float summation order (``tests/test_compile_segment.py`` compares them).

Needs every stored slot to be valid (true in training: segment writes are never masked); the
merge/compaction paths of serving keep the packed layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .bank import LEVELS, META_FIELDS, StateBank, _meta_constants


@dataclass(frozen=True)
class FixedLayout:
    """Static shape facts of a fixed-capacity bank and its per-segment write.

    capacities: slots per level (C0, C1, C2); incoming: slots one whole segment writes into L0;
    drops: slots a level gives up when it overflows (L0/L1: compressed 2:1 into the next level;
    L2: evicted); group: the compressor's group size."""

    capacities: tuple[int, int, int]
    incoming: int
    drops: tuple[int, int, int]
    group: int

    @property
    def received(self) -> tuple[int, int, int]:
        """Slots each level receives when the level above it drops: (incoming, D0/2, D1/2)."""
        return (self.incoming, self.drops[0] // 2, self.drops[1] // 2)

    @property
    def slots(self) -> int:
        return sum(self.capacities)

    @staticmethod
    def plan(fill, capacities, incoming: int, group: int) -> list[int]:
        """Slots each level drops when a segment of ``incoming`` slots is written into a bank whose
        levels hold ``fill`` slots: the packed bank's own plan (``StateBank._plan``)."""
        drop, _ = StateBank._plan(SimpleNamespace(sizes=list(fill), capacities=tuple(capacities)),
                                  incoming, 0, 0, group)
        return drop

    @classmethod
    def for_bank(cls, capacities, incoming: int, group: int) -> "FixedLayout":
        """The layout of a bank with ``capacities`` that takes ``incoming`` slots per segment.

        Runs the overflow plan from an empty bank until the fill counts repeat. Raises ValueError
        when a level would drop different non-zero counts on different segments, or L2 would evict
        before it is full (capacities that are not multiples of what a level receives): a
        fixed-shape write cannot express those."""
        caps = tuple(int(c) for c in capacities)
        fill = (0, 0, 0)
        seen, drops = set(), [0, 0, 0]
        while fill not in seen:
            seen.add(fill)
            drop = cls.plan(fill, caps, incoming, group)
            for i, d in enumerate(drop):
                if d and drops[i] and d != drops[i]:
                    raise ValueError(f"bank capacities {caps} with {incoming} slots per segment: level {i} "
                                     f"drops {drops[i]} slots on one write and {d} on another; a fixed-shape "
                                     f"write needs capacities that are multiples of what each level receives")
                drops[i] = drops[i] or d
            if drop[2] and fill[2] != caps[2]:
                raise ValueError(f"bank capacities {caps} with {incoming} slots per segment: L2 evicts while "
                                 f"it holds {fill[2]} of {caps[2]} slots; make l2_slots a multiple of what it receives")
            fill = cls.next_fill(fill, drop, caps, incoming)
        return cls(caps, incoming, tuple(drops), group)

    @staticmethod
    def next_fill(fill, drop, capacities, incoming: int) -> tuple[int, int, int]:
        recv = (incoming, drop[0] // 2, drop[1] // 2)
        return tuple(min(c, n - d + r) for n, d, r, c in zip(fill, drop, recv, capacities))

    def step(self, fill) -> tuple[tuple[bool, bool, bool], tuple[int, int, int], int, int]:
        """Host bookkeeping of one segment's write: (which levels drop, the new fill counts,
        slots compressed, slots evicted). Raises RuntimeError off the supported plan."""
        drop = self.plan(fill, self.capacities, self.incoming, self.group)
        if any(d not in (0, D) for d, D in zip(drop, self.drops)):
            raise RuntimeError(f"fixed-capacity bank with fill {tuple(fill)} would drop {drop}, not 0 or {self.drops}")
        flags = tuple(bool(d) for d in drop)
        return flags, self.next_fill(fill, drop, self.capacities, self.incoming), drop[0] + drop[1], drop[2]


def pad_bank(bank: StateBank, layout: FixedLayout) -> list[int]:
    """Convert ``bank`` in place to the fixed-capacity layout (each level right-aligned in its
    capacity, empty positions invalid and zero). Returns its fill counts (the old level sizes).
    Raises ValueError when a stored slot is invalid (the layout's fill counts would be wrong)."""
    fill = list(bank.sizes)
    if bank.valid.numel() and not bool(bank.valid.all()):  # (a fresh bank: no device sync)
        raise ValueError("a fixed-capacity bank needs every stored slot valid (a training bank)")
    levels = []
    for lvl, n, cap in zip(bank.levels, fill, layout.capacities):
        pad = cap - n
        if pad < 0:
            raise ValueError(f"a level holds {n} slots, more than its capacity {cap}")
        if pad:
            b, h, _, d = lvl.keys.shape
            z = lvl.keys.new_zeros(b, h, pad, d)
            m = lvl.salience.new_zeros(b, pad)
            empty = type(lvl)(z, z, m, m, m, m, lvl.valid.new_zeros(b, pad))
            lvl = type(lvl).cat(empty, lvl)
        levels.append(lvl)
    alpha, clock_t = bank.alpha, bank.clock_t
    bank.levels = levels  # repacks kv/meta/valid and sets sizes = capacities
    bank.alpha, bank.clock_t = alpha, clock_t
    bank._group = None
    return fill


@functools.lru_cache(maxsize=64)
def _drop_flags(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """Bool [3] device constant for a tuple of per-level drop flags (made once per pattern)."""
    return torch.tensor(flags, dtype=torch.bool).to(device)


def drop_flags(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """The per-level drop flags of :meth:`FixedLayout.step` as a cached bool [3] device tensor."""
    return _drop_flags(tuple(flags), torch.device(device))


def _packed(**tensors) -> StateBank:
    """A bare StateBank holding just ``tensors`` (to call its packed-storage methods; dynamo traces it)."""
    bank = StateBank.__new__(StateBank)
    for name, t in tensors.items():
        setattr(bank, name, t)
    return bank


def apply_read_mass_fixed(meta: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor, clock_t: torch.Tensor,
                          mass: torch.Tensor, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``StateBank.apply_read_mass`` as a function: meta [4, B, S], valid [B, S], alpha [B], mass [B, S]
    -> (meta, alpha). A row with no valid slot keeps its alpha (the packed bank skips the update
    while it is empty)."""
    bank = _packed(meta=meta, valid=valid, alpha=alpha, clock_t=clock_t)
    with torch.no_grad():  # (the method undecorated: dynamo cannot trace its no_grad wrapper on this object)
        StateBank.apply_read_mass.__wrapped__(bank, mass, decay)
    alpha = torch.where(valid.any(1), bank.alpha, alpha)
    return bank.meta, alpha


def write_fixed(kv: torch.Tensor, meta: torch.Tensor, valid: torch.Tensor, alpha: torch.Tensor,
                clock_t: torch.Tensor, incoming: torch.Tensor, flags: torch.Tensor, layout: FixedLayout, *,
                compressors, policy, protect_salient: float, importance_w: torch.Tensor | None = None,
                importance_weight: float = 0.0, recon_queries: torch.Tensor | None = None,
                recon_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One segment's write into a fixed-capacity bank (``StateBank.write_packed``, fixed shapes).

    kv [2, B, H, S, Dh], meta [4, B, S] float32, valid [B, S] (S = sum of capacities, levels
    L0 | L1 | L2, each right-aligned); incoming [2, B, H, m, Dh] (every slot valid); flags bool [3]:
    which levels drop this time (:meth:`FixedLayout.step`); importance_w [B, 2, H, Dh] or None;
    recon_queries [B, H, Tq, Dh] or None. Returns (kv, meta, valid, clock_t + 1, recon loss: a 0-d
    float32 tensor, 0 where nothing was compressed)."""
    from .compressor import reconstruction_loss

    caps, drops, recv_n = layout.capacities, layout.drops, layout.received
    bounds = [0, caps[0], caps[0] + caps[1], sum(caps)]
    b, m = kv.shape[1], incoming.shape[3]
    device = kv.device
    const = _meta_constants(device)
    with torch.no_grad():
        meta = meta + const["age_step"]
        new_meta = (const["new_slot"] + const["clock_row"] * clock_t).expand(-1, b, m)

    def importance_bonus(lo: int, hi: int):
        if importance_w is None or not importance_weight:
            return 0.0
        return torch.einsum("tbhsd,bthd->bs", kv[:, :, :, lo:hi].float(), importance_w) * (importance_weight / kv.shape[2])

    with torch.no_grad():  # which slots each level drops: the d lowest keep scores among its slots
        hi01 = bounds[2]
        score = torch.log(meta[0, :, :hi01].clamp_min(1e-6))
        if protect_salient != 1.0:
            score = protect_salient * score
        score = score - torch.log1p(meta[1, :, :hi01]) + importance_bonus(0, hi01)
        score = torch.where(valid[:, :hi01], score, float("inf"))  # empty positions are not slots
        lvl2 = _packed(kv=kv, valid=valid, meta=meta)._view(bounds[2], bounds[3])
        score2 = policy.keep_scores(lvl2, clock_t, alpha) + importance_bonus(bounds[2], bounds[3])
        score2 = torch.where(lvl2.valid, score2, float("inf"))
        level_scores = [score[:, :bounds[1]], score[:, bounds[1]:], score2]
        drop_idx = [torch.topk(s, d, dim=1, largest=False).indices.sort(1).values  # write order
                    for s, d in zip(level_scores, drops)]

    recon = torch.zeros((), device=device)
    received = [(incoming.to(kv.dtype), new_meta, torch.ones(b, m, dtype=torch.bool, device=device))]
    for i in range(LEVELS - 1):  # L0 -> L1, L1 -> L2: the dropped slots (in write order), compressed 2:1
        idx = drop_idx[i] + bounds[i]
        raw_kv = kv.gather(3, idx[None, :, None, :, None].expand(2, -1, kv.shape[2], -1, kv.shape[4]))
        with torch.no_grad():
            raw_meta = meta.gather(2, idx.unsqueeze(0).expand(len(META_FIELDS), -1, -1))
            raw_valid = valid.gather(1, idx) & flags[i]
            pairs = raw_meta.reshape(len(META_FIELDS), b, -1, 2)
            pair_meta = torch.where(const["pair_max"], pairs.amax(-1), pairs.sum(-1) * const["pair_scale"])
            pair_valid = raw_valid.reshape(b, -1, 2).any(-1)
        comp = compressors[i].compress_packed(raw_kv, raw_valid)
        received.append((comp, pair_meta, pair_valid))
        if recon_queries is not None and recon_queries.shape[2] > 0:
            raw_k, raw_v = raw_kv.detach().unbind(0)
            comp_k, comp_v = comp.unbind(0)
            loss = reconstruction_loss(recon_queries, raw_k, raw_v, raw_valid, comp_k, comp_v, pair_valid,
                                       groups=recon_groups)
            recon = recon + torch.where(flags[i], loss, 0.0)

    kv_out, meta_out, valid_out = [], [], []
    for i in range(LEVELS):  # new level = [empty | kept slots | received slots], its last C_i positions
        lo, hi = bounds[i], bounds[i + 1]
        with torch.no_grad():
            dropped = torch.zeros_like(valid[:, lo:hi]).scatter(1, drop_idx[i], flags[i].expand(b, drops[i]))
            kept = valid[:, lo:hi] & ~dropped
            key = torch.cat([kept.long(), received[i][2].long() * 2], 1)                    # 0 empty, 1 kept, 2 new
            order = torch.argsort(key, dim=1, stable=True)[:, recv_n[i]:]                   # [B, C_i]
            valid_out.append(key.gather(1, order) > 0)
            cand_meta = torch.cat([meta[:, :, lo:hi], received[i][1]], 2)
            meta_out.append(cand_meta.gather(2, order.unsqueeze(0).expand(len(META_FIELDS), -1, -1)))
        cand_kv = torch.cat([kv[:, :, :, lo:hi], received[i][0]], 3)
        kv_out.append(cand_kv.gather(3, order[None, :, None, :, None].expand(2, -1, kv.shape[2], -1, kv.shape[4])))
    return torch.cat(kv_out, 3), torch.cat(meta_out, 2), torch.cat(valid_out, 1), clock_t + 1, recon
