"""bench/needle_probe_importance.py and the cross wordings of bench/long_context_eval.py (issue 11):
a cross keeps its wording's passkeys and wording and swaps only the filler, and the importance probe
reads the learned importance the bank's keep scores use, per written token (a tiny untrained model:
the figures themselves are not the point)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import long_context_eval as lc  # noqa: E402
import needle_probe_importance as npi  # noqa: E402
import report  # noqa: E402

from dnc.config import preset  # noqa: E402
from dnc.model import DNC  # noqa: E402


@pytest.mark.parametrize("cross, wording", [("cross_template", "template"), ("cross_heldout", "heldout")])
def test_a_cross_keeps_its_wordings_passkeys_and_swaps_the_filler(cross: str, wording: str):
    seed = [1234, lc.SUITE_SEED["passkey"], 4096, 1]
    _, own = lc.draw_samples("needle", lc.variant_seed(seed, wording, True), 4096, 3, 0.0, depth=0.5,
                             **lc.variant_kwargs(wording, True))
    _, crossed = lc.draw_samples("needle", lc.variant_seed(seed, cross, True), 4096, 3, 0.0, depth=0.5,
                                 **lc.variant_kwargs(cross, True))
    a, b = own[0], crossed[0]  # the first draw is paired (later ones use the generator differently)
    assert a.meta["passkey"] == b.meta["passkey"]
    pa, pb = a.meta["needle_pos"], b.meta["needle_pos"]
    assert np.array_equal(a.tokens[pa - 8:pa + 5], b.tokens[pb - 8:pb + 5])  # the same needle sentence
    assert not np.array_equal(a.tokens, b.tokens)
    for a, b in zip(own, crossed):
        assert b.meta["filler"] == lc.VARIANT_FILLER[cross] != a.meta.get("filler", "words")
        assert b.meta.get("phrasing") == a.meta.get("phrasing")  # the same wording split (None = template)
    assert lc.parse_variants("cross_heldout", "on") == [("cross_heldout", True)]


def _tiny(importance_w: torch.Tensor | None) -> DNC:
    torch.manual_seed(0)
    model = DNC(preset("tiny", write_importance=50.0))
    for blk in model.blocks:
        if blk.mem is not None and importance_w is not None:
            blk.mem.importance_w.data.copy_(importance_w)
    return model.eval()


def test_the_tap_gives_one_importance_per_written_token_as_the_bank_scores_it():
    torch.manual_seed(1)
    model = _tiny(torch.randn(2, 4, 32))
    cfg = model.config
    _, samples = lc.draw_samples("needle", [5], 4 * cfg.segment_len + 7, 2, 0.0, depth=0.2)
    imp = npi.importance_per_token(model, samples, torch.device("cpu"))
    # whole segments are written (the partial last one waits in the write buffer)
    assert imp.shape == (len(cfg.memory_layer_ids), 2, 4 * cfg.segment_len)
    # the bank's own expression on the first segment's write of the first memory layer
    state = model.init_state(2)
    x = torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64))
    with torch.no_grad():
        model(x[:, :cfg.segment_len], state=state, last_logits_only=True, metrics=False)
    i, blk = next((i, b) for i, b in enumerate(model.blocks) if b.mem is not None)
    bank = state.layers[i].bank
    kv = bank.kv[:, :, :, :cfg.segment_len]  # L0 holds the first segment's slots in order
    want = torch.einsum("tbhsd,thd->bs", kv.float(), blk.mem.importance_w.float()) * (50.0 / kv.shape[2])
    assert np.allclose(imp[0, :, :cfg.segment_len], want.detach().numpy(), rtol=1e-4, atol=1e-3)


def test_zero_importance_ties_every_filler_slot_and_the_result_renders(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(npi, "load_model", lambda args: _tiny(None))  # importance_w starts at zero
    out = tmp_path / "needle_probe_importance_t.json"
    argv = ["--preset", "tiny", "--variants", "template,cross_heldout", "--length", "512", "--n", "2",
            "--device", "cpu", "--out", str(out)]
    assert npi.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "needle_probe" and res["argv"] == argv
    assert res["command"].startswith("python bench/needle_probe_importance.py")
    for row in res["rows"]:
        for c in row["layers"].values():
            assert c["filler_slots"] > 0 and c["above"] == c["filler_slots"] and c["share_above"] == 1.0
    body = report.renderer(report.benchmark_of(out.stem, res)).render(res)
    assert body.startswith("Device: ") and "|---" in body and "cross_heldout" in body
