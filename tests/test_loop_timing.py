"""Where the training loop's time goes (``TrainConfig.time_accounting``, ``dnc.training.timing``)
and the one host sync of ``train_step`` (issue 11).

The split is checked on a real ``fit`` run (tiny preset, CPU): every part is reported per interval
and as run totals, the parts add up to the interval's wall time, evaluation and checkpoint time land
in their own parts, and accounting changes no training number. ``train_step`` is compared with a
reference that reads every scalar with its own ``float()`` (what it did before): identical values.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dnc.config import preset
from dnc.model import DNC
from dnc.training import TrainConfig, fit, read_metrics, train_step
from dnc.training.step import per_sample_loss
from dnc.training.timing import PARTS, PartClock, time_split


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_step(model, batches, optimizer, clip):
    """``train_step`` as it was: one ``float()`` (a host sync) per scalar per micro-batch."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    tot = {"loss": 0.0, "lm_loss": 0.0, "recon_loss": 0.0}
    losses = []
    for b in batches:
        out = model(b["tokens"], targets=b["targets"], loss_mask=b.get("loss_mask"))
        (out.loss / n).backward()
        tot["loss"] += float(out.loss.detach()) / n
        tot["lm_loss"] += float(out.lm_loss.detach()) / n
        tot["recon_loss"] += float(torch.as_tensor(out.recon_loss).detach()) / n
        with torch.no_grad():
            losses.append(per_sample_loss(out.logits.detach(), b["targets"], b.get("loss_mask")).cpu())
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return {**tot, "grad_norm": float(gn), "sample_losses": torch.cat(losses)}


def test_train_step_one_sync_gives_the_same_numbers():
    """Two steps of two micro-batches (with a loss mask): every scalar and per-sequence loss equals
    the per-value-sync reference exactly, and so do the weights after both steps."""
    torch.manual_seed(0)
    cfg = preset("tiny", l0_slots=32, l1_slots=16, l2_slots=8)
    a = DNC(cfg)
    b = DNC(cfg)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        micro = []
        for _ in range(2):
            x = torch.randint(0, 256, (3, 5 * cfg.segment_len), generator=g)
            mask = torch.rand(x.shape, generator=g) > 0.3
            micro.append({"tokens": x, "targets": torch.roll(x, -1, 1), "loss_mask": mask})
        got = train_step(a, micro, opt_a, clip=1.0, bf16=False, device=torch.device("cpu"))
        want = _reference_step(b, micro, opt_b, clip=1.0)
        for k in ("loss", "lm_loss", "recon_loss", "grad_norm"):
            assert got[k] == want[k], k
        assert got["recon_loss"] > 0  # the bank compressed: the recon term is part of what is compared
        assert got["sample_losses"].dtype == torch.float32 and got["sample_losses"].shape == (6,)
        assert torch.equal(got["sample_losses"], want["sample_losses"])
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_part_clock_charges_marks_and_the_rest_to_other():
    """Marks charge the time since the previous one; ``skip`` leaves time to ``other``; the parts
    add up to the interval's wall time and the totals to the run's."""
    import time

    clock = PartClock("cpu")
    time.sleep(0.02)
    clock.mark("data")
    time.sleep(0.01)
    clock.skip()
    time.sleep(0.03)
    clock.mark("step")
    first = clock.take()
    assert first["time/data_s"] >= 0.02 and first["time/step_s"] >= 0.03 and first["time/other_s"] >= 0.01
    assert sum(first[f"time/{p}_s"] for p in PARTS) == pytest.approx(first["time/interval_s"], abs=1e-6)
    assert sum(first[f"time/{p}_share"] for p in PARTS) == pytest.approx(1.0, abs=1e-6)
    time.sleep(0.01)
    clock.mark("eval")
    second = clock.take()
    assert second["time/step_s"] == 0.0 and second["time/eval_s"] >= 0.01
    assert second["time/total/step_s"] == first["time/step_s"]
    assert second["time/total/wall_s"] == pytest.approx(first["time/interval_s"] + second["time/interval_s"], abs=1e-6)
    split = time_split([first, {"train/loss": 1.0}, second])
    assert split["intervals"] == 2
    assert split["wall"]["seconds"] == pytest.approx(second["time/total/wall_s"], abs=1e-6)
    assert sum(split[p]["seconds"] for p in PARTS) == pytest.approx(split["wall"]["seconds"], abs=1e-6)
    assert time_split([{"train/loss": 1.0}]) is None


def test_fit_logs_the_split_and_accounting_changes_no_number(tmp_path):
    """A real ``fit`` (tiny preset, curriculum, 6 steps, an evaluation and a checkpoint at step 4):
    every log row carries every part, the parts add up to each interval, evaluation and
    checkpoint time land in their parts at the step that had them; the same run without
    accounting logs no ``time/`` key and the same losses."""
    common = dict(total_steps=6, batch_size=2, max_len=64, log_interval=2, eval_interval=4,
                  checkpoint_interval=4, eval_samples=1, corpus_eval_bytes=0, warmup_steps=1)
    runs = {}
    for on in (True, False):
        run_dir = tmp_path / f"acc{int(on)}"
        fit(TrainConfig(time_accounting=on, **common), preset("tiny"), run_dir=str(run_dir), device="cpu",
            progress=False)
        runs[on] = read_metrics(str(run_dir))
    rows = runs[True]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        parts = [r[f"time/{p}_s"] for p in PARTS]
        assert min(parts) >= 0 and sum(parts) == pytest.approx(r["time/interval_s"], rel=1e-6)
        assert r["time/step_s"] > 0 and r["time/data_s"] > 0 and r["time/record_s"] > 0
    assert rows[1]["time/eval_s"] > 0 and rows[0]["time/eval_s"] == 0   # evaluation at step 4 only
    assert rows[1]["time/checkpoint_s"] > 0 and rows[0]["time/checkpoint_s"] == 0
    split = time_split(rows)
    assert split["step"]["seconds"] == pytest.approx(rows[-1]["time/total/step_s"], rel=1e-9)
    assert not any(k.startswith("time/") for r in runs[False] for k in r)
    assert [r["train/loss"] for r in runs[False]] == [r["train/loss"] for r in rows]
