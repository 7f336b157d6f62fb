"""cluster/ manifests parse with their required keys; `ray job submit` against a separately
started head node runs the training job to SUCCEEDED and leaves a checkpoint.

The job test starts its own cluster (`ray start --head --block`, its own temp dir and ports) so it
never touches the session fixture's cluster, and stops it by terminating that process (its
SIGTERM handler shuts down the processes it started). `ray stop` is not used: it kills every Ray
process on the machine by name, other clusters included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def load(name: str):
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


def test_ray_up_configs_have_required_keys():
    for name, provider in (("aws.yaml", "aws"), ("gcp.yaml", "gcp")):
        c = load(name)
        for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                    "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
            assert key in c, f"{name}: missing {key}"
        assert c["provider"]["type"] == provider
        assert c["head_node_type"] in c["available_node_types"]
        assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
        for node in c["available_node_types"].values():
            assert "node_config" in node and "resources" in node


def _pod_containers(pod_template):
    return pod_template["spec"]["containers"]


def _check_ray_cluster_spec(spec, where):
    assert spec["rayVersion"] == "2.60.0", where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _pod_containers(head["template"])[0]["image"], where
    workers = spec["workerGroupSpecs"]
    assert workers and all("groupName" in w and "replicas" in w for w in workers), where
    assert any("nvidia.com/gpu" in _pod_containers(w["template"])[0]["resources"]["limits"] for w in workers), where


def test_kuberay_manifests_have_required_keys():
    rc = load("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_ray_cluster_spec(rc["spec"], "raycluster")

    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "python -m ray_jobs.train" in job["spec"]["entrypoint"]
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob")

    svc = load("rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    _check_ray_cluster_spec(svc["spec"]["rayClusterConfig"], "rayservice")


def test_runtime_env_excludes_heavy_paths():
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    for path in (".venv", ".whl", ".git", "runs"):
        assert path in env["excludes"]
    assert env["env_vars"]["WANDB_MODE"] == "offline"


def test_job_entrypoints_help():
    # `python -m <mod> --help` for each, in one interpreter (tests/script_runner.py): one Ray import
    argvs = [["-m", mod, "--help"] for mod in ("ray_jobs.train", "ray_jobs.evaluate", "tune.sweep")]
    run = subprocess.run([sys.executable, "tests/script_runner.py", json.dumps(argvs)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert [r["argv"] for r in results] == argvs
    for r in results:
        assert r["code"] == 0 and r["stdout"].startswith("usage:"), (r["argv"], r["stderr"][-2000:])


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:   # 401 without the auth token: the server is up
            if e.code in (401, 403):
                return
            last = e
        except Exception as e:  # not up yet
            last = e
        time.sleep(1.0)
    raise TimeoutError(f"{url} not up after {timeout}s: {last}")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_to_separate_head_succeeds(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    ray_bin = os.path.join(bin_dir, "ray")
    # RAY_AUTH_MODE=token: the head (local clusters default to token auth in 2.60) and the `ray job`
    # client both use the token in ~/.ray/auth_token; without it the client sends none and gets 401,
    # and on a fresh HOME (none yet) the head exits at once: generate it first, as the README says.
    # The venv is not activated (its bin/ is not on PATH): the entrypoint names the interpreter.
    env = dict(os.environ, WANDB_MODE="offline", RAY_AUTH_MODE="token",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if os.path.abspath(p) != os.path.abspath(bin_dir))
    env.pop("RAY_ADDRESS", None)
    env.pop("VIRTUAL_ENV", None)
    # On SIGTERM `ray start --block` (Ray >= 2.60) first drains the node for Serve proxies, and a
    # head that is its own only node never reports drained: it waited the whole 30 s default before
    # shutting down (half of this test's time). This cluster runs no Serve: no drain.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    token = subprocess.run([ray_bin, "get-auth-token", "--generate"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert token.returncode == 0, token.stderr[-2000:]
    gcs, dash, nm, om, client, agent_http, agent_grpc, metrics, renv = _free_ports(9)
    wmin = 20000 + (os.getpid() % 200) * 100
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")      # short: Unix socket paths are limited
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
         f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 99}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    storage = str(tmp_path / "storage")
    sid = f"dnc-test-{uuid.uuid4().hex[:8]}"
    try:
        _wait_http(f"{address}/api/version", timeout=120)
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
             "--runtime-env", "cluster/runtime_env.yaml", "--",
             sys.executable, "-m", "ray_jobs.train", "--config", "configs/train/tiny.yaml", "--run.storage", storage,
             "--run.name", "jobsubmit", "--train.max_steps", "4", "--run.num_workers", "1", "--run.wandb", "off",
             "--train.batch_size", "4", "--train.max_len", "96", "--train.log_interval", "2",
             "--train.checkpoint_interval", "2", "--train.eval_interval", "4",
             "--train.eval_samples", "1", "--run.progress", "false"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert submit.returncode == 0, (submit.stdout[-4000:], submit.stderr[-4000:])
        status = subprocess.run([ray_bin, "job", "status", "--address", address, sid], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        text = (status.stdout + status.stderr).lower()
        assert status.returncode == 0 and "succeeded" in text and "failed" not in text, text
        ck = Path(storage) / "jobsubmit" / "step_00000004"
        assert (ck / "model.safetensors").exists() and (ck / "train_state.json").exists()
        assert (Path(storage) / "jobsubmit" / "metrics.jsonl").exists()
    finally:
        head.send_signal(signal.SIGTERM)          # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)    # our own process group only
            head.wait(timeout=30)
        log.close()
