"""Session state of a DNC: what a sequence carries from one call to the next, and its byte format.

:class:`DNCState` holds, per block, a :class:`LayerState` (the local KV cache, the memory bank on
memory layers and the current segment's pending writes) plus the position within the segment.
:meth:`DNCState.export` / :meth:`DNCState.from_export` turn it into a versioned flat dict of CPU
tensors and back; :func:`state_to_bytes` / :func:`state_from_bytes` are the one byte format of a
session's state (safetensors, non-tensor values as JSON metadata), which serving stores in its
write-ahead log and snapshots. Shapes: B batch, H heads, S slots, Dh head dim, D model dim.

Pure PyTorch: no Ray, no model import (the model imports this module).
"""

from __future__ import annotations

import warnings

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import KVCache
from .config import DNCConfig
from .memory import ReadView, StateBank

STATE_FORMAT_VERSION = 2
"""Version of :meth:`DNCState.export`'s layout; :meth:`DNCState.from_export` refuses others."""


@dataclass
class LayerState:
    """Per-block recurrent state: local KV cache, memory bank and the segment's pending writes."""

    cache: KVCache
    bank: StateBank | None = None
    write_buf: list = field(default_factory=list)   # normed memory inputs [B, t, D] of this segment
    mass: torch.Tensor | None = None                 # read mass [B, S] accumulated this segment
    view: ReadView | None = None                     # cached read view of the bank for this segment
    prev_x: torch.Tensor | None = None               # normed attention input of the last token [B, 1, D]
    prev_write: torch.Tensor | None = None           # normed memory input of the last committed token [B, 1, D]
    # DNCConfig.self_read: the segment's write slots so far [2, B, H, t, Dh] (keys, values), what
    # the reads see and the commit writes. A cache of write_buf (+ prev_write): not exported, and
    # rebuilt from those by the model where it is None (an imported state, a decode batch's row).
    self_kv: torch.Tensor | None = None


