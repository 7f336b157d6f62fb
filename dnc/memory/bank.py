"""StateBank: the hierarchical slot memory of one memory layer for a batch of sequences.

Three levels: L0 holds raw slots (1x), L1 slots compressed 2:1 from L0 (2x), L2 slots compressed
2:1 from L1 (4x). Every slot carries ``keys``/``values`` ``[B, H, n, Dh]`` and float32 metadata
``salience``, ``age``, ``access``, ``last_access`` ``[B, n]`` plus a ``valid`` mask ``[B, n]``.

All sequences of a batch hold the same *number* of slot positions per level (so tensors stay
rectangular), while ``valid`` says per sequence which positions hold real content. Slots within a
level are kept in write order (oldest first). All selection is batched (topk/gather): there is no
Python loop over slots, only over the three levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

LEVELS = 3
META_FIELDS = ("salience", "age", "access", "last_access")


@dataclass
class BankLevel:
    keys: torch.Tensor         # [B, H, n, Dh]
    values: torch.Tensor       # [B, H, n, Dh]
    salience: torch.Tensor     # [B, n] float32, EMA of attention share (1.0 = uniform share)
    age: torch.Tensor          # [B, n] float32, segments since the content was written
    access: torch.Tensor       # [B, n] float32, segments in which the slot got an above-uniform share
    last_access: torch.Tensor  # [B, n] float32, bank clock (segment index) of the last access
    valid: torch.Tensor        # [B, n] bool

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
        )

    @staticmethod
    def cat(a: "BankLevel", b: "BankLevel") -> "BankLevel":
        if a.n == 0:
            return b
        if b.n == 0:
            return a
        return BankLevel(torch.cat([a.keys, b.keys], 2), torch.cat([a.values, b.values], 2),
                         *(torch.cat([getattr(a, f), getattr(b, f)], 1) for f in META_FIELDS),
                         torch.cat([a.valid, b.valid], 1))

    def detach(self) -> "BankLevel":
        return BankLevel(*(getattr(self, f.name).detach() for f in fields(self)))

    def to(self, device=None, dtype=None) -> "BankLevel":
        return BankLevel(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype),
                         *(getattr(self, f).to(device) for f in META_FIELDS), self.valid.to(device))

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).numel() * getattr(self, f.name).element_size() for f in fields(self))


def _drop_order(keep: torch.Tensor, valid: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into the ``count`` lowest-keep-score ones (invalid first) and the rest.

    keep, valid: [B, n]. Returns (dropped [B, count], kept [B, n - count]); both sorted ascending,
    i.e. in write order, so compressed groups are made of slots written close together.
    """
    score = keep.masked_fill(~valid, float("-inf"))
    dropped = torch.topk(score, count, dim=1, largest=False).indices.sort(dim=1).values
    is_dropped = torch.zeros_like(valid).scatter_(1, dropped, True)
    # stable argsort puts kept positions (False) first, in ascending order
    kept = torch.argsort(is_dropped.to(torch.int8), dim=1, stable=True)[:, : valid.shape[1] - count]
    return dropped, kept


