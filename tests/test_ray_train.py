"""Ray Train on a real local cluster (session fixture, 2 CPUs): DDP and FSDP with 2 workers,
checkpoints in storage, a worker that dies once and is restarted, stop + resubmit with the same
name resuming at its step and curriculum stage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from dnc.training import read_metrics, read_train_state
from ray_jobs.config import JobConfigError, load_job_config

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]

FAST_TRAIN = dict(batch_size=4, max_len=96, warmup_steps=2, log_interval=2, eval_interval=8,
                  eval_samples=1, checkpoint_interval=4, plateau_patience=0, corpus_eval_bytes=0)


def make_job(tmp_path, name, train=None, run=None):
    over = {"train": {**FAST_TRAIN, **(train or {})},
            "run": {"name": name, "storage": str(tmp_path / "storage"), "num_workers": 2,
                    "wandb": "off", "progress": False, "keep_checkpoints": 2, **(run or {})}}
    return load_job_config(str(ROOT / "configs/train/tiny.yaml"), over)


def checkpoints(run_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(run_dir) if d.startswith("step_"))


def train_rows(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


def test_job_config_errors_are_clear(tmp_path):
    with pytest.raises(JobConfigError) as e:
        load_job_config(str(ROOT / "configs/train/tiny.yaml"),
                        {"train": {"lr": -1, "bogus": 1}, "run": {"strategy": "zero3", "name": "bad name"}})
    msg = str(e.value)
    assert "unknown train fields ['bogus']" in msg
    assert "run.strategy" in msg and "run.name" in msg
    with pytest.raises(JobConfigError, match="not found"):
        load_job_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(JobConfigError, match="run.grad_reduce"):
        load_job_config(str(ROOT / "configs/train/tiny.yaml"), {"run": {"grad_reduce": "fp16"}})


def test_bf16_gradient_reduce_needs_a_ddp_model():
    # (the hook itself needs NCCL: it is measured on GPUs by bench/train_scaling.py --grad-reduce bf16)
    import torch

    from dnc.parallel import reduce_grads_in_bf16

    with pytest.raises(TypeError, match="DistributedDataParallel"):
        reduce_grads_in_bf16(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_ddp_two_workers_loss_falls_and_checkpoints_appear(ray_cluster, tmp_path):
    from dnc.checkpoint import load_checkpoint
    from ray_jobs.train import run_training

    job = make_job(tmp_path, "ddp", train={"total_steps": 16, "lr": 3e-3}, run={"wandb": "auto"})
    summary = run_training(job)
    run_dir = job.run_dir
    assert summary["metrics"]["step"] == 16
    assert checkpoints(run_dir) == ["step_00000012", "step_00000016"]       # keep_checkpoints=2
    ck = os.path.join(run_dir, "step_00000016")
    assert sorted(os.listdir(os.path.join(ck, "rng"))) == ["rank_00000.pt", "rank_00001.pt"]
    model, extra = load_checkpoint(ck)
    assert extra["step"] == 16 and model.config.d_model == 128
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3, [r["train/loss"] for r in rows]
    assert rows[-1]["tokens_seen"] > rows[0]["tokens_seen"] > 0
    assert any("eval/acc" in r for r in read_metrics(run_dir))
    # W&B ran offline on rank 0 with the run name as id
    wandb_dir = Path(run_dir) / "wandb"
    assert wandb_dir.exists() and any("ddp" in p.name for p in wandb_dir.iterdir())


@pytest.mark.slow
def test_worker_dies_once_and_run_finishes_from_checkpoint(ray_cluster, tmp_path):
    from ray_jobs.train import run_training

    job = make_job(tmp_path, "fault", train={"total_steps": 10, "fail_at_step": 6, "fail_mode": "exit"},
                   run={"max_failures": 1})
    summary = run_training(job)
    assert summary["metrics"]["step"] == 10
    assert os.path.exists(os.path.join(job.run_dir, ".fault_injected"))     # it did fire
    starts = [r for r in read_metrics(job.run_dir) if "event/start" in r]
    assert [s["resumed_from"] for s in starts] == [-1, 4]                   # restarted from step 4
    assert [r["step"] for r in train_rows(job.run_dir)] == [2, 4, 6, 8, 10]  # rows after 4 replaced
    assert read_train_state(os.path.join(job.run_dir, "step_00000010")).step == 10


@pytest.mark.slow
def test_stop_and_resubmit_same_name_continues_step_and_stage(ray_cluster, tmp_path):
    from ray_jobs.train import run_training

    # A curriculum whose first stage promotes at the first evaluation.
    cur = tmp_path / "curriculum"
    shutil.copytree(ROOT / "configs/curriculum", cur)
    f = cur / "foundation.yaml"
    stage = yaml.safe_load(f.read_text())
    stage.update(promote_at=0.0, min_steps=2)
    f.write_text(yaml.safe_dump(stage))
    train = {"total_steps": 12, "eval_interval": 4, "curriculum_dir": str(cur)}

    first = run_training(make_job(tmp_path, "resume", train={**train, "max_steps": 6}))
    assert first["metrics"]["step"] == 6
    job = make_job(tmp_path, "resume", train=train)
    st = read_train_state(os.path.join(job.run_dir, "step_00000006"))
    assert st.step == 6 and st.data["stage"] == "basic_reasoning" and st.data["stage_index"] == 1

    second = run_training(job)
    assert second["metrics"]["step"] == 12
    starts = [r for r in read_metrics(job.run_dir) if "event/start" in r]
    assert [s["resumed_from"] for s in starts] == [-1, 6]
    rows = train_rows(job.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["stage"] for r in rows] == ["foundation"] + ["basic_reasoning"] * 5
    final = read_train_state(os.path.join(job.run_dir, "step_00000012"))
    assert final.data["stage"] == "basic_reasoning" and final.data["source"]["history"][0]["step"] == 4


@pytest.mark.slow
def test_fsdp_two_workers_gloo_with_stdlib_corpus_through_ray_data(ray_cluster, tmp_path):
    """FSDP2 on CPU (gloo) runs and checkpoints one unsharded model; half the steps train on
    standard-library source streamed by Ray Data; held-out files are scored in bits per byte."""
    import sysconfig

    from dnc.checkpoint import load_checkpoint
    from ray_jobs.train import run_training

    stdlib = sysconfig.get_paths()["stdlib"]
    job = make_job(tmp_path, "fsdp", train={"total_steps": 6, "eval_interval": 3, "corpus_ratio": 0.5,
                                            "corpus_eval_bytes": 4096},
                   run={"strategy": "fsdp", "corpus": [f"{stdlib}/json/*.py", f"{stdlib}/email/*.py"],
                        "corpus_holdout": 0.1, "cpus_per_worker": 0.5})   # leave a CPU to Ray Data
    summary = run_training(job)
    assert summary["metrics"]["step"] == 6
    ck = os.path.join(job.run_dir, "step_00000006")
    model, _ = load_checkpoint(ck)                 # gathered into one unsharded checkpoint
    assert model.config.d_model == 128
    assert sorted(os.listdir(os.path.join(ck, "rng"))) == ["rank_00000.pt", "rank_00001.pt"]
    rows = train_rows(job.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["train/loss"] > 0 for r in rows)
    bpb = [r["eval/bpb"] for r in read_metrics(job.run_dir) if "eval/bpb" in r]
    assert len(bpb) == 2 and all(0 < b < 9 for b in bpb)
