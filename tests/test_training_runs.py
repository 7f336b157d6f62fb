"""The training-run monitor's server side: runs under a storage root, followed through metrics.jsonl,
and the benchmark summary. Real files written by the trainer's own MetricsLogger; HTTP through the
real router mounted on a FastAPI app (no Ray needed)."""

from __future__ import annotations

import json
import os

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import settings

from serve.bench_results import REPO_BENCH_RESULTS, bench_summary
from serve.context import ApiContext
from serve.errors import NotFound, Unprocessable, install_handlers
from serve.routers.training import router
from serve.training_runs import list_runs, read_metrics


def _metrics_logger():
    try:
        from dnc.training.metrics import MetricsLogger  # after the dnc/training split
    except ImportError:
        from dnc.training import MetricsLogger
    return MetricsLogger


def write_run(root, name: str, steps: list[int]) -> str:
    run_dir = os.path.join(root, name)
    log = _metrics_logger()(run_dir, name, wandb="off")
    for s in steps:
        log.log({"train/loss": 5.0 / (1 + s), "lr": 1e-3, "stage": "foundation", "mem/slots_l0": float(s)}, step=s)
    log.close()
    return run_dir


@pytest.fixture
def client(tmp_path):
    app = FastAPI()
    install_handlers(app)
    # the real context, no API keys (loopback rules): the routes' caller dependency reads its key ring
    app.state.ctx = ApiContext(generator=None, bank=None, hub=lambda: None, runs_root=str(tmp_path))
    app.include_router(router)
    return TestClient(app)


def test_lists_runs_at_depth_one_and_two_and_skips_banks(tmp_path):
    write_run(tmp_path, "demo", [10, 20, 30])
    write_run(tmp_path, "sweep/trial_1", [5])
    (tmp_path / "serve-storage" / "x").mkdir(parents=True)
    (tmp_path / "serve-storage" / "x" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "empty-dir").mkdir()
    runs = {r["run"]: r for r in list_runs(str(tmp_path))}
    assert set(runs) == {"demo", "sweep/trial_1"}
    assert runs["demo"]["last_step"] == 30 and runs["demo"]["stage"] == "foundation"
    assert runs["demo"]["live"] is True  # just written
    assert runs["demo"]["last"]["train/loss"] == pytest.approx(5.0 / 31)
    assert runs["sweep/trial_1"]["last_step"] == 5


def test_follows_a_growing_file_and_skips_a_half_written_line(tmp_path):
    run_dir = write_run(tmp_path, "demo", [1, 2, 3])
    first = read_metrics(str(tmp_path), "demo")
    assert [r["step"] for r in first["rows"]] == [1, 2, 3] and first["last_step"] == 3 and not first["more"]
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 1.0}) + "\n" + '{"step": 5, "train/lo')  # writer mid-line
    nxt = read_metrics(str(tmp_path), "demo", after_step=first["last_step"])
    assert [r["step"] for r in nxt["rows"]] == [4] and nxt["total"] == 4
    # nothing new: no rows, last_step still says where the file is
    again = read_metrics(str(tmp_path), "demo", after_step=4)
    assert again["rows"] == [] and again["last_step"] == 4


def test_limit_pages_through_rows(tmp_path):
    write_run(tmp_path, "demo", list(range(10)))
    page = read_metrics(str(tmp_path), "demo", after_step=-1, limit=4)
    assert [r["step"] for r in page["rows"]] == [0, 1, 2, 3] and page["more"] and page["last_step"] == 3
    rest = read_metrics(str(tmp_path), "demo", after_step=page["last_step"], limit=100)
    assert [r["step"] for r in rest["rows"]] == list(range(4, 10)) and not rest["more"]


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "a/b/c", "", "we ird", "..", "x/."])
def test_run_names_cannot_leave_the_root(tmp_path, bad):
    with pytest.raises(Unprocessable, match="run must be"):
        read_metrics(str(tmp_path), bad)


def test_missing_run_is_404(tmp_path):
    with pytest.raises(NotFound, match="GET /v1/runs"):
        read_metrics(str(tmp_path), "nope")


def test_http_runs_and_metrics(client, tmp_path):
    write_run(tmp_path, "demo", [10, 20])
    r = client.get("/v1/runs")
    assert r.status_code == 200 and [x["run"] for x in r.json()["runs"]] == ["demo"]
    m = client.get("/v1/runs/demo/metrics", params={"after_step": 10})
    assert m.status_code == 200 and [x["step"] for x in m.json()["rows"]] == [20]
    write_run(tmp_path, "sweep/t1", [3])
    assert client.get("/v1/runs/sweep/t1/metrics").json()["rows"][0]["step"] == 3
    missing = client.get("/v1/runs/nope/metrics")
    assert missing.status_code == 404 and "GET /v1/runs" in missing.json()["error"]["message"]
    bad = client.get("/v1/runs/a/b/c/metrics")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "run"
    assert client.get("/v1/runs/demo/metrics", params={"limit": 0}).status_code == 422


def test_empty_or_missing_root_lists_nothing(tmp_path):
    assert list_runs(str(tmp_path / "not-there")) == []
    assert list_runs(str(tmp_path)) == []


def test_bench_summary_reads_the_repo_results():
    s = bench_summary(REPO_BENCH_RESULTS)
    by_kind: dict[str, list] = {}
    for r in s["results"]:
        by_kind.setdefault(r["benchmark"], []).append(r)
    speed = next(r for r in by_kind["model_speed"] if r["rows"])
    models = {row["model"] for row in speed["rows"]}
    assert {"dnc", "baseline"} <= models
    assert all(isinstance(row["length"], int) for row in speed["rows"])
    acc = next(r for r in by_kind["long_context"] if r["rows"])
    assert all("acc" in row or "bpb" in row for row in acc["rows"])
    assert any(r["rows"] for r in by_kind["serve_load"])
    assert not s["errors"], s["errors"]


def test_bench_summary_reports_a_broken_file(tmp_path, client):
    (tmp_path / "good.json").write_text(json.dumps({"benchmark": "serve_load", "results": [{"mode": "plain", "clients": 1}]}))
    (tmp_path / "broken.json").write_text("{not json")
    s = bench_summary(str(tmp_path))
    assert [r["file"] for r in s["results"]] == ["good.json"] and s["errors"][0].startswith("broken.json")
    client.app.state.ctx.bench_results_dir = str(tmp_path)
    assert client.get("/v1/bench/results").json()["results"][0]["rows"] == [{"mode": "plain", "clients": 1}]




def _runs_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)
    app.state.ctx = ApiContext(generator=None, bank=None, hub=lambda: None, runs_root="")  # root set per test
    app.include_router(router)
    return app


FUZZ_APP = _runs_app()
schemathesis = pytest.importorskip("schemathesis")
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs-fuzz")
    write_run(root, "demo", [1, 2])
    return str(root)


@fuzz_schema.parametrize()
@settings(max_examples=40, deadline=None)
def test_fuzzed_requests_never_get_a_server_error(case, fuzz_root):
    """Any run path, step and limit a client can send gets a 2xx or a 4xx, never a 500."""
    from schemathesis.checks import not_a_server_error

    FUZZ_APP.state.ctx.runs_root = fuzz_root
    case.call_and_validate(checks=[not_a_server_error])
