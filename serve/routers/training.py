"""Training runs and benchmark results, read from storage for the research dashboard.

    GET /v1/runs                                   runs under the runs root (``AppArgs.runs_root``)
    GET /v1/runs/{run}/metrics?after_step=N&limit=M rows of that run's metrics.jsonl after step N
    GET /v1/bench/results                          a summary of bench/results/*.json

The runs root comes from the app context (``request.app.state.ctx.runs_root``) through ``Depends``.
File reads run in a worker thread: a slow fsspec store never blocks the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from .. import schemas as S
from ..auth import caller
from ..bench_results import REPO_BENCH_RESULTS, bench_summary
from ..training_runs import list_runs, read_metrics

# With API keys on, any valid key may read runs and results (they are not per owner); without one: 401.
router = APIRouter(tags=["training"], dependencies=[Depends(caller)], responses=S.ERROR_RESPONSES)


async def runs_root(request: Request) -> str:
    """The storage root of training runs, from the app's context (``async``: no thread pool for
    an attribute read, see serve.context.get_ctx)."""
    return request.app.state.ctx.runs_root


async def bench_results_dir(request: Request) -> str:
    return getattr(request.app.state.ctx, "bench_results_dir", None) or REPO_BENCH_RESULTS


@router.get("/v1/runs", summary="Training runs under the runs root (folders holding metrics.jsonl), newest first")
async def get_runs(root: str = Depends(runs_root)) -> dict[str, Any]:
    runs = await run_in_threadpool(list_runs, root)
    return {"root": root, "runs": runs, "count": len(runs)}


@router.get("/v1/runs/{run:path}/metrics",
            summary="A run's metrics rows after a step (poll with after_step=last_step to follow a training run)")
async def get_run_metrics(run: str, after_step: int | None = Query(None, ge=-1),
                          limit: int = Query(5000, ge=1, le=50_000),
                          root: str = Depends(runs_root)) -> dict[str, Any]:
    return await run_in_threadpool(read_metrics, root, run, after_step, limit)


@router.get("/v1/bench/results", summary="Benchmark results (DNC vs baseline): one flat row per measurement")
async def get_bench_results(results: str = Depends(bench_results_dir)) -> dict[str, Any]:
    return await run_in_threadpool(bench_summary, results)
