"""``dnc serve`` / ``dnc demo`` as a user runs them (real processes, real Ray, real HTTP):
argument errors in one line with exit 2; the demo serves before it trains, the UI's training
monitor sees the run grow, the trained checkpoint is swapped in, the driver's progress lines in its
log appear once each; one Ctrl-C stops it all, and so does a SIGTERM to the driver alone (as
``kill``, systemd and Kubernetes send it), leaving no process of its local Ray cluster behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = int(os.environ.get("DNC_SERVE_TEST_PORT", "8211"))

TINY_DEMO_YAML = """
model: {preset: tiny}
train: {lr: 3.0e-3, warmup_steps: 2, total_steps: 400, batch_size: 2, max_len: 64, log_interval: LOG_INTERVAL,
        eval_interval: 20, eval_samples: 2, checkpoint_interval: 20, curriculum_dir: configs/curriculum,
        corpus_eval_bytes: 0}
run: {wandb: "off", keep_checkpoints: 2}
"""


def _dnc(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [["serve", "--seconds", "1"], ["demo", "--steps", "1"]])
def test_malformed_api_keys_fail_in_one_line_with_exit_2(command):
    t0 = time.time()
    r = _dnc(*command, "--port", str(PORT), env={"DNC_API_KEYS": "alice-without-a-key"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "DNC_API_KEYS" in lines[0] or "owner:key" in lines[0], lines[0]
    assert time.time() - t0 < 30   # no Ray cluster was started


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_bad_port_fails_in_one_line(command):
    r = _dnc(command, "--port", "70000")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --port"), r.stderr


@pytest.mark.parametrize("given, corpus", [(["--corpus", "docs/*.md"], "docs/*.md"),
                                           (["--corpus", '["docs/*.md", "README.md"]'], ["docs/*.md", "README.md"]),
                                           ([], None)])
def test_demo_corpus_takes_a_path_or_a_json_list(given, corpus):
    """``dnc demo --corpus`` as a user would type it: one path or glob, or a JSON list (a bare path
    used to fail with jsonargparse's "Does not validate against any of the Union subtypes")."""
    from ray_jobs.cli import command_parser

    assert command_parser("demo").parse_args(given).corpus == corpus


def _get(path: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen, log) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"dnc demo exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _start_demo(tmp_path, steps: int, log_interval: int = 5) -> tuple[subprocess.Popen, object]:
    """``dnc demo`` on the tiny YAML above, its corpus a handful of standard-library files: the
    Ray Data path is the one ``make run`` takes, with 4 files to read, not ~560 (``stdlib``:
    Ray Data's execution took 9-11 s instead of 17.5 s on 2 cores at load 4-6)."""
    import sysconfig

    cfg = tmp_path / "demo.yaml"
    cfg.write_text(TINY_DEMO_YAML.replace("LOG_INTERVAL", str(log_interval)))
    corpus = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
    log = tmp_path / "demo.log"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    f = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.cli", "demo", "--steps", str(steps), "--workers", "1",
         "--storage", str(tmp_path / "runs"), "--port", str(PORT), "--train_config", str(cfg),
         "--serve_seconds", "600", "--corpus", json.dumps([corpus])],
        cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop(proc: subprocess.Popen, log, sig: int = signal.SIGINT) -> float:
    """One SIGINT to the process group (a Ctrl-C), or ``sig`` to the driver alone; the seconds until
    the process is gone."""
    t0 = time.time()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"one Ctrl-C did not stop dnc demo within 60 s:\n{log.read_text()[-3000:]}")
    return time.time() - t0


def _port_closed() -> bool:
    try:
        _get("/health", timeout=2)
    except OSError:
        return True
    return False


