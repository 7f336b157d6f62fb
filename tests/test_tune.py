"""tune.sweep: config validation and a 2-trial ASHA sweep of the tiny preset on the local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_jobs.config import JobConfigError
from tune.sweep import load_sweep_config, main, param_space, summarize

ROOT = Path(__file__).resolve().parents[1]
SWEEP = str(ROOT / "configs/sweep/asha.yaml")


def test_sweep_config_validation():
    sweep = load_sweep_config(SWEEP)
    assert sweep.num_samples == 2 and sweep.scheduler.type == "asha"
    space = param_space(sweep)
    assert set(space["train"]) == {"lr", "warmup_steps"}
    with pytest.raises(JobConfigError, match="search_space"):
        load_sweep_config(SWEEP, {"search_space": {"train.lr": {"normal": [0, 1]}}})
    with pytest.raises(JobConfigError, match="section.field"):
        load_sweep_config(SWEEP, {"search_space": {"lr": {"choice": [1, 2]}}})
    with pytest.raises(JobConfigError, match="lr must be a positive"):
        load_sweep_config(SWEEP, {"overrides": {"train": {"lr": -1}}})


def test_sweep_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "ASHA" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_asha_sweep_runs_two_tiny_trials(ray_cluster, tmp_path):
    from tune.sweep import run_sweep

    sweep = load_sweep_config(SWEEP, {"storage": str(tmp_path / "sweeps"), "name": "t",
                                      "overrides": {"train": {"total_steps": 10, "log_interval": 2,
                                                              "eval_interval": 10, "eval_samples": 1,
                                                              "checkpoint_interval": 10, "max_len": 96}},
                                      "scheduler": {"grace_period": 4}})
    results = run_sweep(sweep)
    summary = summarize(results, sweep)
    assert len(summary["trials"]) == 2
    assert all(t["error"] is None for t in summary["trials"]), summary
    assert all(t["step"] >= 4 for t in summary["trials"])          # at least the grace period
    assert any(t["step"] == 10 for t in summary["trials"])         # the better one ran to the end
    lrs = {t["config"]["train"]["lr"] for t in summary["trials"]}
    assert len(lrs) == 2 and all(3e-4 <= lr <= 1e-2 for lr in lrs)
    assert summary["best"] and summary["best"]["train/loss"] > 0
