"""Training progress on the driver (ray_jobs/progress.py): one bar under a terminal, one line per
update in a log, one short line per checkpoint. A real run with stdout in a file: test_demo.py."""

from __future__ import annotations

import io
import os
import re

from dnc.training import MetricsLogger
from ray_jobs.progress import RunProgress


def _fake_checkpoint(run_dir: str, step: int) -> str:
    d = os.path.join(run_dir, f"step_{step:08d}")
    os.makedirs(d)
    for name in ("train_state.json", "model.safetensors", "config.json"):
        with open(os.path.join(d, name), "w") as f:
            f.write("{}")
    return d


def test_log_lines_once_per_step_and_one_checkpoint_line(tmp_path):
    run_dir = str(tmp_path / "run")
    log = MetricsLogger(run_dir, "run", wandb="off")
    out = io.StringIO()
    progress = RunProgress(run_dir, total=30, stream=out, tty=False, line_every_s=0.0)
    for step in (10, 20):
        log.log({"train/loss": 3.0 - step / 100, "stage": "foundation", "throughput/tokens_per_s": 1234.0}, step)
        progress.poll()
        progress.poll()   # nothing new: nothing printed
    _fake_checkpoint(run_dir, 20)
    progress.poll()
    log.log({"eval/acc": 0.5}, 25)          # a row without train/loss is no progress update
    log.log({"train/loss": 2.5, "stage": "recall"}, 30)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[dnc] step 10/30  loss 2.900  stage foundation  1,234 tok/s",
        "[dnc] step 20/30  loss 2.800  stage foundation  1,234 tok/s",
        f"[dnc] checkpoint step 20  loss 2.800  stage foundation  {run_dir}/step_00000020",
        "[dnc] step 30/30  loss 2.500  stage recall",
    ]


def test_lines_are_throttled_but_the_last_step_always_shows(tmp_path):
    run_dir = str(tmp_path / "run")
    log = MetricsLogger(run_dir, "run", wandb="off")
    out = io.StringIO()
    progress = RunProgress(run_dir, total=40, stream=out, tty=False, line_every_s=3600.0)
    for step in (10, 20, 30):
        log.log({"train/loss": 1.0}, step)
        progress.poll()
    log.log({"train/loss": 0.5}, 40)
    progress.close()
    steps = re.findall(r"step (\d+)/40", out.getvalue())
    assert steps == ["10", "40"]


def test_earlier_rows_and_checkpoints_of_a_resumed_run_are_not_shown_again(tmp_path):
    run_dir = str(tmp_path / "run")
    log = MetricsLogger(run_dir, "run", wandb="off")
    log.log({"train/loss": 4.0}, 10)
    _fake_checkpoint(run_dir, 10)
    out = io.StringIO()
    progress = RunProgress(run_dir, total=20, stream=out, tty=False, line_every_s=0.0)
    log.log({"train/loss": 3.0}, 20)
    _fake_checkpoint(run_dir, 20)
    progress.close()
    text = out.getvalue()
    assert "step 10/20" not in text and "checkpoint step 10" not in text
    assert "[dnc] step 20/20  loss 3.000" in text and "checkpoint step 20" in text


def test_a_terminal_gets_one_bar(tmp_path):
    run_dir = str(tmp_path / "run")
    log = MetricsLogger(run_dir, "run", wandb="off")
    out = io.StringIO()
    progress = RunProgress(run_dir, total=20, stream=out, tty=True)
    log.log({"train/loss": 2.0, "stage": "foundation"}, 10)
    progress.poll()
    assert progress._bar.n == 10
    log.log({"train/loss": 1.0, "stage": "foundation"}, 20)
    progress.close()
    assert progress._bar.n == 20
    assert "loss=1.000 stage=foundation" in out.getvalue()
    assert "[dnc] step" not in out.getvalue()   # a bar, not lines


# A real run with stdout in a log file is checked in
# tests/test_demo.py::test_demo_serves_while_training_then_swaps_in_the_trained_checkpoint: the demo
# trains through the same run_training and driver-side RunProgress, with Ray Data streaming the
# stdlib corpus, and its log must hold each update once, one line per checkpoint and no bars.
