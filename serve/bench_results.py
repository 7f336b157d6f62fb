"""A JSON summary of the benchmark results (``bench/results/*.json``) for the UI's comparison view.

Each benchmark script writes its own JSON shape; this reads the three that compare the DNC with the
Transformer baseline and keeps only the columns a chart needs, one flat row per measurement:

- ``model_speed``: throughput (train tokens/s, prefill tokens/s, decode ms/token) and memory
  (peak MiB, bank bytes vs KV-cache bytes) per model, preset and context length;
- ``long_context``: accuracy (and bits per byte) per model, suite and context length;
- ``serve_load``: serving throughput and latency per mode and client count.

Other files are listed by name only. Pure functions over fsspec; a broken file is reported, not fatal.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec

REPO_BENCH_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")

SPEED_KEYS = ("preset", "kind", "model", "length", "tokens_per_s", "prefill_tokens_per_s", "decode_ms_median",
              "peak_mb", "bank_bytes", "kv_cache_bytes", "batch")
ACCURACY_KEYS = ("suite", "model", "length", "context", "depth", "acc", "bpb", "n", "status")
SERVE_KEYS = ("mode", "clients", "requests", "requests_per_s", "tokens_per_s", "latency_ms_p50", "latency_ms_p99",
              "ttft_ms_p50", "server_mean_batch")


def _kind(name: str, d: dict[str, Any]) -> str:
    if d.get("benchmark"):
        return str(d["benchmark"])
    if name.startswith("model_speed") and isinstance(d.get("rows"), list):
        return "model_speed"
    return "other"


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row and isinstance(row[k], (int, float, str, type(None)))}


def summarize_file(name: str, d: dict[str, Any]) -> dict[str, Any]:
    """One results file as ``{"file", "benchmark", "device", "commit", "rows": [...]}``."""
    kind = _kind(name, d)
    env = d.get("env") or {}
    out: dict[str, Any] = {"file": name, "benchmark": kind, "tag": d.get("tag"),
                           "device": d.get("device") or env.get("device") or d.get("host"),
                           "commit": d.get("commit") or env.get("commit"), "rows": []}
    if kind == "model_speed":
        out["dtype"] = d.get("dtype")
        out["rows"] = [_pick(r, SPEED_KEYS) for r in d.get("rows", []) if isinstance(r, dict)]
    elif kind == "long_context":
        out["rows"] = [_pick(r, ACCURACY_KEYS) for r in d.get("cells", []) if isinstance(r, dict)]
        out["status"] = d.get("status")
    elif kind == "serve_load":
        out["rows"] = [_pick(r, SERVE_KEYS) for r in d.get("results", []) if isinstance(r, dict)]
    return out


def bench_summary(results_uri: str = REPO_BENCH_RESULTS) -> dict[str, Any]:
    """Every ``*.json`` under ``results_uri``: ``{"dir", "results": [summaries], "errors": [...]}``,
    files with rows first, then by name."""
    fs, root = fsspec.core.url_to_fs(results_uri)
    root = root.rstrip("/")
    results, errors = [], []
    try:
        paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return {"dir": results_uri, "results": [], "errors": [f"{results_uri} does not exist"]}
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        try:
            with fs.open(p, "r") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            results.append(summarize_file(name, d))
        except (ValueError, OSError) as e:
            errors.append(f"{name}: {e}")
    results.sort(key=lambda r: (not r["rows"], r["file"]))
    return {"dir": results_uri, "results": results, "errors": errors}
