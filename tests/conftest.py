"""Shared fixtures. One real local Ray cluster per test session (``ray.init(num_cpus=2)``),
started lazily by the tests that ask for it; pure-model tests never start Ray."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every Ray cluster the tests start (the session fixture's, and those of the `dnc demo` and `ray start`
# subprocesses, which inherit this environment) reads this when it starts: Ray Train's controller
# polls its workers every 0.5 s, not 2 s, so each run's end and each dead worker are noticed up to
# 1.5 s sooner (a missed poll is not a failure; a worker is declared dead after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). (RAY_metrics_report_interval_ms stays Ray's 10 s
# here: at 2 s test_metrics never saw the dnc_queue_depth and dnc_running_requests gauges exported.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Keep CPU tests deterministic and light on a 2-core machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--serve-proxy", default=os.environ.get("DNC_SERVE_PROXY") or None,
                     choices=["python", "haproxy"],
                     help="proxy mode of the session's Ray cluster (serve/proxy_mode.py), so the Serve app "
                          "tests run behind it; default $DNC_SERVE_PROXY, else Ray's (python)")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, request):
    """A real local Ray cluster shared by every Ray test in the session, in the proxy mode of
    ``--serve-proxy`` (its environment is set before the cluster starts: Ray reads it then)."""
    import ray

    if not ray.is_initialized():
        from serve.proxy_mode import apply_env

        apply_env(request.config.getoption("--serve-proxy"))
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"WANDB_MODE": "offline"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def serve_app(app_args: dict, port: int, name: str, timeout_s: float = 180):
    """Generator for a module-scoped fixture: deploy the real Serve app with ``app_args`` on
    ``port`` (the ``ray_cluster`` fixture must be up), yield its base URL, tear it down after."""
    from serve.app import run_app, teardown

    run_app(app_args, port, name=name, timeout_s=timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        teardown(app_args)


@pytest.fixture(scope="module")
def client(server):
    """An httpx client on the module's ``server`` fixture (the base URL of its Serve app)."""
    import httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture
def tiny_config():
    from dnc.config import preset

    return preset("tiny")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
