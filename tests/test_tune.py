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
    out = capsys.readouterr().out
    assert e.value.code == 0 and "ASHA" in out and "PBT" in out


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


PBT = str(ROOT / "configs/sweep/pbt.yaml")


def test_pbt_config_validation():
    sweep = load_sweep_config(PBT)
    assert sweep.scheduler.type == "pbt" and sweep.perturbation_interval(sweep.base_job()) == 10
    from tune.sweep import pbt_mutations

    mutations = pbt_mutations(sweep)
    assert mutations["train"]["weight_decay"] == [0.0, 0.05, 0.1]           # stays one of the choices
    assert type(mutations["train"]["lr"]).__name__ == "Float"               # loguniform: scaled or drawn
    with pytest.raises(JobConfigError, match="trial_mode inprocess"):
        load_sweep_config(PBT, {"trial_mode": "ray_train"})
    with pytest.raises(JobConfigError, match="multiple of train.checkpoint_interval"):
        load_sweep_config(PBT, {"scheduler": {"perturbation_interval": 15}})
    with pytest.raises(JobConfigError, match="cannot mutate grid"):
        load_sweep_config(PBT, {"search_space": {"train.lr": {"grid": [1e-3, 2e-3]}}})
    with pytest.raises(JobConfigError, match="quantile_fraction"):
        load_sweep_config(PBT, {"scheduler": {"quantile_fraction": 0.9}})


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_sweep_writes_the_best_trial_as_a_training_yaml(ray_cluster, tmp_path, capsys):
    """A 2-trial PBT sweep through ``dnc sweep``; the best trial's YAML loads with ``dnc train
    --config X --print_config`` and the JobConfig loader, holding that trial's values."""
    import json

    import yaml

    from ray_jobs.cli import main as dnc_main
    from ray_jobs.config import load_job_config

    out = tmp_path / "summary.json"
    rc = dnc_main(["sweep", "--config", PBT, "--storage", str(tmp_path / "sweeps"), "--name", "p",
                   "--overrides.train.total_steps", "20", "--overrides.train.eval_interval", "20",
                   "--overrides.train.max_len", "96", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    summary = json.loads(out.read_text())
    assert len(summary["trials"]) == 2 and all(t["step"] == 20 for t in summary["trials"])   # PBT stops none
    best = summary["best"]
    losses = [t["train/loss"] for t in summary["trials"]]
    assert best["train/loss"] == min(losses)
    path = best["job_yaml"]
    assert path == str(tmp_path / "sweeps" / "p" / "best_job.yaml")

    job = load_job_config(path)
    assert job.train.lr == pytest.approx(best["config"]["train"]["lr"])
    assert job.train.weight_decay == pytest.approx(best["config"]["train"]["weight_decay"])
    assert job.train.total_steps == 20 and job.train.checkpoint_interval == 10   # the sweep's overrides
    assert job.run.name == "p-best" and job.run.num_workers == 1

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dnc_main(["train", "--config", path, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == pytest.approx(best["config"]["train"]["lr"])
    assert printed["run"]["name"] == "p-best"


def test_override_flags_merge_into_the_yaml_overrides_with_typed_values():
    """``--overrides.train.X`` flags add to the sweep YAML's overrides (not replace them) and are
    read as YAML values (20, not "20")."""
    from ray_jobs.cli import command_parser
    from tune.sweep import split_override_flags, sweep_from_namespace

    p = command_parser("sweep")
    argv, extra = split_override_flags(["--config", PBT, "--overrides.train.total_steps", "20",
                                        "--overrides.train.eval_interval=20", "--num_samples", "3"])
    assert argv == ["--config", PBT, "--num_samples", "3"]
    assert extra == {"train": {"total_steps": 20, "eval_interval": 20}}
    sweep = sweep_from_namespace(p, p.parse_args(argv), extra)
    job = sweep.base_job()
    assert (job.train.total_steps, job.train.eval_interval) == (20, 20)
    assert job.train.checkpoint_interval == 10 and job.train.batch_size == 4   # from the YAML
    assert sweep.num_samples == 3
    with pytest.raises(JobConfigError, match="SECTION model, train or run"):
        split_override_flags(["--overrides.bogus.x", "1"])