@pytest.mark.ray
@pytest.mark.slow
def test_demo_serves_while_training_then_swaps_in_the_trained_checkpoint(tmp_path):
    proc, log = _start_demo(tmp_path, steps=40)
    took = 0.0
    try:
        _wait_for(lambda: "BWR-DNC is serving" in log.read_text(), 180, "the UI link", proc, log)
        served_before = _get("/model/stats")
        finished = "now serving the trained model" in log.read_text()
        assert served_before["checkpoint"] is None or finished, served_before["source"]
        assert "untrained" in served_before["source"] or finished
        # the UI's training monitor sees the demo run while it trains
        seen_steps: list[int] = []

        def run_rows_grow() -> bool:
            runs = {r["run"]: r for r in _get("/v1/runs")["runs"]}
            if "demo" in runs and runs["demo"].get("last_step") is not None:
                if not seen_steps or runs["demo"]["last_step"] != seen_steps[-1]:
                    seen_steps.append(runs["demo"]["last_step"])
            return len(seen_steps) >= 2

        _wait_for(run_rows_grow, 240, "two different training steps in /v1/runs", proc, log)
        assert seen_steps == sorted(seen_steps)
        _wait_for(lambda: "now serving the trained model" in log.read_text(), 300, "the swap", proc, log)
        text = log.read_text()
        ckpt = text.split("now serving the trained model: ", 1)[1].split()[0]
        assert ckpt.endswith("step_00000040"), ckpt
        served_after = _get("/model/stats")
        assert served_after["checkpoint"] and served_after["checkpoint"].rstrip("/").endswith("step_00000040")
        assert served_after["weights_digest"] != served_before["weights_digest"]
        assert text.index("BWR-DNC is serving") < text.index("[dnc] step ")   # served before training
        # Training progress with stdout in a file (not a TTY), as `dnc train` prints it (the same
        # run_training and driver-side RunProgress; a run of its own just for these lines cost a
        # Ray cluster, a Ray Train run and a Ray Data pipeline): one line per update, never twice,
        # the last step always; one line per checkpoint; no worker or Ray Data bars, no Ray Train
        # report dicts.
        steps = re.findall(r"^\[dnc\] step (\d+)/40 ", text, flags=re.M)
        assert steps and steps[-1] == "40", text[-3000:]
        assert len(steps) == len(set(steps)), steps                       # each update once
        ckpts = re.findall(r"^\[dnc\] checkpoint step (\d+)  loss \S+  stage \S+  (\S+)$", text, flags=re.M)
        assert [s for s, _ in ckpts] == ["20", "40"], text[-3000:]
        assert all(p.endswith(f"step_{int(s):08d}") for s, p in ckpts)
        assert ("row/s" not in text and "%|" not in text and "TrainingReport(" not in text
                and "Checkpoint successfully created" not in text)
    finally:
        if proc.poll() is None:
            took = _stop(proc, log, signal.SIGTERM)
    assert took < 30, took
    assert proc.returncode == 0, log.read_text()[-2000:]   # serving ends quietly, as after a Ctrl-C
    assert _port_closed()
    # Ray's raylet, GCS and agents run in the driver's session: none may outlive it (with Ray's own
    # SIGTERM handlers the driver aborted and left the dashboard and runtime-env agents running)
    deadline = time.time() + 20
    while (left := _session_processes(proc.pid)) and time.time() < deadline:
        time.sleep(1)
    assert not left, left


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.mark.ray
@pytest.mark.slow
def test_one_ctrl_c_during_training_stops_the_demo_within_seconds(tmp_path):
    # a progress line after every step: the first one says training runs, 4 steps sooner
    proc, log = _start_demo(tmp_path, steps=400, log_interval=1)
    try:
        _wait_for(lambda: "[dnc] step " in log.read_text(), 300, "training progress", proc, log)
    except BaseException:
        if proc.poll() is None:
            _stop(proc, log)
        raise
    took = _stop(proc, log)
    assert proc.returncode == 130, log.read_text()[-2000:]
    assert took < 20, took
    assert "now serving the trained model" not in log.read_text()
    assert _port_closed()