class DNCState:
    """Everything a sequence carries from one call to the next (memory + partial segment)."""

    def __init__(self, layers: list[LayerState], batch_size: int, seg_pos: int = 0, tokens_seen: int = 0,
                 segments: int = 0):
        self.layers = layers
        self.batch_size = batch_size
        self.seg_pos = seg_pos
        self.tokens_seen = tokens_seen
        self.segments = segments

    # ------------------------------------------------------------------ introspection
    def banks(self) -> list[tuple[int, StateBank]]:
        return [(i, ls.bank) for i, ls in enumerate(self.layers) if ls.bank is not None]

    def nbytes(self) -> int:
        """Bytes held by the memory banks (all memory layers and levels)."""
        return sum(b.nbytes() for _, b in self.banks())

    def cache_nbytes(self) -> int:
        return sum(ls.cache.k.numel() * ls.cache.k.element_size() * 2 for ls in self.layers)

    def summary(self) -> dict:
        layers = []
        for i, bank in self.banks():
            layers.append({
                "layer": i,
                "slots": bank.sizes,
                "valid_slots": bank.valid_counts(),
                "capacity": list(bank.capacities),
                "mean_salience": [float(l.salience.mean()) if l.n else 0.0 for l in bank.levels],
                "bytes": bank.nbytes(),
            })
        return {"tokens_seen": self.tokens_seen, "segments": self.segments, "segment_position": self.seg_pos,
                "bank_bytes": self.nbytes(), "cache_bytes": self.cache_nbytes(), "layers": layers}

    # ------------------------------------------------------------------ persistence
    def export(self) -> dict:
        """A versioned flat dict of CPU tensors (safe for safetensors/torch.save)."""
        out: dict = {"format_version": torch.tensor(STATE_FORMAT_VERSION),
                     "batch_size": torch.tensor(self.batch_size), "seg_pos": torch.tensor(self.seg_pos),
                     "tokens_seen": torch.tensor(self.tokens_seen), "segments": torch.tensor(self.segments)}
        for i, ls in enumerate(self.layers):
            out[f"cache.{i}.k"] = ls.cache.k.detach().cpu().contiguous().clone()
            out[f"cache.{i}.v"] = ls.cache.v.detach().cpu().contiguous().clone()
            out[f"cache.{i}.carry_len"] = torch.tensor(ls.cache.carry_len)
            if ls.prev_x is not None:
                out[f"shift.{i}"] = ls.prev_x.detach().cpu().contiguous().clone()
            if ls.bank is not None:
                out.update(ls.bank.export(f"bank.{i}"))
                if ls.prev_write is not None:
                    out[f"write_shift.{i}"] = ls.prev_write.detach().cpu().contiguous().clone()
                if ls.write_buf:
                    out[f"pending.{i}.h"] = torch.cat(ls.write_buf, 1).detach().cpu().contiguous().clone()
                if ls.mass is not None:
                    out[f"pending.{i}.mass"] = ls.mass.detach().cpu().contiguous().clone()
        return out

    @classmethod
    def from_export(cls, d: dict, config: DNCConfig, device=None, dtype=torch.float32) -> "DNCState":
        """Rebuild a state exported by :meth:`export` for a model with ``config``."""
        if "format_version" not in d:
            raise ValueError("not a DNC state export: 'format_version' is missing")
        ver = int(d["format_version"])
        if ver != STATE_FORMAT_VERSION:
            raise ValueError(f"state format version {ver} is not supported (expected {STATE_FORMAT_VERSION})")
        device = torch.device(device or "cpu")
        layers = []
        caps = (config.l0_slots, config.l1_slots, config.l2_slots)
        for i in range(config.n_layers):
            try:
                k, v = d[f"cache.{i}.k"], d[f"cache.{i}.v"]
            except KeyError:
                raise ValueError(f"state export has no cache for layer {i}: was it made by a model with "
                                 f"{config.n_layers} layers?") from None
            if k.shape[1] != config.n_heads or k.shape[3] != config.head_dim:
                raise ValueError(f"cache.{i} has shape {tuple(k.shape)}, which does not fit n_heads="
                                 f"{config.n_heads}, head_dim={config.head_dim}")
            ls = LayerState(KVCache(k.to(device, dtype), v.to(device, dtype), int(d[f"cache.{i}.carry_len"])))
            if f"shift.{i}" in d:
                ls.prev_x = d[f"shift.{i}"].to(device, dtype)
            if i in config.memory_layer_ids:
                ls.bank = StateBank.from_export(d, f"bank.{i}", caps, device, dtype)
                if f"write_shift.{i}" in d:  # absent in states saved before it existed: zeros, as then
                    ls.prev_write = d[f"write_shift.{i}"].to(device, dtype)
                if f"pending.{i}.h" in d:
                    ls.write_buf = [d[f"pending.{i}.h"].to(device, dtype)]
                if f"pending.{i}.mass" in d:
                    ls.mass = d[f"pending.{i}.mass"].to(device)
                    if ls.mass.shape != ls.bank.valid.shape:
                        # saved by a compaction that did not re-index it (issue 12): the per-segment
                        # statistic cannot be mapped back to its slots; drop it rather than fail every turn
                        warnings.warn(f"state layer {i}: pending read mass {tuple(ls.mass.shape)} does not match "
                                      f"its bank's slots {tuple(ls.bank.valid.shape)}; dropped")
                        ls.mass = None
            elif any(key.startswith(f"bank.{i}.") for key in d):
                raise ValueError(f"state export has a memory bank for layer {i}, which has no memory in this config")
            layers.append(ls)
        return cls(layers, int(d["batch_size"]), int(d["seg_pos"]), int(d["tokens_seen"]), int(d["segments"]))

    # ------------------------------------------------------------------ batch rows
    def layout(self) -> tuple:
        """What must be equal for states to share a batch (hashable): position in the segment,
        tokens and segments seen, and per layer the KV length and carry, the pending writes, which
        optional tensors exist, the bank's level sizes, capacities and clock, dtype and device.
        Rows of equal layout step together exactly as each would alone (every op is row-wise)."""
        parts: list = [self.seg_pos, self.tokens_seen, self.segments]
        for ls in self.layers:
            bank = ls.bank
            parts.append((ls.cache.length, ls.cache.carry_len, ls.cache.k.dtype, str(ls.cache.k.device),
                          sum(h.shape[1] for h in ls.write_buf), ls.mass is None, ls.prev_x is None,
                          ls.prev_write is None,
                          None if bank is None else (tuple(bank.sizes), tuple(bank.capacities), bank.clock)))
        return tuple(parts)

    @classmethod
    def stack(cls, states: list["DNCState"]) -> "DNCState":
        """One state holding ``states``' rows in order (new tensors: the inputs are not changed).
        Raises ValueError when their :meth:`layout` differs."""
        first = states[0]
        key = first.layout()
        if any(s.layout() != key for s in states[1:]):
            raise ValueError("states of different layouts (segment position, bank sizes, clock) cannot share a batch")
        if len(states) == 1:
            return first.select(list(range(first.batch_size)))
        layers = []
        for per_row in zip(*(s.layers for s in states)):
            ls0 = per_row[0]

            def cat(get, dim=0):
                return torch.cat([get(ls) for ls in per_row], dim)
            new = LayerState(KVCache(cat(lambda ls: ls.cache.k), cat(lambda ls: ls.cache.v), ls0.cache.carry_len))
            if ls0.prev_x is not None:
                new.prev_x = cat(lambda ls: ls.prev_x)
            if ls0.prev_write is not None:
                new.prev_write = cat(lambda ls: ls.prev_write)
            if ls0.write_buf:
                new.write_buf = [cat(lambda ls: torch.cat(ls.write_buf, 1))]
            if all(ls.self_kv is not None for ls in per_row):  # else the model rebuilds it
                new.self_kv = cat(lambda ls: ls.self_kv, 1)
            if ls0.mass is not None:
                new.mass = cat(lambda ls: ls.mass)
            if ls0.bank is not None:
                new.bank = _bank_rows([ls.bank for ls in per_row], None)
            layers.append(new)
        return cls(layers, sum(s.batch_size for s in states), first.seg_pos, first.tokens_seen, first.segments)

    def select(self, rows: list[int]) -> "DNCState":
        """A state of the given batch ``rows`` of this one, in that order (new tensors)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.layers[0].cache.k.device)
        layers = []
        for ls in self.layers:
            new = LayerState(KVCache(ls.cache.k.index_select(0, idx), ls.cache.v.index_select(0, idx), ls.cache.carry_len))
            if ls.prev_x is not None:
                new.prev_x = ls.prev_x.index_select(0, idx)
            if ls.prev_write is not None:
                new.prev_write = ls.prev_write.index_select(0, idx)
            if ls.write_buf:
                new.write_buf = [torch.cat(ls.write_buf, 1).index_select(0, idx)]
            if ls.self_kv is not None:
                new.self_kv = ls.self_kv.index_select(1, idx)
            if ls.mass is not None:
                new.mass = ls.mass.index_select(0, idx)
            if ls.bank is not None:
                new.bank = _bank_rows([ls.bank], idx)
            layers.append(new)
        return DNCState(layers, len(rows), self.seg_pos, self.tokens_seen, self.segments)

    def assign_(self, other: "DNCState") -> None:
        """Make this object hold ``other``'s content (callers keep their reference to it)."""
        if other is not self:
            self.layers, self.batch_size, self.seg_pos = other.layers, other.batch_size, other.seg_pos
            self.tokens_seen, self.segments = other.tokens_seen, other.segments

    def merge_duplicates(self, threshold: float = 0.98) -> int:
        """Merge near-identical slots in every bank. Returns the number of slots merged away."""
        # the pending read mass of a segment in progress follows its slots (issue 12)
        n = sum(ls.bank.merge_duplicates(threshold, pending_mass=ls.mass) for ls in self.layers if ls.bank is not None)
        for ls in self.layers:
            ls.view = None
        return n


