"""``bench/train_loop_gap.py`` measures every curriculum stage it is asked for, with
``--compile graphs`` and its length gate, and writes a result its renderer shows (CPU smoke run,
tiny preset: the numbers are not the point, the per-stage shapes and graph paths are)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_gap_bench_measures_each_stage_and_counts_graph_paths(tmp_path, one_torch_thread):
    import train_loop_gap
    import train_loop_gap_report

    rc = train_loop_gap.main(["--config", "configs/train/tiny.yaml", "--steps", "1", "--warmup", "0",
                              "--corpus-ratio", "0", "--stages", "foundation,intermediate",
                              "--compile", "graphs", "--set", "batch_size=2", "--set", "max_len=128",
                              "--set", "graphs_min_segments=4", "--device", "cpu",
                              "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "train_loop_gap_t.json").read_text())
    assert [st["stage"] for st in res["stages"]] == ["foundation", "intermediate"]
    seg_len = res["model_config"]["segment_len"]
    for st in res["stages"]:
        assert set(st["results"]) == {"step", "step+h2d", "loop"}
        # one forward per mode; each through the graphs exactly when its sequence has >= 4 segments
        want = {"graphs": 0, "eager": 0}
        for b, t in st["shapes"]:
            want["graphs" if -(-t // seg_len) >= 4 else "eager"] += 3
        assert st["graph_paths"] == want, st
    # foundation's 96-token samples are 3 segments of 32 (eager), intermediate's 128 are 4 (graphs)
    assert [st["graph_paths"] for st in res["stages"]] == [{"graphs": 0, "eager": 3}, {"graphs": 3, "eager": 0}]
    assert res["results"]["loop"]["tokens"] == sum(st["results"]["loop"]["tokens"] for st in res["stages"])
    assert res["train_config"]["compile"] == "graphs"
    body = train_loop_gap_report.render(res)
    assert body.startswith("Device: ") and "| foundation |" in body and "| intermediate |" in body
