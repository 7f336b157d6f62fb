"""dnc.state: the session state and its one byte format (what serving stores)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC
from dnc.state import (STATE_FORMAT_VERSION, DNCState, export_from_bytes, export_to_bytes, levels_of, state_from_bytes,
                       state_meta, state_to_bytes)


def make() -> DNC:
    torch.manual_seed(0)
    return DNC(preset("tiny", segment_len=16, l0_slots=32, l1_slots=16, l2_slots=8)).eval()


def test_bytes_roundtrip_continues_identically_mid_segment():
    m = make()
    x = torch.randint(0, 256, (1, 83))
    s1 = m.init_state(1)
    with torch.no_grad():
        m(x[:, :57], state=s1)  # 3 segments committed (compressions), 9 tokens pending
        data = state_to_bytes(s1)
        s2 = state_from_bytes(data, m.config)
        assert s2.seg_pos == s1.seg_pos == 57 % 16 and s2.tokens_seen == 57 and s2.segments == 3
        a = m(x[:, 57:], state=s1).logits
        b = m(x[:, 57:], state=s2).logits
    torch.testing.assert_close(a, b)
    assert state_to_bytes(s1) == state_to_bytes(s2)  # the same state gives the same bytes


def test_byte_layout_is_safetensors_with_json_scalars():
    """The stored layout stays readable: a safetensors header whose metadata carries the
    non-tensor values, and the version as a tensor."""
    data = export_to_bytes({"a": torch.arange(3), "n": 3, "s": "x"})
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert json.loads(header["__metadata__"]["__dnc_scalars__"]) == {"n": 3, "s": "x"}
    back = export_from_bytes(data)
    assert back["n"] == 3 and back["s"] == "x" and torch.equal(back["a"], torch.arange(3))
    m = make()
    d = export_from_bytes(state_to_bytes(m.init_state(1)))
    assert int(d["format_version"]) == STATE_FORMAT_VERSION


def test_garbage_bytes_are_a_value_error():
    with pytest.raises(ValueError, match="not a DNC state encoding"):
        export_from_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ValueError, match="not a DNC state export"):
        state_from_bytes(export_to_bytes({"x": torch.zeros(1)}), make().config)


def test_state_meta_counts_levels():
    m = make()
    s = m.init_state(1)
    with torch.no_grad():
        m(torch.randint(0, 256, (1, 16 * 4)), state=s)
    meta = state_meta(s)
    assert meta["tokens_seen"] == 64
    n_mem = len(m.config.memory_layer_ids)
    assert [lvl["capacity"] for lvl in meta["levels"]] == [32 * n_mem, 16 * n_mem, 8 * n_mem]
    assert meta["levels"] == levels_of(s.summary())
    assert sum(lvl["slots"] for lvl in meta["levels"]) > 0
    assert isinstance(DNCState.from_export(s.export(), m.config), DNCState)
