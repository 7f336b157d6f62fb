"""bench/decode_bytes.py counts what a decode step moves: exact numbers on a tiny model at known
sizes (the KV cache read once by the fused attention, the bank view read once, the float32 copy the
read mass made of it before the fix), and a result that bench/report.py renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import decode_bytes  # noqa: E402
import report  # noqa: E402
from dnc.config import preset  # noqa: E402
from dnc.model import DNC  # noqa: E402
from dnc.ragged import RaggedBatch  # noqa: E402


def _meta_batch(rows: int):
    with torch.device("meta"):
        model = DNC(preset("tiny", segment_len=128, l0_slots=128, l1_slots=64, l2_slots=32)).eval().to(torch.bfloat16)
    batch = RaggedBatch(model, rows, device="meta")
    return model, batch


def test_counts_kv_and_bank_bytes_exactly_and_the_mass_copy_before_the_fix():
    model, batch = _meta_batch(4)
    cfg = model.config
    phases = [0, 2, 10, 100]  # stride 2: even positions keep no read mass this step
    decode_bytes._occupy(batch, model, phases)
    el = 2  # bf16
    kv = 2 * cfg.n_layers * 4 * cfg.n_heads * (cfg.kv_window + cfg.segment_len) * cfg.head_dim * el
    n_mem = len(cfg.memory_layer_ids)
    view = 4 * cfg.n_heads * (cfg.bank_slots + 1) * batch.aug_dim * el  # one of keys / values, one layer
    got = {}
    for mode, gather in (("before", False), ("after", True)):
        batch.mass_gather = gather
        with decode_bytes._meta_autocast():
            got[mode] = decode_bytes.count_steps(model, batch, phases, 1)
    after, before = got["after"], got["before"]
    assert after["mass_rows"] == [0] and before["mass_rows"] == [4]
    # the fused attention reads each layer's whole padded cache once; each layer writes the new K and V
    assert after["read_mb"]["kv"] * 1e6 == kv
    assert after["write_mb"]["kv"] * 1e6 == 2 * cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * el
    # after: the memory read reads the view (keys and values) once; no mass
    assert after["read_mb"]["bank read"] * 1e6 == 2 * view * n_mem
    assert after["read_mb"]["mass"] == 0 and after["write_mb"]["bank read"] == 0
    # before: every row's mass, every step: the keys cast to float32 (read bf16, write fp32) and
    # read again in float32 by the logits' matmul
    assert before["read_mb"]["bank read"] * 1e6 == 2 * view * n_mem + 3 * view * n_mem
    assert before["write_mb"]["bank read"] * 1e6 == 2 * view * n_mem
    assert before["kernels"] > after["kernels"]
    assert before["read_mb"]["kv"] == after["read_mb"]["kv"] and before["read_mb"]["weights"] == after["read_mb"]["weights"]


def test_a_result_is_written_and_renders(tmp_path: Path):
    assert decode_bytes.main(["--preset", "tiny", "--batches", "1,2", "--out", str(tmp_path), "--tag", "t"]) == 0
    res = json.loads((tmp_path / "decode_bytes_t.json").read_text())
    assert report.benchmark_of("decode_bytes_t", res) == "decode_bytes"
    assert res["command"].startswith("python bench/decode_bytes.py")
    body = report.renderer("decode_bytes").render(res)
    assert body.startswith("Device: ") and "|---" in body
    rows = res["entries"][0]["batches"]
    assert [r["rows"] for r in rows] == [1, 2]
    for r in rows:
        assert r["after"]["total_mb"] <= r["before"]["total_mb"]
    assert rows[1]["after"]["read_mb"]["kv"] == 2 * rows[0]["after"]["read_mb"]["kv"]
    # the weights are read once whatever the rows, but for one embedding row (128 bf16) per row
    extra = rows[1]["after"]["read_mb"]["weights"] - rows[0]["after"]["read_mb"]["weights"]
    assert round(extra * 1e6) == 128 * 2


def test_flex_reads_each_rows_kv_blocks_only():
    """kv_attention="flex": the attention reads each row's KV blocks up to its length (the new token's
    included), not the padded cache; the rest of the step moves what the masked step moves, plus the
    few small ops that build the block mask."""
    model, batch = _meta_batch(4)
    cfg = model.config
    phases = [0, 15, 16, 100]  # visible keys 1, 16, 17, 101: blocks of 16 -> 1, 1, 2, 7
    decode_bytes._occupy(batch, model, phases)
    el = 2
    got = {}
    for mode in ("after", "flex"):
        batch.mass_gather, batch.kv_attention = decode_bytes.MODES[mode]
        batch.kv_block = 16
        with decode_bytes._meta_autocast():
            got[mode] = decode_bytes.count_steps(model, batch, phases, 1)
    keys = 16 * (1 + 1 + 2 + 7)
    assert got["flex"]["read_mb"]["kv"] * 1e6 == 2 * cfg.n_layers * cfg.n_heads * keys * cfg.head_dim * el
    assert got["after"]["read_mb"]["kv"] * 1e6 == 2 * cfg.n_layers * 4 * cfg.n_heads * batch.max_len * cfg.head_dim * el
    assert got["flex"]["write_mb"]["kv"] == got["after"]["write_mb"]["kv"]
    assert got["flex"]["read_mb"]["bank read"] == got["after"]["read_mb"]["bank read"]
    assert got["flex"]["read_mb"]["weights"] == got["after"]["read_mb"]["weights"]
    # one block mask per step (8 small ops), and one flex op in place of each SDPA
    assert got["after"]["kernels"] < got["flex"]["kernels"] <= got["after"]["kernels"] + 12
