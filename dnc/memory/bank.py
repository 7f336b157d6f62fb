"""StateBank: the hierarchical slot memory of one memory layer for a batch of sequences.

Three levels: L0 holds raw slots (1x), L1 slots compressed 2:1 from L0 (2x), L2 slots compressed
2:1 from L1 (4x). Every slot carries ``keys``/``values`` ``[B, H, n, Dh]`` and float32 metadata
``salience``, ``age``, ``access``, ``last_access`` ``[B, n]`` plus a ``valid`` mask ``[B, n]``.

All sequences of a batch hold the same *number* of slot positions per level (so tensors stay
rectangular), while ``valid`` says per sequence which positions hold real content. Slots within a
level are kept in write order (oldest first). All selection is batched (topk/gather): there is no
Python loop over slots. The bank stores all levels packed (see :class:`StateBank`), so a segment's
write is a fixed, small number of ops whatever overflows.

Optionally (:meth:`StateBank.track_sources`, off by default) the bank records which token positions
of the stream each slot summarises, ``source [2, B, n]`` int64 ``[lo, hi]``: a probe's instrument
(``bench/needle_fate.py``), never saved with a state or a checkpoint.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

LEVELS = 3
META_FIELDS = ("salience", "age", "access", "last_access")
STORED_FIELDS = ("keys", "values", *META_FIELDS, "valid")
"""The :class:`BankLevel` fields a state export holds (``source``, a probe's instrument, is not one)."""
NO_SOURCE = -1
"""``lo`` and ``hi`` of a slot that holds nothing (a compressed group without a valid slot)."""


@dataclass
class BankLevel:
    keys: torch.Tensor         # [B, H, n, Dh]
    values: torch.Tensor       # [B, H, n, Dh]
    salience: torch.Tensor     # [B, n] float32, EMA of attention share (1.0 = uniform share)
    age: torch.Tensor          # [B, n] float32, segments since the content was written
    access: torch.Tensor       # [B, n] float32, segments in which the slot got an above-uniform share
    last_access: torch.Tensor  # [B, n] float32, bank clock (segment index) of the last access
    valid: torch.Tensor        # [B, n] bool
    # [2, B, n] int64: token span [lo, hi] (absolute stream positions) each slot summarises, or None
    # when the bank does not track it (StateBank.track_sources)
    source: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, device, dtype) -> "BankLevel":
        kv = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        meta = torch.zeros(batch, 0, device=device, dtype=torch.float32)
        return cls(kv, kv.clone(), meta, meta.clone(), meta.clone(), meta.clone(),
                   torch.zeros(batch, 0, device=device, dtype=torch.bool))

    def select(self, idx: torch.Tensor) -> "BankLevel":
        """Slots at per-sequence positions ``idx [B, m]`` (in the given order)."""
        b, h, _, d = self.keys.shape
        kv_idx = idx[:, None, :, None].expand(b, h, idx.shape[1], d)
        return BankLevel(
            self.keys.gather(2, kv_idx), self.values.gather(2, kv_idx),
            *(getattr(self, f).gather(1, idx) for f in META_FIELDS), self.valid.gather(1, idx),
            None if self.source is None else self.source.gather(2, idx.unsqueeze(0).expand(2, -1, -1)),
        )

    @staticmethod
    def cat(a: "BankLevel", b: "BankLevel") -> "BankLevel":
        if a.n == 0:
            return b
        if b.n == 0:
            return a
        both = a.source is not None and b.source is not None  # one side untracked: the result is too
        return BankLevel(torch.cat([a.keys, b.keys], 2), torch.cat([a.values, b.values], 2),
                         *(torch.cat([getattr(a, f), getattr(b, f)], 1) for f in META_FIELDS),
                         torch.cat([a.valid, b.valid], 1), torch.cat([a.source, b.source], 2) if both else None)

    def detach(self) -> "BankLevel":
        return BankLevel(*(getattr(self, f).detach() for f in STORED_FIELDS), self.source)

    def to(self, device=None, dtype=None) -> "BankLevel":
        return BankLevel(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype),
                         *(getattr(self, f).to(device) for f in META_FIELDS), self.valid.to(device),
                         None if self.source is None else self.source.to(device))

    def nbytes(self) -> int:
        """Bytes of the stored fields (``source``, an instrument, is not counted)."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in STORED_FIELDS)


def _group_span(source: torch.Tensor, valid: torch.Tensor, group: int) -> torch.Tensor:
    """Spans of the slots a compressor makes of ``source [2, B, r]`` / ``valid [B, r]`` (r raw slots in
    write order, adjacent groups of ``group`` compressed 2:1) -> ``[2, B, r/2]``: every output slot of
    a group may draw on any valid slot of it (the compressor's queries attend over the whole group),
    so it gets the group's min ``lo`` .. max ``hi`` (:data:`NO_SOURCE` for a group without one)."""
    _, b, r = source.shape
    ng = r // group
    lo = torch.where(valid, source[0], torch.iinfo(torch.int64).max).view(b, ng, group).amin(-1)
    hi = torch.where(valid, source[1], NO_SOURCE).view(b, ng, group).amax(-1)
    lo = torch.where(hi == NO_SOURCE, NO_SOURCE, lo)
    return torch.stack([lo, hi]).repeat_interleave(group // 2, dim=2)


def _drop_order(keep: torch.Tensor, valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into the ``count`` lowest-keep-score ones (invalid first) and the rest.

    keep, valid: [B, n]. Returns (dropped [B, count], kept [B, n - count]); both sorted ascending,
    i.e. in write order. (The bank itself does this for all levels at once in ``_cascade``.)
    """
    score = torch.where(valid, keep, float("-inf"))
    is_dropped = torch.zeros_like(valid, dtype=torch.int8).scatter_(
        1, torch.topk(score, count, dim=1, largest=False).indices, 1)
    # stable argsort puts kept positions (0) first, then dropped ones (1), each in ascending order
    order = torch.argsort(is_dropped, dim=1, stable=True)
    return order[:, valid.shape[1] - count:], order[:, : valid.shape[1] - count]


# ------------------------------------------------------------------------------------ constants
# Small per-(shape, device) constants, made once: building them per segment would cost a kernel
# launch each (and a host->device copy for python-built tensors). Never modified in place.
@functools.lru_cache(maxsize=512)
def _level_ids(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """LongTensor [S]: the level of every slot of a bank whose levels hold ``sizes`` slots."""
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)]).to(device)


@functools.lru_cache(maxsize=64)
def _meta_constants(device: torch.device) -> dict[str, torch.Tensor]:
    """[4, 1, 1] float32 vectors over META_FIELDS used to update all metadata rows in one op."""
    def vec(*xs):
        return torch.tensor(xs, dtype=torch.float32).view(4, 1, 1).to(device)
    return {
        "age_step": vec(0.0, 1.0, 0.0, 0.0),    # write: every slot ages by one segment
        "new_slot": vec(1.0, 0.0, 0.0, 0.0),    # a new slot: salience 1, age 0, access 0 ...
        "clock_row": vec(0.0, 0.0, 0.0, 1.0),   # ... and last_access = clock (added times the clock)
        "pair_scale": vec(1.0, 0.5, 1.0, 1.0),  # merged pair: age is the mean (sum / 2), access the sum
        "pair_max": torch.tensor([True, False, False, True]).view(4, 1, 1).to(device),  # salience, last_access: max
    }


@functools.lru_cache(maxsize=64)
def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device)


class StateBank:
    """The three levels of one memory layer plus the bank clock and the adaptive policy weight.

    Storage is *packed* so each bookkeeping step is one op over all levels instead of one per
    level and field (on a GPU every op is a kernel launch, and the per-segment write path is made
    of many tiny ones):

    - ``kv``    [2, B, H, S, Dh]: keys (``kv[0]``) and values (``kv[1]``) of all slots,
      levels concatenated L0 | L1 | L2 (S = sum of ``sizes``);
    - ``meta``  [4, B, S] float32: salience, age, access, last_access (``META_FIELDS`` order);
    - ``valid`` [B, S] bool; ``sizes``: slots per level (host ints);
    - ``clock`` (host int) and ``clock_t`` (the same as a float32 0-d device tensor): segments written;
    - ``source`` [2, B, S] int64 or None (the default): slot provenance, see :meth:`track_sources`.

    ``levels`` gives per-level :class:`BankLevel` *views* (in-place edits reach the bank;
    assigning a level's attribute does not: assign ``bank.levels = [...]`` to repack).
    """

    # Slot provenance (track_sources). Class-level defaults: banks built with __new__ elsewhere
    # (dnc.state, dnc.ragged, dnc.cuda_graphs, dnc.training.compiled_segment) do not track it.
    source: torch.Tensor | None = None
    source_next: int = 0   # stream position of the next token a write covers
    source_pool: int = 1   # tokens per written slot (DNCConfig.write_pool)

    def __init__(self, levels: list[BankLevel], capacities: tuple[int, int, int], clock: int = 0,
                 alpha: torch.Tensor | None = None):
        self.capacities = tuple(capacities)
        self.clock = clock
        self.levels = levels
        self.alpha = alpha if alpha is not None else torch.full(
            (self.kv.shape[1],), 0.5, device=self.kv.device)
        # the clock on the device too: the metadata ops read it from there, so a captured CUDA graph
        # of a segment step (dnc.cuda_graphs) advances it instead of baking in one value
        self.clock_t = torch.full((), float(clock), device=self.kv.device)

    @classmethod
    def empty(cls, batch, heads, head_dim, capacities, device, dtype) -> "StateBank":
        return cls([BankLevel.empty(batch, heads, head_dim, device, dtype) for _ in range(LEVELS)], capacities)

    def track_sources(self, tokens_per_slot: int = 1, start: int = 0) -> "StateBank":
        """Record, from now on, which token positions of the stream every slot summarises:
        ``source [2, B, S]`` int64, ``source[0]`` = lo and ``source[1]`` = hi, absolute positions,
        inclusive. Off by default; when off the bank holds no such tensor and runs no op for it.

        - A write of ``m`` slots covers the next ``m * tokens_per_slot`` tokens of the stream (the model
          commits one whole segment per write; ``tokens_per_slot`` is its ``write_pool``), slot ``j``
          tokens ``start + j*p .. start + (j+1)*p - 1``, counted on from ``start`` (the stream position
          of the first token the next write covers).
        - Compression: each slot made of a group covers the group's min ``lo`` .. max ``hi`` over its
          valid slots. That is an *upper bound* of what a compressed slot may hold (the compressor
          attends over the whole group; what it keeps of each token is not known).
        - :meth:`merge_duplicates`: the surviving slot's span grows to cover the slots merged into it.
        - Eviction drops a slot's span with it; :meth:`stack`, :meth:`unstack`, ``levels``, and
          :class:`BankLevel`'s select / cat / detach / to carry it; an invalid slot's span is
          meaningless (read it with ``valid``).

        Only this eager write path keeps it: the fixed-capacity bank of the compiled / CUDA-graph
        paths (``dnc.memory.fixed_bank``, ``dnc.cuda_graphs``, ``dnc.training.compiled_segment``) and
        ``dnc.ragged``'s decode rows do not, and :meth:`export` leaves it out (a probe's instrument,
        not state). The bank must be empty (the spans of slots already written are unknown)."""
        if self.kv.shape[3]:
            raise ValueError(f"track_sources needs an empty bank (this one holds {self.sizes} slots, whose "
                             f"token spans are unknown): turn it on before the first write")
        if tokens_per_slot < 1 or start < 0:
            raise ValueError(f"tokens_per_slot must be >= 1 and start >= 0, got {tokens_per_slot}, {start}")
        self.source = torch.zeros(2, self.kv.shape[1], 0, dtype=torch.long, device=self.kv.device)
        self.source_pool, self.source_next = int(tokens_per_slot), int(start)
        return self

    # ---------------------------------------------------------------------------------- storage
    @property
    def levels(self) -> list[BankLevel]:
        out, a = [], 0
        for n in self.sizes:
            out.append(self._view(a, a + n))
            a += n
        return out

    @levels.setter
    def levels(self, levels: list[BankLevel]) -> None:
        self.kv = torch.stack([torch.cat([lvl.keys for lvl in levels], 2), torch.cat([lvl.values for lvl in levels], 2)])
        self.meta = torch.stack([torch.cat([getattr(lvl, f).float() for lvl in levels], 1) for f in META_FIELDS])
        self.valid = torch.cat([lvl.valid for lvl in levels], 1)
        self.sizes = [lvl.n for lvl in levels]
        # provenance stays only when every level carries it (levels made without it turn it off)
        tracked = all(lvl.source is not None for lvl in levels)
        self.source = torch.cat([lvl.source for lvl in levels], 2) if tracked else None

    def _view(self, a: int, b: int, meta: torch.Tensor | None = None) -> BankLevel:
        """Slots ``a:b`` of the packed storage as a BankLevel of views."""
        meta = self.meta if meta is None else meta
        return BankLevel(self.kv[0, :, :, a:b], self.kv[1, :, :, a:b], *meta[:, :, a:b].unbind(0), self.valid[:, a:b],
                         None if self.source is None else self.source[:, :, a:b])

    # ---------------------------------------------------------------------------------- groups
    @classmethod
    def stack(cls, banks: list["StateBank"]) -> "StateBank | None":
        """One bank holding ``banks`` side by side along the batch dim (rows ``l*B .. (l+1)*B`` are
        bank ``l``), so their segment bookkeeping runs as one set of ops instead of one per bank.
        Every op of the write path works row by row, so this is the same computation. None when
        the banks differ in level sizes, capacities, clock or batch (then write them one by one).

        The group made last time is reused as is (no copy) while every bank still holds the views
        :meth:`unstack` gave it."""
        first = banks[0]
        group = getattr(first, "_group", None)
        if group is not None and len(group._members) == len(banks) and all(
                m[0] is bank and bank.kv is m[1] and bank.meta is m[2] and bank.valid is m[3] and bank.alpha is m[4]
                and bank.source is m[5] and bank.sizes == group.sizes and bank.clock == group.clock
                and bank.source_next == group.source_next
                for m, bank in zip(group._members, banks)):
            return group
        tracked = first.source is not None
        if any(bk.sizes != first.sizes or bk.capacities != first.capacities or bk.clock != first.clock
               or bk.kv.shape[1] != first.kv.shape[1] or bk.kv.dtype != first.kv.dtype
               or (bk.source is not None) != tracked
               or (tracked and (bk.source_next, bk.source_pool) != (first.source_next, first.source_pool))
               for bk in banks[1:]):
            return None
        group = cls.__new__(cls)
        group.capacities, group.clock, group.sizes = first.capacities, first.clock, list(first.sizes)
        group.kv = torch.cat([bk.kv for bk in banks], 1)
        group.meta = torch.cat([bk.meta for bk in banks], 1)
        group.valid = torch.cat([bk.valid for bk in banks], 0)
        group.alpha = torch.cat([bk.alpha for bk in banks], 0)
        group.clock_t = first.clock_t  # equal clocks (checked above)
        group.source = torch.cat([bk.source for bk in banks], 1) if tracked else None
        group.source_next, group.source_pool = first.source_next, first.source_pool
        group._members = []
        return group

    def unstack(self, banks: list["StateBank"]) -> None:
        """Give each of ``banks`` its rows of this group (views; one split per tensor)."""
        b = self.kv.shape[1] // len(banks)
        sources = self.source.split(b, 1) if self.source is not None else [None] * len(banks)
        parts = zip(self.kv.split(b, 1), self.meta.split(b, 1), self.valid.split(b, 0), self.alpha.split(b, 0), sources)
        self._members = []
        for bank, (kv, meta, valid, alpha, source) in zip(banks, parts):
            bank.kv, bank.meta, bank.valid, bank.alpha = kv, meta, valid, alpha
            bank.sizes, bank.clock, bank.clock_t, bank._group = list(self.sizes), self.clock, self.clock_t, self
            bank.source, bank.source_next, bank.source_pool = source, self.source_next, self.source_pool
            self._members.append((bank, kv, meta, valid, alpha, source))

    # ---------------------------------------------------------------------------------- reading
    def flat(self) -> tuple[BankLevel, torch.Tensor]:
        """All levels concatenated (L0, L1, L2; views, no copy) and the level id of each slot ``[S]``."""
        # unbind, not kv[0]/kv[1]: its backward is one stack instead of two zero-fill + copy pairs
        return BankLevel(*self.kv.unbind(0), *self.meta.unbind(0), self.valid, self.source), self.level_ids()

    def level_ids(self) -> torch.Tensor:
        """LongTensor [S]: level of each slot (a cached constant: do not modify)."""
        return _level_ids(tuple(self.sizes), self.kv.device)

    def valid_counts(self) -> list[float]:
        """Mean number of valid slots per sequence in each level (one device sync)."""
        if not self.kv.shape[3]:
            return [0.0] * LEVELS
        counts = torch.stack([v.float().sum(1).mean() for v in self.valid.split(self.sizes, 1)])
        return [c if n else 0.0 for c, n in zip(counts.tolist(), self.sizes)]

    @torch.no_grad()
    def apply_read_mass(self, mass: torch.Tensor, decay: float) -> None:
        """Update salience/access from the attention mass ``[B, S]`` the segment's reads put on
        each slot (S = current total slots, levels concatenated)."""
        if mass is None or mass.shape[1] == 0:
            return
        mass = mass.float()
        valid = self.valid
        salience, age, access, last_access = self.meta.unbind(0)
        n_valid = valid.float().sum(1, keepdim=True).clamp_min(1.0)
        share = mass / mass.sum(1, keepdim=True).clamp_min(1e-12) * n_valid  # uniform read -> 1.0
        share = torch.where(valid, share, 0.0)
        accessed = share > 1.0  # (invalid slots have share 0)
        # adaptive policy weight: attention drawn to younger-than-average slots favours recency
        mean_age = (age * valid).sum(1) / n_valid.squeeze(1)
        w = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        read_age = (age * w).sum(1)
        recent_pref = ((mean_age - read_age) / (mean_age + 1.0)).clamp(-0.5, 0.5)
        self.alpha = (0.9 * self.alpha + 0.1 * (0.5 + recent_pref)).clamp(0.0, 1.0)
        self.meta = torch.stack([
            # bounded EMA in float32 (accumulated sums overflow in long runs)
            (decay * salience + (1 - decay) * share).clamp(1e-4, 1e4),
            age,
            access + accessed,
            torch.where(accessed, self.clock_t, last_access),
        ])

    # ---------------------------------------------------------------------------------- writing
    def write(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, *, compressors, policy,
              protect_salient: float, group: int, recon_queries: torch.Tensor | None = None) -> dict:
        """Write one segment's slots ``keys/values [B, H, m, Dh]`` (valid [B, m]) into L0.

        Overflow cascades: L0 -> compress 2:1 -> L1 -> compress 2:1 -> L2 -> evict by ``policy``.
        Returns {"recon_loss": tensor, "compressed": int, "evicted": int}.
        """
        return self.write_packed(torch.stack([keys, values]), valid, compressors=compressors, policy=policy,
                                 protect_salient=protect_salient, group=group, recon_queries=recon_queries)

    def write_packed(self, kv: torch.Tensor, valid: torch.Tensor, *, compressors, policy, protect_salient: float,
                     group: int, recon_queries: torch.Tensor | None = None, recon_groups: int = 1,
                     importance_w: torch.Tensor | None = None, importance_weight: float = 0.0) -> dict:
        """:meth:`write` with keys and values packed as ``kv [2, B, H, m, Dh]``. ``recon_groups``: for
        a :meth:`stack` of that many banks, the reconstruction loss is the sum of the banks' losses.
        ``importance_w [B, 2, H, Dh]``: per row, weights of a learned slot importance (the head mean of
        ``key . w[0] + value . w[1]``) that is added, times ``importance_weight``, to the keep scores
        of L0/L1 compression and L2 eviction (``DNCConfig.write_importance``)."""
        const = _meta_constants(self.kv.device)
        with torch.no_grad():
            self.meta = self.meta + const["age_step"]
            new_meta = (const["new_slot"] + const["clock_row"] * self.clock_t).expand(-1, kv.shape[1], kv.shape[3])
        new_source = None
        if self.source is not None:  # slot j covers the next tokens source_next + j*p .. + p - 1
            m, p = kv.shape[3], self.source_pool
            lo = self.source_next + p * torch.arange(m, device=self.source.device)
            new_source = torch.stack([lo, lo + (p - 1)]).unsqueeze(1).expand(2, kv.shape[1], m)
            self.source_next += m * p
        stats = self._cascade((kv.to(self.kv.dtype), new_meta, valid), start=0, compressors=compressors, policy=policy,
                              protect_salient=protect_salient, group=group, recon_queries=recon_queries,
                              recon_groups=recon_groups, importance_w=importance_w, importance_weight=importance_weight,
                              incoming_source=new_source)
        self.clock += 1
        self.clock_t = self.clock_t + 1
        return stats

    def compact(self, count: int, *, compressors, policy, protect_salient: float, group: int,
                importance_w: torch.Tensor | None = None, importance_weight: float = 0.0,
                pending_mass: torch.Tensor | None = None) -> dict:
        """Compress ``count`` L0 slots (a multiple of ``group``; lowest keep score first, with the
        learned importance as in :meth:`write_packed`) into L1, cascading further down as needed.
        Not a segment: ages and the clock stay as they are.

        ``pending_mass [B, S]``: read mass of a segment in progress (not yet applied with
        :meth:`apply_read_mass`), indexed by this bank's slots. It moves with its slots: a compressed
        pair gets the sum of its two slots' mass, an evicted slot's mass goes with it. The result,
        ``[B, S']`` for the new layout, is returned as ``stats["pending_mass"]`` (None if none)."""
        if count <= 0:
            return {"recon_loss": torch.zeros(()), "compressed": 0, "evicted": 0, "pending_mass": pending_mass}
        return self._cascade(None, start=1, compact=count, compressors=compressors, policy=policy,
                             protect_salient=protect_salient, group=group, recon_queries=None,
                             importance_w=importance_w, importance_weight=importance_weight,
                             pending_mass=pending_mass)

    def _plan(self, incoming: int, start: int, compact: int, group: int) -> tuple[list[int], list[int]]:
        """Host-side overflow plan from the level sizes alone (no device work): how many existing
        slots each level drops (compresses into the next level, or evicts from L2) and how many
        slots each level receives."""
        drop, recv = [0] * LEVELS, [0] * LEVELS
        recv[0] = incoming
        if compact:
            drop[0], recv[1] = compact, compact // 2
        for i in range(start, LEVELS):
            n = self.sizes[i]
            over = n + recv[i] - self.capacities[i]
            if over <= 0:
                break
            if i < LEVELS - 1:
                r = min(int(math.ceil(over / group)) * group, n - n % group)
                if r < over:
                    raise RuntimeError(f"level {i} cannot make room for {recv[i]} slots; raise its capacity")
                drop[i], recv[i + 1] = r, r // 2
            else:
                drop[i] = over
        return drop, recv

    def _cascade(self, incoming, *, start: int, compressors, policy, protect_salient: float, group: int,
                 recon_queries, compact: int = 0, recon_groups: int = 1,
                 importance_w: torch.Tensor | None = None, importance_weight: float = 0.0,
                 pending_mass: torch.Tensor | None = None, incoming_source: torch.Tensor | None = None) -> dict:
        """Append ``incoming`` (kv [2,B,H,m,Dh], meta [4,B,m], valid [B,m]) to L0 (or, for
        ``compact``, drop ``compact`` L0 slots and start at L1), making room by compressing into
        the next level (L0, L1) or by eviction (L2).

        Every level picks the slots it drops from its own existing slots, so all levels are decided
        up front: one stable argsort orders the bank as [kept L0 | kept L1 | kept L2 | dropped L0 |
        dropped L1 | evicted L2], one gather per packed tensor applies it, the dropped blocks are
        compressed, and one cat per packed tensor builds the new bank
        [kept L0, incoming | kept L1, compressed L0 | kept L2, compressed L1].
        ``pending_mass [B, S]`` (optional) follows the same order (see :meth:`compact`), and so does
        ``source`` when tracked (``incoming_source [2, B, m]``: the spans of ``incoming``).
        """
        sizes = list(self.sizes)
        drop, recv = self._plan(incoming[0].shape[3] if incoming is not None else 0, start, compact, group)
        kv, meta, valid, source = self.kv, self.meta, self.valid, self.source
        b = kv.shape[1]
        kept = [n - d for n, d in zip(sizes, drop)]

        def importance_bonus(lo: int, hi: int) -> torch.Tensor | float:
            """importance_weight x the head-mean learned importance of slots lo:hi, [B, hi - lo]."""
            if importance_w is None or not importance_weight:
                return 0.0
            return torch.einsum("tbhsd,bthd->bs", kv[:, :, :, lo:hi].float(), importance_w) * (importance_weight / kv.shape[2])

        if any(drop):
            with torch.no_grad():
                bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
                # sort key: level id for kept slots, LEVELS + level id for dropped ones
                key = _level_ids(tuple(sizes), kv.device).expand(b, -1).clone()
                spill = [i for i in range(LEVELS - 1) if drop[i]]
                if spill:  # keep score of L0/L1 slots: salient ones stay, old ones go first
                    lo, hi = bounds[spill[0]], bounds[spill[-1] + 1]
                    score = torch.log(meta[0, :, lo:hi].clamp_min(1e-6))
                    if protect_salient != 1.0:
                        score = protect_salient * score
                    score = score - torch.log1p(meta[1, :, lo:hi]) + importance_bonus(lo, hi)
                    score = torch.where(valid[:, lo:hi], score, float("-inf"))
                    for i in spill:
                        idx = torch.topk(score[:, bounds[i] - lo:bounds[i + 1] - lo], drop[i], dim=1, largest=False).indices
                        key[:, bounds[i]:bounds[i + 1]].scatter_(1, idx, LEVELS + i)
                if drop[LEVELS - 1]:
                    i = LEVELS - 1
                    lvl = self._view(bounds[i], bounds[i + 1], meta)
                    score = policy.keep_scores(lvl, self.clock_t, self.alpha) + importance_bonus(bounds[i], bounds[i + 1])
                    score = torch.where(lvl.valid, score, float("-inf"))
                    idx = torch.topk(score, drop[i], dim=1, largest=False).indices
                    key[:, bounds[i]:].scatter_(1, idx, LEVELS + i)
                order = torch.argsort(key, dim=1, stable=True)  # [B, S]
                meta = meta.gather(2, order.unsqueeze(0).expand(len(META_FIELDS), -1, -1))
                valid = valid.gather(1, order)
                if pending_mass is not None:
                    pending_mass = pending_mass.gather(1, order)
                if source is not None:
                    source = source.gather(2, order.unsqueeze(0).expand(2, -1, -1))
            kv = kv.gather(3, order[None, :, None, :, None].expand_as(kv))
        # the blocks [kept L0, kept L1, kept L2, dropped L0, dropped L1, evicted L2] of the (gathered)
        # bank; one split each (the backward of a split is one cat, of each slice a zero-fill + copy)
        block_sizes = kept + drop
        kv_blocks = kv.split(block_sizes, 3)
        meta_blocks = meta.split(block_sizes, 2)
        valid_blocks = valid.split(block_sizes, 1)
        mass_blocks = pending_mass.split(block_sizes, 1) if pending_mass is not None else None
        source_blocks = source.split(block_sizes, 2) if source is not None else None
        new_source: list[torch.Tensor | None] = [incoming_source, None, None]  # spans of what each level receives
        new_mass: list[torch.Tensor | None] = [None, None, None]  # pending mass of what each level receives
        if mass_blocks is not None and incoming is not None:
            new_mass[0] = pending_mass.new_zeros(b, incoming[0].shape[3])  # new slots were not read yet

        recon = []
        new = [incoming, None, None]  # what each level receives
        spill = [i for i in range(LEVELS - 1) if drop[i]]
        if spill:
            first, last = LEVELS + spill[0], LEVELS + spill[-1]
            with torch.no_grad():  # metadata of merged pairs, both levels' dropped blocks at once
                const = _meta_constants(kv.device)
                lo = sum(block_sizes[:first])
                hi = sum(block_sizes[:last + 1])
                pairs = meta[:, :, lo:hi].reshape(len(META_FIELDS), b, -1, 2)
                pair_meta = torch.where(const["pair_max"], pairs.amax(-1), pairs.sum(-1) * const["pair_scale"])
                pair_valid = valid[:, lo:hi].reshape(b, -1, 2).any(-1)
                pair_sizes = [drop[i] // 2 for i in spill]
                pair_meta, pair_valid = pair_meta.split(pair_sizes, 2), pair_valid.split(pair_sizes, 1)
                if mass_blocks is not None:  # a compressed pair was read as much as its two slots
                    pair_mass = pending_mass[:, lo:hi].reshape(b, -1, 2).sum(-1).split(pair_sizes, 1)
                    for j, i in enumerate(spill):
                        new_mass[i + 1] = pair_mass[j]
            for j, i in enumerate(spill):
                raw_kv, raw_valid = kv_blocks[LEVELS + i], valid_blocks[LEVELS + i]
                comp = compressors[i].compress_packed(raw_kv, raw_valid)
                if source_blocks is not None:
                    new_source[i + 1] = _group_span(source_blocks[LEVELS + i], raw_valid,
                                                    getattr(compressors[i], "group", group))
                new[i + 1] = (comp, pair_meta[j], pair_valid[j])
                if recon_queries is not None and recon_queries.shape[2] > 0:
                    from .compressor import reconstruction_loss

                    raw_k, raw_v = raw_kv.detach().unbind(0)
                    comp_k, comp_v = comp.unbind(0)
                    recon.append(reconstruction_loss(recon_queries, raw_k, raw_v, raw_valid, comp_k, comp_v,
                                                     pair_valid[j], groups=recon_groups))

        pieces: list[list[torch.Tensor]] = [[], [], []]  # kv, meta, valid pieces in the new order
        mass_pieces: list[torch.Tensor] = []
        source_pieces: list[torch.Tensor] = []
        for i in range(LEVELS):
            parts = []
            if kept[i]:
                parts.append((kv_blocks[i], meta_blocks[i], valid_blocks[i]))
                if mass_blocks is not None:
                    mass_pieces.append(mass_blocks[i])
                if source_blocks is not None:
                    source_pieces.append(source_blocks[i])
            if new[i] is not None and new[i][0].shape[3]:
                parts.append(new[i])
                if mass_blocks is not None:
                    mass_pieces.append(new_mass[i])
                if source_blocks is not None:
                    source_pieces.append(new_source[i])
            for p in parts:
                for j in range(3):
                    pieces[j].append(p[j])
        if pieces[0]:
            self.kv = torch.cat(pieces[0], 3) if len(pieces[0]) > 1 else pieces[0][0]
            self.meta = torch.cat(pieces[1], 2) if len(pieces[1]) > 1 else pieces[1][0]
            self.valid = torch.cat(pieces[2], 1) if len(pieces[2]) > 1 else pieces[2][0]
        else:
            self.kv, self.meta, self.valid = kv[:, :, :, :0], meta[:, :, :0], valid[:, :0]
        if source is not None:
            self.source = torch.cat(source_pieces, 2) if source_pieces else source[:, :, :0]
        self.sizes = [k + r for k, r in zip(kept, recv)]
        loss = recon[0] if len(recon) == 1 else (sum(recon) if recon else _zero(kv.device))
        stats = {"recon_loss": loss, "compressed": drop[0] + drop[1], "evicted": drop[2]}
        if pending_mass is not None:
            pending_mass = torch.cat(mass_pieces, 1) if mass_pieces else pending_mass.new_zeros(b, 0)
        stats["pending_mass"] = pending_mass
        return stats

    # ---------------------------------------------------------------------------------- misc
    def detach_(self) -> None:
        self.kv, self.meta, self.valid = self.kv.detach(), self.meta.detach(), self.valid.detach()

    def nbytes(self) -> int:
        """Bytes of the bank's content (``source``, a probe's instrument, is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.kv, self.meta, self.valid))

    def export(self, prefix: str) -> dict[str, torch.Tensor]:
        """The bank as flat CPU tensors under ``prefix`` (``source`` is left out: an instrument)."""
        out: dict[str, torch.Tensor] = {f"{prefix}.clock": torch.tensor(self.clock),
                                        f"{prefix}.alpha": self.alpha.detach().cpu().clone()}
        for i, lvl in enumerate(self.levels):
            for f in STORED_FIELDS:
                out[f"{prefix}.L{i}.{f}"] = getattr(lvl, f).detach().cpu().contiguous().clone()
        return out

    @classmethod
    def from_export(cls, d: dict, prefix: str, capacities, device, dtype) -> "StateBank":
        levels = []
        for i in range(LEVELS):
            kw = {}
            for f in STORED_FIELDS:
                key = f"{prefix}.L{i}.{f}"
                if key not in d:
                    raise ValueError(f"state export is missing {key!r}")
                t = d[key].to(device)
                kw[f] = t.to(dtype) if f in ("keys", "values") else t
            lvl = BankLevel(**kw)
            if lvl.n > capacities[i]:
                raise ValueError(f"{prefix}.L{i} holds {lvl.n} slots but the model's capacity is {capacities[i]}")
            levels.append(lvl)
        return cls(levels, capacities, int(d[f"{prefix}.clock"]), d[f"{prefix}.alpha"].to(device).float())

    @torch.no_grad()
    def merge_duplicates(self, threshold: float = 0.98, pending_mass: torch.Tensor | None = None) -> int:
        """Invalidate slots whose key *and* value are near-copies (cosine >= threshold) of a newer
        valid slot in the same level, folding their salience/access into it. Returns the count.

        ``pending_mass [B, S]`` (optional, see :meth:`compact`) is folded the same way, in place: a
        merged-away slot's mass moves to the slot it merged into. With :meth:`track_sources` the
        surviving slot's span grows to cover the spans merged into it (it now stands for them)."""
        merged = 0
        levels = self.levels  # views; edited per level below, then packed again
        starts = [sum(self.sizes[:i]) for i in range(LEVELS)]
        for lvl, start in zip(levels, starts):
            if lvl.n < 2:
                continue
            k = torch.nn.functional.normalize(lvl.keys.float().flatten(start_dim=3).permute(0, 2, 1, 3).flatten(2), dim=-1)
            v = torch.nn.functional.normalize(lvl.values.float().permute(0, 2, 1, 3).flatten(2), dim=-1)
            sim = torch.minimum(k @ k.transpose(1, 2), v @ v.transpose(1, 2))           # [B, n, n]
            n = lvl.n
            later = torch.triu(torch.ones(n, n, dtype=torch.bool, device=sim.device), diagonal=1)
            both = lvl.valid[:, :, None] & lvl.valid[:, None, :] & later
            dup = (sim >= threshold) & both                                          # i duplicated by later j
            has = dup.any(-1)
            if not has.any():
                continue
            target = dup.float().argmax(-1)                                          # first later duplicate
            gain_s = torch.zeros_like(lvl.salience).scatter_add_(1, target, lvl.salience * has)
            gain_a = torch.zeros_like(lvl.access).scatter_add_(1, target, lvl.access * has)
            lvl.salience = (lvl.salience + gain_s).clamp(1e-4, 1e4)
            lvl.access = lvl.access + gain_a
            if pending_mass is not None or lvl.source is not None:
                # to the slot that survives at the end of the chain i -> target(i) -> ... (targets are
                # later slots, so pointer doubling reaches it in log2(n) steps)
                final = torch.where(has, target, torch.arange(n, device=target.device).expand_as(target))
                for _ in range(max(1, (n - 1).bit_length())):
                    final = final.gather(1, final)
            if lvl.source is not None:  # every slot maps to itself or its survivor: min/max fold the spans
                lvl.source = torch.stack([lvl.source[0].scatter_reduce(1, final, lvl.source[0], "amin"),
                                          lvl.source[1].scatter_reduce(1, final, lvl.source[1], "amax")])
            if pending_mass is not None:
                m = pending_mass[:, start:start + n]
                pending_mass[:, start:start + n] = torch.zeros_like(m).scatter_add_(1, final, m)
            lvl.valid = lvl.valid & ~has
            merged += int(has.sum())
        if merged:
            self.levels = levels
        return merged
