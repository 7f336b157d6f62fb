"""Unit tests for dnc/training/ (no Ray): config validation, schedule, plateau, step, evaluation,
checkpoints and exact resume of the single-process loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnc.config import ConfigError, preset
from dnc.training import (LRSchedule, MetricsLogger, PlateauDetector, TrainConfig, TrainState, Trainer,
                          build_optimizer, corpus_windows, fit, latest_checkpoint, per_sample_loss, read_metrics,
                          read_train_state, task_accuracy, text_bits_per_byte, train_step)

ROOT = Path(__file__).resolve().parents[1]


def tiny_train(**kw) -> TrainConfig:
    base = dict(total_steps=8, warmup_steps=2, batch_size=4, max_len=96, log_interval=2, eval_interval=4,
                eval_samples=1, checkpoint_interval=4, plateau_patience=0)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("bad, msg", [
    (dict(lr=0), "lr must be a positive"),
    (dict(warmup_steps=10, total_steps=5), "warmup_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(checkpoint_interval=15, log_interval=10), "multiple of log_interval"),
    (dict(fail_mode="boom"), "fail_mode"),
    (dict(corpus_ratio=1.5), "corpus_ratio"),
])
def test_train_config_validation_names_the_field(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**bad)


def test_train_config_round_trip_and_unknown_fields():
    cfg = tiny_train(lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown train config fields"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    assert tiny_train(max_steps=3).stop_step == 3 and tiny_train().stop_step == 8


# ------------------------------------------------------------------------------ schedule
def test_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, plateau_patience=0)
    s = LRSchedule(cfg)
    lrs = [s.lr_at(i) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)          # linear warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:110], lrs[11:111]))            # monotone decay
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)                      # cosine midpoint
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)        # floor after the end


def test_plateau_detector_lowers_scale_and_resets():
    p = PlateauDetector(patience=2, factor=0.5, threshold=0.01, min_scale=0.2)
    assert not p.update(1.0) and not p.update(0.9)        # improving
    assert not p.update(0.95)                              # 1 bad
    assert p.update(0.91) and p.scale == 0.5               # 2 bad -> lower
    assert not p.update(0.95) and p.update(0.95) and p.scale == 0.25
    assert p.update(0.95) is False and p.update(0.95) and p.scale == 0.2    # floored at min_scale
    assert not p.update(0.95) and not p.update(0.95)       # never below min_scale
    p.reset()
    assert p.best == math.inf and p.bad == 0
    q = PlateauDetector(2, 0.5, 0.01, 0.2)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q.state_dict() == p.state_dict()


def test_schedule_applies_plateau_scale():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, total_steps=100, min_lr_ratio=1.0, plateau_patience=1)
    s = LRSchedule(cfg)
    s.plateau.update(1.0)
    s.plateau.update(1.0)
    assert s.lr_at(50) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ step
def test_per_sample_loss_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    got = per_sample_loss(logits, targets, mask)
    for b in range(3):
        keep = (targets[b] != -100) & mask[b]
        ref = F.cross_entropy(logits[b][keep], targets[b][keep])
        torch.testing.assert_close(got[b], ref)


def test_build_optimizer_groups_and_train_step_lowers_loss():
    from dnc.model import DNC

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = DNC(cfg)
    opt = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "embed.weight" in {names[id(p)] for p in no_decay["params"]}
    from dnc.data.tasks import collate, generate

    rng = np.random.default_rng(0)
    batch = collate([generate(t, rng, 64, 0.0) for t in ("copy", "needle", "kv_retrieval", "mqar")],
                    pad_to_multiple=cfg.segment_len)
    batch = {k: batch[k] for k in ("tokens", "targets", "loss_mask")}
    first = train_step(model, batch, opt, clip=1.0)
    for _ in range(4):
        last = train_step(model, [batch, batch], opt, clip=1.0)   # grad accumulation path
    assert last["loss"] < first["loss"] - 0.5
    assert first["sample_losses"].shape == (4,) and last["sample_losses"].shape == (8,)
    assert first["tokens"] == batch["tokens"].numel() and first["grad_norm"] > 0


# ------------------------------------------------------------------------------ evaluation
def test_task_accuracy_and_text_bits_per_byte_shapes():
    from dnc.model import DNC

    torch.manual_seed(0)
    model = DNC(preset("tiny"))
    res = task_accuracy(model, ["copy", "needle"], [64, 96], n=2)
    assert set(res) == {"copy", "needle"} and set(res["copy"]) == {64, 96}
    assert all(0.0 <= a <= 1.0 for r in res.values() for a in r.values())
    bpb = text_bits_per_byte(model, b"def f(x):\n    return x + 1\n" * 40, context_len=64)
    # an untrained model is close to uniform over 272 ids: about log2(272) = 8.09 bits
    assert 6.0 < bpb < 9.5
    assert model.training   # evaluation restores the mode


def test_corpus_windows_yield_shifted_batches():
    it = corpus_windows([b"abcdefghij" * 30], seq_len=16, batch_size=3, seed=0)
    b = next(it)
    assert b["tokens"].shape == (3, 16) and b["targets"].shape == (3, 16)
    assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])


# ------------------------------------------------------------------------------ state + checkpoints
def test_train_state_json_round_trip():
    st = TrainState(step=7, tokens_seen=123, schedule={"plateau": {"best": None, "bad": 1, "scale": 0.5}},
                    data={"stage": "foundation", "stage_index": 0, "mix_rng": {"state": {"state": 2**100}}},
                    loss_ema=1.5, last_metrics={"train/loss": 2.0})
    back = TrainState.from_json(st.to_json())
    assert back == st


def test_metrics_logger_truncates_rows_after_resume_step(tmp_path):
    log = MetricsLogger(str(tmp_path), "r", wandb="off")
    for s in (2, 4, 6, 8):
        log.log({"train/loss": float(s), "step": 99.0, "nan": float("nan")}, s)
    log.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 6, 8]
    assert "nan" not in read_metrics(str(tmp_path))[0]
    MetricsLogger(str(tmp_path), "r", wandb="off", resume_step=4).close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4]


def test_checkpoint_round_trip_restores_everything(tmp_path):
    from dnc.checkpoint import load_checkpoint

    cfg = tiny_train(total_steps=4, max_steps=4)
    fit(cfg, preset("tiny"), run_dir=str(tmp_path / "run"), progress=False)
    ck = latest_checkpoint(str(tmp_path / "run"))
    assert ck.endswith("step_00000004")
    st = read_train_state(ck)
    assert st.step == 4 and st.data["stage"] == "foundation" and st.train_config["total_steps"] == 4
    model, extra = load_checkpoint(ck)       # the training checkpoint is a plain model checkpoint too
    assert extra["step"] == 4
    t = Trainer(cfg.replace(max_steps=None), preset("tiny"), resume_from=ck, progress=False)
    assert t.step == 4 and t.state.tokens_seen == st.tokens_seen
    for (n, a), (_, b) in zip(model.state_dict().items(), t.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert len(t.optimizer.state) > 0 and all("exp_avg" in s for s in t.optimizer.state.values())


def test_fit_resume_is_exact(tmp_path):
    """8 steps straight == 6 steps, stop, resume to 8: same weights, same losses (RNG, curriculum,
    optimizer and schedule state all come back; the early stop adds no evaluation)."""
    cfg = tiny_train()
    a = fit(cfg, preset("tiny"), run_dir=str(tmp_path / "a"), progress=False)
    fit(cfg.replace(max_steps=6), preset("tiny"), run_dir=str(tmp_path / "b"), progress=False)
    b = fit(cfg, preset("tiny"), run_dir=str(tmp_path / "b"), progress=False)
    assert a["step"] == b["step"] == 8
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7)
    from dnc.checkpoint import load_checkpoint

    ma, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "a")))
    mb, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "b")))
    # Runs can differ in the last float bits (multithreaded CPU reductions), and Adam turns noise in
    # near-zero gradients (zero-initialised router) into lr-sized steps, so compare all weights
    # together: a wrong RNG/curriculum/optimizer restore moves them by ~1e-2 relative.
    xa = torch.cat([v.flatten().float() for v in ma.state_dict().values()])
    xb = torch.cat([v.flatten().float() for v in mb.state_dict().values()])
    assert float((xa - xb).norm() / xa.norm()) < 1e-4
    rows_a, rows_b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [r["step"] for r in rows_b] == [2, 4, 6, 8]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], rel=1e-5)


def test_fault_switch_raises_once(tmp_path):
    from dnc.training import InjectedFault

    marker = str(tmp_path / "fault")
    cfg = tiny_train(total_steps=4, fail_at_step=3, fail_mode="raise", fail_marker=marker)
    with pytest.raises(InjectedFault):
        fit(cfg, preset("tiny"), run_dir=str(tmp_path / "r"), progress=False)
    out = fit(cfg, preset("tiny"), run_dir=str(tmp_path / "r"), progress=False)   # resumes from step 2
    assert out["step"] == 4


def test_max_minutes_stops_early_with_a_checkpoint_and_resume_continues(tmp_path):
    run = str(tmp_path / "r")
    cfg = tiny_train(total_steps=8, max_minutes=1e-6)   # over budget at the first log step
    out = fit(cfg, preset("tiny"), run_dir=run, progress=False)
    assert out["step"] == 2
    assert read_train_state(latest_checkpoint(run)).step == 2
    out = fit(cfg.replace(max_minutes=None), preset("tiny"), run_dir=run, progress=False)
    assert out["step"] == 8


def test_init_from_starts_a_fresh_run_from_weights_with_another_segment_len(tmp_path):
    first = str(tmp_path / "seg32")
    fit(tiny_train(total_steps=4), preset("tiny"), run_dir=first, progress=False)
    from dnc.checkpoint import load_checkpoint

    trained, _ = load_checkpoint(latest_checkpoint(first))
    longer = preset("tiny", segment_len=64)           # same parameter shapes, longer segments
    t = Trainer(tiny_train(init_from=first), longer, device="cpu", progress=False)
    assert t.state.step == 0 and t.model.config.segment_len == 64
    for (name, a), b in zip(trained.state_dict().items(), t.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="parameter shapes differ"):
        Trainer(tiny_train(init_from=first), preset("tiny", d_model=64), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="neither a checkpoint nor a run directory"):
        Trainer(tiny_train(init_from=str(tmp_path / "nothing")), preset("tiny"), device="cpu", progress=False)


def test_batch_tokens_sizes_curriculum_batches_by_stage_length():
    from dnc.training import TaskSource

    src = TaskSource(tiny_train(max_len=256, batch_tokens=1024), rank=0, pad_to_multiple=1, segment_len=32)
    n = src.batch_size()
    assert n == 1024 // src.curriculum.stage.max_len
    batch, tasks = src.next_batch()
    assert batch["tokens"].shape[0] == len(tasks) == n
    assert TaskSource(tiny_train(), rank=0, pad_to_multiple=1, segment_len=32).batch_size() == 4   # falls back to batch_size
    few = TaskSource(tiny_train(max_len=256, batch_tokens=64), rank=0, pad_to_multiple=1, segment_len=32)
    assert few.batch_size() == max(1, 64 // few.curriculum.stage.max_len) < 6
    rows = TaskSource(tiny_train(max_len=256, batch_tokens=64, min_batch_rows=6), rank=0, pad_to_multiple=1,
                      segment_len=32)
    assert rows.batch_size() == 6 and rows.next_batch()[0]["tokens"].shape[0] == 6   # the floor holds
    with pytest.raises(ConfigError, match="min_batch_rows"):
        tiny_train(min_batch_rows=0).validate()


# ------------------------------------------------------------------------------ CLIs around it
def test_evaluate_cli_writes_json_markdown_and_heatmap(tmp_path):
    from ray_jobs.evaluate import main, parse_lengths

    assert parse_lengths("1k,4k,512,1M") == [1024, 4096, 512, 1024 ** 2]
    fit(tiny_train(total_steps=2), preset("tiny"), run_dir=str(tmp_path / "run"), progress=False)
    out = tmp_path / "eval"
    rc = main(["--checkpoint", str(tmp_path / "run"), "--lengths", "64,96", "--tasks", "copy,needle",
               "--n", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["checkpoint"].endswith("step_00000002")
    assert set(report["accuracy"]) == {"copy", "needle"} and set(report["accuracy"]["copy"]) == {"64", "96"}
    assert "| copy |" in (out / "eval.md").read_text()
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_train_scaling_bench_help_dry_run_and_cpu_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "bench" / "train_scaling.py")
    for args in (["--help"], ["--dry-run", "--device", "cuda"]):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "flops_per_token" in r.stdout
    out = tmp_path / "ts.json"
    r = subprocess.run([sys.executable, script, "--device", "cpu", "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["results"]["single"]["tokens_per_s"] > 0 and "| single | 1 |" in r.stdout
    assert "Device: CPU" in r.stdout and "0x None" not in r.stdout        # no GPU named on a CPU run


@pytest.mark.parametrize("argv, ratio", [
    (["--config", "configs/train/small.yaml", "--run.corpus", "stdlib"], 0.25),        # the config's own ratio
    (["--config", "configs/train/tiny.yaml", "--run.corpus", "stdlib"], 0.5),          # none set: half the steps
    (["--config", "configs/train/tiny.yaml", "--run.corpus", "stdlib", "--train.corpus_ratio", "0.1"], 0.1),
    (["--config", "configs/train/tiny.yaml"], 0.0),                                      # no corpus, no text steps
])
def test_train_cli_corpus_ratio_defaults(argv, ratio):
    from ray_jobs.config import parse_job

    job = parse_job(argv)
    assert job.train.corpus_ratio == ratio


def test_job_config_is_typed_and_resolves_storage_on_the_driver(tmp_path, monkeypatch):
    from ray_jobs.config import JobConfig, JobConfigError, parse_job

    monkeypatch.chdir(tmp_path)
    job = parse_job(["--config", str(ROOT / "configs/train/tiny.yaml"), "--train.lr", "1e-3",
                     "--model.overrides.segment_len", "64", "--run.storage", "runs"])
    assert isinstance(job, JobConfig) and isinstance(job.train, TrainConfig)
    assert job.train.lr == 1e-3 and job.model_config().segment_len == 64
    assert job.model_config().write_importance == 50.0           # the YAML's override is kept
    assert job.run_dir == str(tmp_path / "runs" / "dnc-tiny")    # absolute, from the driver's cwd
    with pytest.raises(JobConfigError, match="lr must be a positive"):
        parse_job(["--config", str(ROOT / "configs/train/tiny.yaml"), "--train.lr", "-1"])
    with pytest.raises(JobConfigError, match="train.corpus_ratio > 0 needs a corpus"):
        parse_job(["--train.corpus_ratio", "0.5"])


def _dnc(*args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_dnc_help_reads_cleanly():
    top = _dnc("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "evaluate", "sweep", "serve",
                                                                    "generate", "demo"))
    for cmd in ("train", "evaluate", "sweep", "serve", "generate", "demo"):
        out = _dnc(cmd, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, (cmd, out.stderr[-2000:])
        assert "``" not in out.stdout and ":class:" not in out.stdout, cmd          # no raw RST
        assert "(default:" not in out.stdout, cmd      # jsonargparse adds "(type: ..., default: ...)" once
    assert "Peak learning rate" in _dnc("train", "--help").stdout                    # field docstrings


def test_dnc_argument_errors_fail_fast_with_one_line(tmp_path):
    import time

    for args, what in ((["generate", "--prompt", "hi", "--checkpoint", str(tmp_path / "nope")], "nope"),
                       (["serve", "--checkpoint", str(tmp_path / "nope")], "nope"),
                       (["serve", "--app", "{kv_attenton: flex}"], "kv_attenton"),
                       (["train", "--config", str(ROOT / "configs/train/tiny.yaml"), "--train.lr", "-1"], "lr"),
                       (["train", "--train.bogus", "1"], "bogus"),
                       (["evaluate", "--checkpoint", str(tmp_path / "nope")], "nope")):
        t0 = time.time()
        out = _dnc(*args)
        assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], (args, out.stderr)
        assert time.time() - t0 < 30, args


def test_dnc_generate_takes_a_run_directory(tmp_path):
    run = tmp_path / "run"
    fit(tiny_train(total_steps=2), preset("tiny"), run_dir=str(run), progress=False)
    out = _dnc("generate", "--prompt", "def ", "--checkpoint", str(run), "--max_new_tokens", "4")
    assert out.returncode == 0, out.stderr[-2000:]


def test_dnc_serve_app_mapping_reaches_the_app_arguments():
    """``dnc serve --app '{...}'``: AppArgs fields beside the flags, validated before anything starts."""
    from ray_jobs.parsing import UsageError
    from ray_jobs.serving import checked_app, serve_app_args

    args = serve_app_args(None, "runs/x", "auto", None, {"kv_attention": "flex", "max_batch_size": 32})
    assert args == {"kv_attention": "flex", "max_batch_size": 32, "storage": "runs/x", "dtype": "auto", "proxy": None}
    checked_app(args)  # a valid app (no Ray needed to build it)
    with pytest.raises(UsageError, match="max_batch_size"):
        checked_app(serve_app_args(None, "runs/x", "auto", None, {"max_batch_size": 0}))
    with pytest.raises(UsageError, match="mapping"):
        serve_app_args(None, "runs/x", "auto", None, [1, 2])
    with pytest.raises(UsageError, match="use --storage instead"):
        serve_app_args(None, "runs/x", "auto", None, {"storage": "elsewhere"})

