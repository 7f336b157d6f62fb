"""One decoded session turn and the state comparison the session-turn tests share (imported by
test_sessions_turns and test_serve_dtype; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from dnc.generate import BatchDecoder, DecodeRow, SamplingParams
from serve.modeling import state_dtype, state_to_bytes


def turn_prompt(i: int) -> list[int]:
    """The byte ids of turn ``i``'s prompt."""
    return list(f"turn {i}: the memory keeps what the window forgets. ".encode())


async def chat(turns, sid: str, i: int, new_tokens: int = 8, owner: str = "alice"):
    """One turn of ``turns`` (a ``SessionTurns``): lease, decode with the real decode loop (seeded
    sampling), commit. -> (turn, ack)."""
    t = await turns.begin(sid, owner, True)
    try:
        assert state_dtype(t.state) == turns.dtype  # the scheduler decodes states in the serving dtype
        row = DecodeRow(turn_prompt(i), t.state, new_tokens, SamplingParams(0.9), seed=1000 + i)
        dec = BatchDecoder(turns.model)
        dec.add([row])
        while dec.running:
            dec.step()
        assert row.finish_reason == "length", row.error
        ack = await turns.commit(t, f"u-{sid}-{i}", turn_prompt(i), row.tokens, {"kind": "generate"})
    finally:
        await turns.end(t)
    return t, ack


def same_state(a, b) -> None:
    """Bit for bit, dtype included (a replay on the CPU, batch 1, as decoded)."""
    assert state_dtype(a) == state_dtype(b)
    assert state_to_bytes(a) == state_to_bytes(b)