class StateBank:
    """The three levels of one memory layer plus the bank clock and the adaptive policy weight."""

    def __init__(self, levels: list[BankLevel], capacities: tuple[int, int, int], clock: int = 0,
                 alpha: torch.Tensor | None = None):
        self.levels = levels
        self.capacities = tuple(capacities)
        self.clock = clock
        self.alpha = alpha if alpha is not None else torch.full(
            (levels[0].keys.shape[0],), 0.5, device=levels[0].keys.device)

    @classmethod
    def empty(cls, batch, heads, head_dim, capacities, device, dtype) -> "StateBank":
        return cls([BankLevel.empty(batch, heads, head_dim, device, dtype) for _ in range(LEVELS)], capacities)

    # ---------------------------------------------------------------------------------- reading
    def flat(self) -> tuple[BankLevel, torch.Tensor]:
        """All levels concatenated (L0, L1, L2) and the level id of each slot ``[S]``."""
        flat = self.levels[0]
        for lvl in self.levels[1:]:
            flat = BankLevel.cat(flat, lvl)
        level_ids = torch.cat([torch.full((lvl.n,), i, dtype=torch.long, device=self.levels[0].keys.device)
                               for i, lvl in enumerate(self.levels)])
        return flat, level_ids

    @property
    def sizes(self) -> list[int]:
        return [lvl.n for lvl in self.levels]

    def valid_counts(self) -> list[float]:
        """Mean number of valid slots per sequence in each level."""
        return [float(lvl.valid.float().sum(1).mean()) if lvl.n else 0.0 for lvl in self.levels]

    @torch.no_grad()
    def apply_read_mass(self, mass: torch.Tensor, decay: float) -> None:
        """Update salience/access from the attention mass ``[B, S]`` the segment's reads put on
        each slot (S = current total slots, levels concatenated)."""
        if mass is None or mass.shape[1] == 0:
            return
        mass = mass.float()
        valid = torch.cat([lvl.valid for lvl in self.levels], 1)
        n_valid = valid.float().sum(1, keepdim=True).clamp_min(1.0)
        share = mass / mass.sum(1, keepdim=True).clamp_min(1e-12) * n_valid  # uniform read -> 1.0
        share = share.masked_fill(~valid, 0.0)
        accessed = (share > 1.0) & valid
        # adaptive policy weight: attention drawn to younger-than-average slots favours recency
        flat, _ = self.flat()
        mean_age = (flat.age * valid).sum(1) / n_valid.squeeze(1)
        w = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        read_age = (flat.age * w).sum(1)
        recent_pref = ((mean_age - read_age) / (mean_age + 1.0)).clamp(-0.5, 0.5)
        self.alpha = (0.9 * self.alpha + 0.1 * (0.5 + recent_pref)).clamp(0.0, 1.0)
        offset = 0
        for lvl in self.levels:
            s = slice(offset, offset + lvl.n)
            offset += lvl.n
            # bounded EMA in float32 (accumulated sums overflow in long runs)
            lvl.salience = (decay * lvl.salience + (1 - decay) * share[:, s]).clamp(1e-4, 1e4)
            lvl.access = lvl.access + accessed[:, s].float()
            lvl.last_access = torch.where(accessed[:, s], torch.full_like(lvl.last_access, float(self.clock)),
                                          lvl.last_access)

    # ---------------------------------------------------------------------------------- writing
    def write(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, *, compressors, policy,
              protect_salient: float, group: int, recon_queries: torch.Tensor | None = None) -> dict:
        """Write one segment's slots ``keys/values [B, H, m, Dh]`` (valid [B, m]) into L0.

        Overflow cascades: L0 -> compress 2:1 -> L1 -> compress 2:1 -> L2 -> evict by ``policy``.
        Returns {"recon_loss": tensor, "compressed": int, "evicted": int}.
        """
        b, m = keys.shape[0], keys.shape[2]
        with torch.no_grad():
            for lvl in self.levels:
                lvl.age = lvl.age + 1.0
        f32 = dict(device=keys.device, dtype=torch.float32)
        incoming = BankLevel(keys, values, torch.ones(b, m, **f32), torch.zeros(b, m, **f32),
                             torch.zeros(b, m, **f32), torch.full((b, m), float(self.clock), **f32), valid)
        stats = self._insert(0, incoming, compressors, policy, protect_salient, group, recon_queries)
        self.clock += 1
        return stats

    def compact(self, count: int, *, compressors, policy, protect_salient: float, group: int) -> dict:
        """Compress ``count`` L0 slots (a multiple of ``group``; lowest keep score first) into L1,
        cascading further down as needed. Not a segment: ages and the clock stay as they are."""
        if count <= 0:
            return {"recon_loss": torch.zeros(()), "compressed": 0, "evicted": 0}
        self.levels[0], spilled, recon = self._spill(0, count, compressors[0], protect_salient, group, None)
        stats = self._insert(1, spilled, compressors, policy, protect_salient, group, None)
        stats["compressed"] += count
        return stats

    def _insert(self, start: int, incoming: BankLevel, compressors, policy, protect_salient: float, group: int,
                recon_queries) -> dict:
        """Append ``incoming`` to level ``start``, making room by compressing into the next level
        (L0, L1) or by eviction (L2), recursively."""
        recon = incoming.keys.new_zeros((), dtype=torch.float32)
        compressed = evicted = 0
        for i in range(start, LEVELS):
            lvl = self.levels[i]
            over = lvl.n + incoming.n - self.capacities[i]
            nxt = None
            if over > 0:
                if i < LEVELS - 1:
                    r = min(int(math.ceil(over / group)) * group, lvl.n - lvl.n % group)
                    if r < over:
                        raise RuntimeError(f"level {i} cannot make room for {incoming.n} slots; raise its capacity")
                    lvl, nxt, loss = self._spill(i, r, compressors[i], protect_salient, group, recon_queries)
                    recon = recon + loss
                    compressed += r
                else:
                    with torch.no_grad():
                        keep = policy.keep_scores(lvl, self.clock, self.alpha)
                        _, kept_idx = _drop_order(keep, lvl.valid, over)
                    lvl = lvl.select(kept_idx)
                    evicted += over
            self.levels[i] = BankLevel.cat(lvl, incoming)
            if nxt is None:
                break
            incoming = nxt
        return {"recon_loss": recon, "compressed": compressed, "evicted": evicted}

    def _spill(self, i: int, count: int, compressor, protect_salient: float, group: int, recon_queries):
        """Take the ``count`` slots of level ``i`` with the lowest keep score (old and unsalient first)
        and compress them 2:1. Returns (level i without them, compressed slots, recon loss)."""
        lvl = self.levels[i]
        with torch.no_grad():
            keep = protect_salient * torch.log(lvl.salience.clamp_min(1e-6)) - torch.log1p(lvl.age)
            drop_idx, kept_idx = _drop_order(keep, lvl.valid, count)
        compressed, loss = self._compress(lvl.select(drop_idx), compressor, group, recon_queries)
        return lvl.select(kept_idx), compressed, loss

    @staticmethod
    def _compress(out: BankLevel, compressor, group: int, recon_queries) -> tuple[BankLevel, torch.Tensor]:
        """Compress ``out`` (r slots in write order) 2:1 in groups of ``group`` adjacent slots."""
        b, h, r, d = out.keys.shape
        ng = r // group
        ck, cv = compressor(out.keys.view(b, h, ng, group, d), out.values.view(b, h, ng, group, d),
                            out.valid.view(b, ng, group))
        ck, cv = ck.reshape(b, h, r // 2, d), cv.reshape(b, h, r // 2, d)

        def pairs(x):
            return x.view(b, r // 2, 2)

        with torch.no_grad():
            pv = pairs(out.valid)
            new = BankLevel(
                ck, cv,
                pairs(out.salience).amax(-1),       # a salient member keeps the merged slot salient
                pairs(out.age).mean(-1),
                pairs(out.access).sum(-1),
                pairs(out.last_access).amax(-1),
                pv.any(-1),
            )
        loss = ck.new_zeros((), dtype=torch.float32)
        if recon_queries is not None and recon_queries.shape[2] > 0:
            from .compressor import reconstruction_loss

            loss = reconstruction_loss(recon_queries, out.keys, out.values, out.valid, ck, cv, new.valid)
        return new, loss

    # ---------------------------------------------------------------------------------- misc
    def detach_(self) -> None:
        self.levels = [lvl.detach() for lvl in self.levels]

    def nbytes(self) -> int:
        return sum(lvl.nbytes() for lvl in self.levels)

    def export(self, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {f"{prefix}.clock": torch.tensor(self.clock),
                                        f"{prefix}.alpha": self.alpha.detach().cpu().clone()}
        for i, lvl in enumerate(self.levels):
            for f in fields(lvl):
                out[f"{prefix}.L{i}.{f.name}"] = getattr(lvl, f.name).detach().cpu().contiguous().clone()
        return out

    @classmethod
    def from_export(cls, d: dict, prefix: str, capacities, device, dtype) -> "StateBank":
        levels = []
        for i in range(LEVELS):
            kw = {}
            for f in fields(BankLevel):
                key = f"{prefix}.L{i}.{f.name}"
                if key not in d:
                    raise ValueError(f"state export is missing {key!r}")
                t = d[key].to(device)
                kw[f.name] = t.to(dtype) if f.name in ("keys", "values") else t
            lvl = BankLevel(**kw)
            if lvl.n > capacities[i]:
                raise ValueError(f"{prefix}.L{i} holds {lvl.n} slots but the model's capacity is {capacities[i]}")
            levels.append(lvl)
        return cls(levels, capacities, int(d[f"{prefix}.clock"]), d[f"{prefix}.alpha"].to(device).float())

    @torch.no_grad()
    def merge_duplicates(self, threshold: float = 0.98) -> int:
        """Invalidate slots whose key *and* value are near-copies (cosine >= threshold) of a newer
        valid slot in the same level, folding their salience/access into it. Returns the count."""
        merged = 0
        for lvl in self.levels:
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
            lvl.valid = lvl.valid & ~has
            merged += int(has.sum())
        return merged