def _bank_rows(banks: list[StateBank], idx: torch.Tensor | None) -> StateBank:
    """A new bank of ``banks``' rows side by side (equal sizes, capacities and clock: the caller
    checked the layout), or, with ``idx``, of rows ``idx`` of the single bank given."""
    first = banks[0]
    bank = StateBank.__new__(StateBank)
    bank.capacities, bank.clock, bank.sizes = first.capacities, first.clock, list(first.sizes)
    if idx is None:
        bank.kv = torch.cat([b.kv for b in banks], 1)
        bank.meta = torch.cat([b.meta for b in banks], 1)
        bank.valid = torch.cat([b.valid for b in banks], 0)
        bank.alpha = torch.cat([b.alpha for b in banks], 0)
    else:
        bank.kv, bank.meta = first.kv.index_select(1, idx), first.meta.index_select(1, idx)
        bank.valid, bank.alpha = first.valid.index_select(0, idx), first.alpha.index_select(0, idx)
    bank.clock_t = first.clock_t.clone()
    if all(b.source is not None for b in banks):  # slot provenance (StateBank.track_sources) rides along
        bank.source = torch.cat([b.source for b in banks], 1) if idx is None else first.source.index_select(1, idx)
        bank.source_next, bank.source_pool = first.source_next, first.source_pool
    return bank


