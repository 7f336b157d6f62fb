"""Turn records: what a session turn makes durable when it changed the state only by tokens
(issue 14), and how a state is rebuilt from them.

A turn record holds the turn's token ids (prompt then generated, packed as little-endian uint32:
4 bytes a token), how many were the prompt, the digest chain of the session (``chain_digest``) and a
*fingerprint* of the state the turn left (``state_fingerprint``: integer structure exactly, and per
tensor group a sum and an absolute sum). A bank is rebuilt from the session's last full state record
(a snapshot of the state) by feeding every later turn's tokens through the decode loop that served
it (the prompt's prefill, then each generated token forced through the decoder's ragged step) and
checking each turn's fingerprint: a replay that does not give back the acknowledged state (other weights, a divergence)
is an error naming the session and the turn, never a silent guess.

The store itself (``serve.sessions.shard``) only keeps and logs these records; the model work
(:func:`replay_turns`, :func:`rebuild_state`) runs where a model is: the Generator, or the shard's
CPU model when it compacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Sequence

FINGERPRINT_RTOL = 1e-3
"""Relative tolerance of the float parts of a fingerprint (scaled by the tensor group's absolute
sum). A replay on the device and batch shapes of the live turn is bit-exact; another device or
batching rounds differently, by far less than this."""


# --------------------------------------------------------------------------- ids and digests
def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids -> bytes (uint32 little-endian, 4 bytes each)."""
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(data: bytes | None) -> list[int]:
    if not data:
        return []
    if len(data) % 4:
        raise ValueError(f"token payload of {len(data)} bytes is not a whole number of uint32 ids")
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def chain_digest(previous: str | None, ids: Sequence[int], n_prompt: int) -> str:
    """Digest of a session after a token turn: the digest before it, chained with the turn's ids.
    Deterministic (the same on every shard and after every recovery), unlike the bytes of a rebuilt
    state, which may round differently on another device."""
    h = hashlib.sha256(f"{previous or ''}|{n_prompt}|".encode())
    h.update(pack_ids(ids))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- fingerprints
def _tensors(state) -> list[tuple[str, Any]]:
    """(group name, tensor) of every tensor a ``DNCState`` carries (what ``DNCState.export`` saves)."""
    import torch

    out = []
    for i, ls in enumerate(state.layers):
        out.append((f"cache.{i}", [ls.cache.k, ls.cache.v]))
        extra = [t for t in (ls.prev_x, ls.prev_write, ls.mass) if t is not None]
        if ls.write_buf:
            extra.append(torch.cat(ls.write_buf, 1))
        out.append((f"aux.{i}", extra))
        if ls.bank is not None:
            b = ls.bank
            out.append((f"bank.{i}.kv", [b.kv]))
            out.append((f"bank.{i}.meta", [b.meta, b.valid, b.alpha]))
    return out


def state_fingerprint(state) -> dict[str, Any]:
    """A small summary of a batch-1 ``DNCState`` that two copies share when they hold the same
    content: ``{"ints": [...], "sums": [[sum, abs_sum], ...]}`` (float64 sums of each tensor group,
    computed on the state's device, one host sync)."""
    import torch

    ints: list[int] = [state.batch_size, state.seg_pos, state.tokens_seen, state.segments]
    for ls in state.layers:
        ints += [ls.cache.length, ls.cache.carry_len, sum(h.shape[1] for h in ls.write_buf)]
        if ls.bank is not None:
            ints += [*ls.bank.sizes, ls.bank.clock]
    sums = []
    for _, group in _tensors(state):
        parts = [t.detach() if t.is_floating_point() else t.detach().double() for t in group if t.numel()]
        if not parts:
            sums.append(torch.zeros(2, dtype=torch.float64, device=state.layers[0].cache.k.device))
            continue
        f64 = torch.float64  # accumulate in float64 without a float64 copy of the tensor
        sums.append(torch.stack([sum(p.sum(dtype=f64) for p in parts), sum(p.abs().sum(dtype=f64) for p in parts)]))
    values = torch.stack(sums).cpu().tolist() if sums else []
    return {"ints": ints, "sums": [[float(f"{a:.9g}"), float(f"{b:.9g}")] for a, b in values]}


