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

A turn record also names the dtype the turn was decoded in (``"dtype"``; records written before
it existed were float32). A replay runs each turn in that dtype (:class:`ReplayModels` holds the
model in each), casting the state where consecutive turns differ exactly as the serving replica did
when its dtype changed, so it repeats the served arithmetic (bit for bit on the device and batch
shapes that served it). A bfloat16 turn replayed in float32 gives another state: on the CPU it
drifts 3e-4 to 3e-3 of a group's absolute sum, so it may pass float32's tolerance or fail it
(``state_damaged``), neither of which is the acknowledged state.

The store itself (``serve.sessions.shard``) only keeps and logs these records; the model work
(:func:`replay_turns`, :func:`rebuild_state`) runs where a model is: the Generator, or the shard's
CPU model when it compacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Callable, Sequence

FINGERPRINT_RTOL = 1e-3
"""Relative tolerance of the float parts of a float32 turn's fingerprint (scaled by the tensor
group's absolute sum). A replay on the device and batch shapes of the live turn is bit-exact;
another device or batching rounds differently, by far less than this."""
FINGERPRINT_RTOL_BF16 = 1e-2
"""The same for a bfloat16 turn. A replay on another device or batch shape rounds each bfloat16 op
differently, at bfloat16's scale (2**-8), not float32's: measured on the CPU (tiny preset), a
bfloat16 turn replayed with float32 arithmetic drifts 3e-4 to 3.1e-3 of a group's absolute sum (8
turns of 64 and 700 tokens), so float32's 1e-3 would call sound bfloat16 sessions damaged. Other
weights (seed 1 for seed 0) still drift 3.5e-2 to 1e-1 on the worst group, well past this.
tests/test_replay_gpu.py measures the GPU-decoded, CPU-replayed drift on the H200."""
RECORD_DTYPE = "float32"
"""The dtype of a turn record that names none: records written before turns recorded their dtype
were all decoded in float32."""


def turn_dtype(record: dict[str, Any]) -> str:
    """The dtype a turn record was decoded in (``"float32"`` / ``"bfloat16"``)."""
    return record.get("dtype") or RECORD_DTYPE


def fingerprint_rtol(dtype: str) -> float:
    """The fingerprint tolerance of a turn decoded in ``dtype``."""
    return FINGERPRINT_RTOL_BF16 if dtype == "bfloat16" else FINGERPRINT_RTOL


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


def fingerprint_drift(expected: dict[str, Any], got: dict[str, Any]) -> float:
    """The largest difference of a float part of two fingerprints of the same structure, relative to
    its group's absolute sum (what :func:`fingerprint_mismatch` compares with its tolerance); inf
    when the structures differ."""
    if expected.get("ints") != got.get("ints") or len(expected.get("sums", [])) != len(got.get("sums", [])):
        return math.inf
    return max((max(abs(s0 - s1), abs(a0 - a1)) / max(abs(a0), abs(a1), 1e-6)
                for (s0, a0), (s1, a1) in zip(expected["sums"], got["sums"])), default=0.0)


def state_nbytes(state) -> int:
    """Bytes of every tensor a ``DNCState`` holds (bank, local KV cache, pending writes)."""
    return sum(t.numel() * t.element_size() for _, group in _tensors(state) for t in group)


def fingerprint_bytes(fp: dict[str, Any]) -> int:
    return len(json.dumps(fp, separators=(",", ":")))


# --------------------------------------------------------------------------- replay
class ReplayModels:
    """The model a replay runs each turn in, by dtype name: the served model, and copies in the
    other dtypes turns were recorded in, built on first use by ``load(dtype)`` (a replica serving
    bfloat16 that replays float32 turns written before a restart loads a float32 copy; the shard
    loads a CPU model per dtype it meets). ``load`` builds from the source weights (see
    ``serve.modeling.load_model``): casting a bfloat16 copy back to float32 would not give the
    float32 model back.

    ``default``: the dtype a rebuilt state ends in when the caller names none."""

    def __init__(self, load: Callable[[str], Any] | None = None, default: str = RECORD_DTYPE,
                 models: Sequence[Any] = ()):
        from ..modeling import dtype_name

        self._load = load
        self._models = {dtype_name(m): m for m in models}
        self.default = default

    @classmethod
    def of(cls, model) -> "ReplayModels":
        """``model`` itself if it is one; else the models of one plain model (its own dtype only)."""
        from ..modeling import dtype_name

        return model if isinstance(model, ReplayModels) else cls(None, dtype_name(model), [model])

    def __call__(self, dtype: str):
        m = self._models.get(dtype)
        if m is None:
            if self._load is None:
                raise ValueError(f"a turn decoded in {dtype} can only be replayed by a model in {dtype}; this "
                                 f"replay has {', '.join(self._models) or 'none'} and no loader")
            m = self._models[dtype] = self._load(dtype)
        return m

    def any(self):
        """A loaded model (loading the default one if none is): what a state is loaded onto needs only
        its config and device, the same for every dtype."""
        return next(iter(self._models.values()), None) or self(self.default)

    def loaded(self) -> list[str]:
        return sorted(self._models)


def cast_state(state, model, dtype: str):
    """``state`` with its float tensors in ``dtype`` (the same object when they already are), through
    the one stored form, as a replica that changed dtype loads a stored state."""
    from ..modeling import state_dtype, state_from_bytes, state_to_bytes

    if state_dtype(state) == dtype:
        return state
    return state_from_bytes(state_to_bytes(state), model, dtype)


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


def replay_turns(models, state, turns: Sequence[dict[str, Any]], check: bool = True, dtype: str | None = None):
    """Apply token turn records (``{"seq", "ids", "n_prompt", "fp", "dtype"}``, oldest first) to
    ``state``, each by the model in its recorded dtype (``models``: :class:`ReplayModels` or one
    model). Returns the state: ``state`` itself, changed in place, unless a turn's dtype (or
    ``dtype``, the one to end in; None: the last turn's) differs from the state's, which casts it.
    Raises :class:`ReplayMismatch` when a turn's fingerprint does not match."""
    models = ReplayModels.of(models)
    for t in turns:
        d = turn_dtype(t)
        model = models(d)
        state = cast_state(state, model, d)
        feed_turn(model, state, t["ids"], int(t["n_prompt"]))
        if check and t.get("fp"):
            bad = fingerprint_mismatch(t["fp"], state_fingerprint(state), fingerprint_rtol(d))
            if bad:
                raise ReplayMismatch(int(t["seq"]), f"{bad}; replayed in {d}")
    return cast_state(state, models.any(), dtype) if dtype else state


def rebuild_state(models, payload: bytes | None, turns: Sequence[dict[str, Any]], check: bool = True,
                  dtype: str | None = None):
    """The state of a session: its last full state (``payload``; None = a fresh state) on the model's
    device, then its later token turns replayed (:func:`replay_turns`). It ends in ``dtype``; None:
    the last turn's dtype, or with no turns the dtype ``payload`` was stored in (``models.default``
    for a fresh state). ``models``: :class:`ReplayModels` or one model."""
    from ..modeling import state_from_bytes

    models = ReplayModels.of(models)
    if turns:  # loaded as the replica that decoded the first turn loaded it
        first = turn_dtype(turns[0])
    else:
        first = dtype or ("stored" if payload is not None else models.default)
    state = state_from_bytes(payload, models.any() if first == "stored" else models(first), first)
    return replay_turns(models, state, turns, check, dtype)