# ================================================================================== byte codec
_SCALARS_KEY = "__dnc_scalars__"  # safetensors metadata entry holding the non-tensor values


def export_to_bytes(export: dict[str, Any]) -> bytes:
    """``DNCState.export()`` dict -> bytes: safetensors for the tensors, the non-tensor values as
    JSON in the safetensors metadata (under ``__dnc_scalars__``)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for k, v in export.items():
        if isinstance(v, torch.Tensor):
            # clone: safetensors refuses tensors that share storage; the bank is small.
            tensors[k] = v.detach().to("cpu").contiguous().clone()
        else:
            scalars[k] = v
    return save(tensors, metadata={_SCALARS_KEY: json.dumps(scalars)})


def export_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`export_to_bytes` (CPU tensors). Raises ValueError on bytes that are not one."""
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        scalars = json.loads((header.get("__metadata__") or {}).get(_SCALARS_KEY, "{}"))
        out: dict[str, Any] = dict(load(data))
    except Exception as e:  # struct/json/safetensors each raise their own kind
        raise ValueError(f"not a DNC state encoding ({type(e).__name__}: {e})") from None
    out.update(scalars)
    return out


def state_to_bytes(state: DNCState) -> bytes:
    """The byte form of ``state`` (what serving persists); :func:`state_from_bytes` reads it back."""
    return export_to_bytes(state.export())


def state_from_bytes(data: bytes, config: DNCConfig, device=None, dtype=torch.float32) -> DNCState:
    """The :class:`DNCState` stored by :func:`state_to_bytes`, for a model with ``config``, on
    ``device``. Raises ValueError naming what does not fit."""
    return DNCState.from_export(export_from_bytes(data), config, device=device, dtype=dtype)


# ================================================================================== summaries
def levels_of(summary: dict[str, Any]) -> list[dict[str, int]]:
    """Per-level valid slots and capacity summed over memory layers, from :meth:`DNCState.summary`:
    ``[{"level": 0, "slots": n, "capacity": n}, ...]`` for L0, L1, L2."""
    valid = [0.0, 0.0, 0.0]
    cap = [0, 0, 0]
    for layer in summary.get("layers", []):
        for i in range(3):
            valid[i] += float(layer.get("valid_slots", [0, 0, 0])[i])
            cap[i] += int(layer.get("capacity", [0, 0, 0])[i])
    return [{"level": i, "slots": int(round(valid[i])), "capacity": cap[i]} for i in range(3)]


def state_meta(state: DNCState) -> dict[str, Any]:
    """What a store keeps about a state besides its bytes (listings without decoding):
    ``{"summary": DNCState.summary(), "levels": levels_of(summary), "tokens_seen": int}``."""
    summary = state.summary()
    return {"summary": summary, "levels": levels_of(summary), "tokens_seen": int(state.tokens_seen)}
