"""dnc/training/portable.py on a real tiny training run (CPU, real files): pack into parts under a
size limit, unpack, resume with the Trainer (step, stage, data state, RNG and bf16-rounded weights
come back; a fresh optimizer and a re-warmed LR), a corrupt or missing part named in the error,
and bench/long_context.py --resume continuing a chain from an unpacked run dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dnc.config import preset
from dnc.training import LRSchedule, TrainConfig, Trainer, fit, latest_checkpoint, read_metrics, read_train_state
from dnc.training.portable import MANIFEST, main

ROOT = Path(__file__).resolve().parents[1]
STAGE = "basic_reasoning"   # the second stage: a resume that lost the curriculum state would start at the first
MAX_MIB = 0.3               # the tiny preset's ~1.1 MB of bf16 weights -> 4 parts


def tiny_train(**kw) -> TrainConfig:
    base = dict(total_steps=8, warmup_steps=4, batch_size=4, max_len=96, log_interval=2, eval_interval=4,
                eval_samples=1, checkpoint_interval=4, plateau_patience=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    """A tiny run trained 4 steps from the second curriculum stage, and its pack."""
    root = tmp_path_factory.mktemp("portable")
    run = root / "run"
    fit(tiny_train(max_steps=4, curriculum_start=STAGE), preset("tiny"), run_dir=str(run), progress=False)
    assert main(["pack", str(run), str(root / "pack"), "--max-file-mib", str(MAX_MIB)]) == 0
    return {"root": root, "run": run, "ckpt": latest_checkpoint(str(run)), "pack": root / "pack"}


def test_pack_obeys_the_part_size_limit_and_leaves_out_the_optimizer(packed):
    pack = packed["pack"]
    m = json.loads((pack / MANIFEST).read_text())
    parts = m["weights"]["parts"]
    limit = int(MAX_MIB * (1 << 20))
    assert len(parts) >= 3
    assert sorted(p.name for p in pack.iterdir()) == sorted([MANIFEST] + [q["file"] for q in parts])
    for q in parts:
        assert (pack / q["file"]).stat().st_size == q["bytes"] <= limit
    assert sum(q["bytes"] for q in parts) == m["weights"]["bytes"]
    fp32 = (Path(packed["ckpt"]) / "model.safetensors").stat().st_size
    assert m["weights"]["bytes"] < 0.55 * fp32   # bf16: about half the float32 file
    assert m["step"] == 4 and m["dtype"] == "bfloat16" and m["optimizer"].startswith("not included")
    assert m["train_state"]["data"]["stage"] == STAGE and m["rng"] is not None
    assert [json.loads(r)["step"] for r in m["metrics_jsonl"].splitlines()] == [2, 4]


def test_unpack_then_resume_restores_step_stage_rng_and_bf16_weights(packed, capsys):
    run_b = packed["root"] / "resumed"
    assert main(["unpack", str(packed["pack"]), str(run_b)]) == 0
    ck = run_b / "checkpoints" / "step_00000004"
    assert latest_checkpoint(str(run_b)) == str(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "extra.json", "model.safetensors", "rng",
                                                    "train_state.json"]   # no optimizer.pt
    src = load_file(str(Path(packed["ckpt"]) / "model.safetensors"))
    got = load_file(str(ck / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in got.values())
    for k, v in src.items():   # the bf16 rounding of the packed weights, exactly
        assert torch.equal(got[k], v.to(torch.bfloat16).float()), k
        torch.testing.assert_close(got[k], v, rtol=2 ** -8, atol=0.0)
    assert read_train_state(str(ck)).to_json() == read_train_state(packed["ckpt"]).to_json()

    # resumed without curriculum_start: the stage has to come from the checkpoint
    cfg = tiny_train()
    capsys.readouterr()
    t = Trainer(cfg, preset("tiny"), resume_from=str(ck), device="cpu", progress=False)
    assert "has no optimizer.pt: fresh AdamW, LR re-warmed over 4 steps from step 4" in capsys.readouterr().out
    saved_rng = torch.load(ck / "rng" / "rank_00000.pt", weights_only=False)
    assert torch.equal(torch.get_rng_state(), saved_rng["rng"]["torch"])
    assert t.step == 4 and t.data.stage_name == STAGE
    assert t.data.state_dict() == read_train_state(packed["ckpt"]).data["source"]
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, got[k]), k
    assert len(t.optimizer.state) == 0
    assert t.schedule.lr_at(4) == pytest.approx(t.schedule.base_at(4) / 4)

    # the chain goes on: fit resumes in the unpacked run dir, with the re-warmed LR
    out = fit(cfg.replace(max_steps=6), preset("tiny"), run_dir=str(run_b), progress=False)
    assert out["step"] == 6
    assert out["lr"] == pytest.approx(LRSchedule(cfg).base_at(5) * 2 / 4)   # step 6's update: 2nd re-warm step
    new = latest_checkpoint(str(run_b))
    assert new.endswith("step_00000006") and os.path.exists(f"{new}/optimizer.pt")
    st = read_train_state(new)
    assert st.schedule["rewarm_from"] == 4 and st.data["stage"] == STAGE
    assert [r["step"] for r in read_metrics(str(run_b))] == [2, 4, 6]   # the packed history continues


def test_rewarm_ramps_back_to_the_schedule_and_survives_a_checkpoint():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, total_steps=200, plateau_patience=0)
    s = LRSchedule(cfg)
    assert "rewarm_from" not in s.state_dict()   # checkpoints without a re-warm are as before
    plain = [s.lr_at(i) for i in range(100, 120)]
    s.rewarm(100)
    lrs = [s.lr_at(i) for i in range(100, 120)]
    assert lrs[0] == pytest.approx(plain[0] / 10) and lrs[4] == pytest.approx(plain[4] / 2)
    assert lrs[9:] == plain[9:]   # back on the schedule after warmup_steps
    s2 = LRSchedule(cfg)
    s2.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert [s2.lr_at(i) for i in range(100, 120)] == lrs


def test_corrupt_missing_and_existing_give_a_clear_error(packed, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(packed["pack"], bad)
    run = tmp_path / "run"
    data = bytearray((bad / "weights-01.bin").read_bytes())
    data[100] ^= 0xFF
    (bad / "weights-01.bin").write_bytes(bytes(data))
    (bad / "weights-02.bin").unlink()
    capsys.readouterr()
    assert main(["unpack", str(bad), str(run)]) == 2
    err = capsys.readouterr().err
    assert "weights-01.bin is corrupt: its sha256 differs" in err and "weights-02.bin is missing" in err
    assert not (run / "checkpoints").exists()

    shutil.copy(packed["pack"] / "weights-02.bin", bad / "weights-02.bin")
    (bad / "weights-01.bin").write_bytes(bytes(data[:-10]))
    assert main(["unpack", str(bad), str(run)]) == 2
    assert "weights-01.bin is corrupt: " in capsys.readouterr().err

    assert main(["unpack", str(tmp_path), str(run)]) == 2
    assert f"holds no {MANIFEST}" in capsys.readouterr().err

    good = tmp_path / "good"
    assert main(["unpack", str(packed["pack"]), str(good)]) == 0
    assert main(["unpack", str(packed["pack"]), str(good)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["unpack", str(packed["pack"]), str(good), "--force"]) == 0

    assert main(["pack", str(tmp_path / "nothing"), str(tmp_path / "p")]) == 2
    assert "neither a training checkpoint" in capsys.readouterr().err


def test_help():
    for args in ([], ["pack"], ["unpack"]):
        proc = subprocess.run([sys.executable, "-m", "dnc.training.portable", *args, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: python -m dnc.training.portable" in proc.stdout, proc.stderr


def test_long_context_resume_continues_from_an_unpacked_run_dir(tmp_path):
    """The two-call chain of the README: train, pack; (another machine) unpack, --resume."""
    common = [sys.executable, str(ROOT / "bench" / "long_context.py"), "--preset", "tiny", "--max-len", "128",
              "--train-only", "--skip-baseline", "--set", "log_interval=1", "--set", "eval_interval=2",
              "--set", "eval_samples=1", "--set", "corpus_eval_bytes=1024", "--device", "cpu", "--threads", "1",
              "--tag", "t"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")

    def bench(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(common + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    bench("--max-steps", "2", "--set", f"curriculum_start={STAGE}", "--work-dir", str(tmp_path / "w1"),
          "--out", str(tmp_path / "o1"))
    assert main(["pack", str(tmp_path / "w1" / "t" / "dnc"), str(tmp_path / "carried"),
                 "--max-file-mib", str(MAX_MIB)]) == 0
    assert main(["unpack", str(tmp_path / "carried"), str(tmp_path / "w2" / "t" / "dnc")]) == 0
    proc = bench("--resume", "--max-steps", "4", "--work-dir", str(tmp_path / "w2"), "--out", str(tmp_path / "o2"))
    assert "has no optimizer.pt" in proc.stdout + proc.stderr
    res = json.loads((tmp_path / "o2" / "long_context_t.json").read_text())
    training = res["models"]["dnc"]["training"]
    assert training["steps"] == 4 and training["final_stage"] == STAGE
    assert [s["first_step"] for s in training["stages"]] == [2]   # the first call's evaluation travelled