def fingerprint_mismatch(expected: dict[str, Any], got: dict[str, Any], rtol: float = FINGERPRINT_RTOL) -> str | None:
    """None when ``got`` matches ``expected``; else what differs (for an error message)."""
    if expected.get("ints") != got.get("ints"):
        return f"structure {got.get('ints')} != acknowledged {expected.get('ints')}"
    for k, ((s0, a0), (s1, a1)) in enumerate(zip(expected.get("sums", []), got.get("sums", []))):
        scale = max(abs(a0), abs(a1), 1e-6)
        if not (math.isfinite(s1) and math.isfinite(a1)) or abs(s0 - s1) > rtol * scale or abs(a0 - a1) > rtol * scale:
            return f"tensor group {k}: sum {s1:.6g} / |sum| {a1:.6g} != acknowledged {s0:.6g} / {a0:.6g}"
    if len(expected.get("sums", [])) != len(got.get("sums", [])):
        return "a different number of tensor groups"
    return None


def state_nbytes(state) -> int:
    """Bytes of every tensor a ``DNCState`` holds (bank, local KV cache, pending writes)."""
    return sum(t.numel() * t.element_size() for _, group in _tensors(state) for t in group)


def fingerprint_bytes(fp: dict[str, Any]) -> int:
    return len(json.dumps(fp, separators=(",", ":")))


# --------------------------------------------------------------------------- replay
class ReplayMismatch(ValueError):
    """Replaying a turn record did not give back the state that was acknowledged."""

    def __init__(self, seq: int, reason: str):
        super().__init__(f"replaying turn seq {seq} does not give back the acknowledged state ({reason})")
        self.seq, self.reason = seq, reason


def feed_turn(model, state, ids: Sequence[int], n_prompt: int) -> None:
    """Feed one turn's tokens into ``state`` (batch 1, in place) through the same decode loop that
    served it (:class:`dnc.generate.BatchDecoder`: the prompt's prefill, then each generated token
    as a forced token of a one-row ragged step), so a replay repeats the served turn's ops."""
    import torch
    from dnc.generate import BatchDecoder, DecodeRow

    gen = [int(t) for t in ids[n_prompt:]]
    if not n_prompt:  # no prompt (never served so): feed the tokens as plain model calls
        with torch.no_grad():
            for tok in gen:
                model(torch.tensor([[tok]], dtype=torch.long, device=model.device), state=state,
                      last_logits_only=True, metrics=False)
        return
    row = DecodeRow(prompt_ids=[int(t) for t in ids[:n_prompt]], state=state, max_new_tokens=len(gen),
                    forced=gen)
    decoder = BatchDecoder(model, max_batch=1)
    decoder.add([row])
    for _ in decoder.run():
        pass
    decoder.close()
    if row.error is not None:
        raise row.error


def replay_turns(model, state, turns: Sequence[dict[str, Any]], check: bool = True) -> None:
    """Apply token turn records (``{"seq", "ids", "n_prompt", "fp"}``, oldest first) to ``state`` in
    place. Raises :class:`ReplayMismatch` when a turn's fingerprint does not match."""
    for t in turns:
        feed_turn(model, state, t["ids"], int(t["n_prompt"]))
        if check and t.get("fp"):
            bad = fingerprint_mismatch(t["fp"], state_fingerprint(state))
            if bad:
                raise ReplayMismatch(int(t["seq"]), bad)


def rebuild_state(model, payload: bytes | None, turns: Sequence[dict[str, Any]], check: bool = True):
    """The state of a session: its last full state (``payload``; None = a fresh state) on the model's
    device, then its later token turns replayed (:func:`replay_turns`)."""
    from ..modeling import state_from_bytes

    state = state_from_bytes(payload, model)
    replay_turns(model, state, turns, check)
    return state
