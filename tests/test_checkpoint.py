"""Checkpoint round trip through fsspec (local dir and memory://) and clear errors for bad files."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch

from dnc.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from dnc.config import preset
from dnc.model import DNC


@pytest.mark.parametrize("root", ["local", "memory://ckpt-test"])
def test_round_trip_is_exact(tmp_path, root):
    torch.manual_seed(0)
    model = DNC(preset("tiny", kv_window=8))
    path = str(tmp_path / "ck") if root == "local" else root
    save_checkpoint(path, model, extra={"step": 7})
    loaded, extra = load_checkpoint(path)
    assert extra == {"step": 7} and loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = torch.randint(0, 256, (2, 80))
    torch.testing.assert_close(model(x).logits, loaded(x).logits, rtol=0, atol=0)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(str(tmp_path / "nothing"))
    path = str(tmp_path / "ck")
    save_checkpoint(path, DNC(preset("tiny")))
    # truncated weights
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    # config that is not JSON
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(path)
    # a future format version
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"format": "bwr-dnc", "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_config(path)
    # weights that do not match the config
    save_checkpoint(path, DNC(preset("tiny")))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model_config"]["d_model"] = 256
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)


def test_tokenizer_round_trip_any_utf8():
    from dnc.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    for text in ["", "hello", "naïve café — 日本語 🚀\n\t\x00", "a" * 1000]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in tok.encode("😀"))
    assert tok.decode([tok.bos_id, 104, 105], skip_special=False) == "<bos>hi"
    with pytest.raises(KeyError, match="known"):
        tok.token_id("<nope>")
