"""Without an address or RAY_ADDRESS the commands start a local cluster, as their help says.

``ray.init(address=None)`` joins the cluster of the machine's last ``ray start`` (the address in
``<tmp>/ray/ray_current_cluster``). A head stopped without ``ray stop`` leaves that file behind,
and every later ``dnc train`` / ``dnc serve`` / ``dnc sweep`` then hung retrying a dead address
(the README audit of session 11 met it after its own ``ray start``). Here the file points at a
port nobody listens on, in a temp dir of this test's own (``TMPDIR``), so no other Ray on the
machine sees it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
from ray_jobs.train import init_ray
init_ray()
import ray
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
ray.shutdown()
"""


def test_init_ray_starts_a_local_cluster_despite_a_stale_ray_start_address():
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")   # a dead `ray start` head
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(TMPDIR=tmp, RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        gcs = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("GCS ")]
        assert gcs and gcs[0] != "127.0.0.1:1", r.stdout
        assert "Connecting to existing Ray cluster" not in r.stderr, r.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
