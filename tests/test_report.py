"""bench/report.py only assembles: every stored result names its benchmark and its command, each
benchmark's own module renders it, and bench/common.py's provenance and helpers behave."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402

RESULTS = sorted((BENCH / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_stored_result_has_a_benchmark_a_command_and_renders(path: Path):
    res = json.loads(path.read_text())
    bench = report.benchmark_of(path.stem, res)
    assert bench in report.BENCHMARKS, f"{path.name}: no benchmark renders it"
    assert (report.stored_command(res, bench) or "").startswith("python bench/"), f"{path.name}: no stored command"
    module = report.renderer(bench)
    body = module.render(res)
    assert body.startswith("Device: ") and "|---" in body  # where it ran, then at least one table


def test_a_renderer_is_what_the_readme_shows(tmp_path: Path):
    """The README entry of a result is its stored command plus its own module's render, verbatim."""
    results = tmp_path / "results"
    results.mkdir()
    res = json.loads((BENCH / "results" / "train_scaling_h200_b8_bf16.json").read_text())
    res["command"] = "python bench/train_scaling.py --gpus 2 --note 'a b'"
    res.pop("command_source", None)
    (results / "train_scaling_x.json").write_text(json.dumps(res))
    (results / "mystery.json").write_text(json.dumps({"numbers": [1, 2]}))
    (results / "broken.json").write_text("{not json")
    assert report.main(["--results", str(results)]) == 0
    text = (results / "README.md").read_text()
    import train_scaling

    assert "Command (stored in the result):\n\n```bash\n" + res["command"] + "\n```" in text
    assert train_scaling.render(res).rstrip("\n") in text
    assert "## Other results" in text and "top-level keys: numbers" in text  # no renderer: said, not dropped
    assert "## Not yet measured" in text and "bench/model_speed.py" in text
    assert "broken" not in text


def test_a_result_without_a_command_says_so(tmp_path: Path):
    results = tmp_path / "results"
    results.mkdir()
    res = json.loads((BENCH / "results" / "serve_load-cpu2-tiny.json").read_text())
    del res["command"], res["command_source"]
    (results / "serve_load-x.json").write_text(json.dumps(res))
    assert report.main(["--results", str(results)]) == 0
    assert "Command: not stored in this result" in (results / "README.md").read_text()


def test_provenance_stores_argv_and_the_command_that_reruns_it(monkeypatch):
    monkeypatch.setenv("DNC_COMMIT", "abc1234")
    p = common.provenance("op_counts", ["--label", "a b", "--n", 3], "cpu", script="profile_model")
    assert p["benchmark"] == "op_counts" and p["argv"] == ["--label", "a b", "--n", "3"]
    assert shlex.split(p["command"]) == ["python", "bench/profile_model.py", "--label", "a b", "--n", "3"]
    assert p["commit"] == "abc1234" and p["uncommitted"] == [] and p["gpu"] is None
    assert p["torch"] and p["device"] == common.cpu_name() and p["started"].endswith("Z")


def test_write_json_is_atomic_and_readable(tmp_path: Path):
    path = common.write_json(tmp_path / "sub" / "r.json", {"x": 1.5, "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 1.5, "p": str(tmp_path)}
    assert [f.name for f in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_statistics_and_formats():
    assert common.percentile([], 0.5) is None and common.median([]) is None
    assert common.percentile([5, 1, 4, 2, 3], 0.5) == 3 and common.percentile([1, 2, 3, 4], 0.99) == 4
    assert common.percentile([1, 2, 3, 4], 0.0) == 1 and common.median([1, 2, 3, 4]) == 2.5
    assert [common.fmt_len(n) for n in (1 << 20, 4096, 500, None)] == ["1M", "4k", "500", "—"]
    assert common.fmt_num(float("nan")) == "—" and common.fmt_num("oom") == "OOM" and common.fmt_num(1234.5) == "1,234"
    assert common.md_table(["a", "b"], [["x", "1"]]) == ["| a | b |", "|---|---:|", "| x | 1 |"]
    assert common.targets_section([]) == []
    sec = common.targets_section([{"target": "t", "measured": None, "met": None, "preset": "small"}])
    assert sec[2:5] == ["| target | measured | verdict |", "|---|---|---|", "| t (small) | — | not measured |"]


def test_the_command_comes_from_the_result_only():
    """``command``, else the env's, else the stored argv (with or without the script path first)."""
    assert report.stored_command({"command": "python bench/a.py", "argv": ["x"]}) == "python bench/a.py"
    assert report.stored_command({"env": {"command": "python bench/serve_load.py --n 2"}}) == \
        "python bench/serve_load.py --n 2"
    assert report.stored_command({"argv": ["bench/train_loop_gap.py", "--steps", "5"]}) == \
        "python bench/train_loop_gap.py --steps 5"
    assert report.stored_command({"argv": ["--tag", "a b"]}, "long_context") == \
        "python bench/long_context.py --tag 'a b'"
    assert report.stored_command({"argv": ["--x"]}, "op_counts") is None  # no bench/op_counts.py to name
    assert report.stored_command({"args": {"device": "cuda"}}, "model_speed") is None  # never rebuilt from args


def test_needle_probe_rows_render_with_counts_and_wrong_answers():
    import needle_probe_report

    res = {"benchmark": "needle_probe", "device": "cpu", "torch": "2.13", "commit": "abc", "segment_len": 32,
           "rows": [{"depth": 0.5, "length": 4096, "correct": 3, "n": 8, "in_segment": 2, "median_distance": 1900.0,
                     "wrong": [{"truth": "12345", "got": "12|4", "in_segment": False}]}]}
    body = needle_probe_report.render(res)
    assert "segment_len 32" in body
    assert "| 0.5 | 4k | 37.5% (3/8) [14–69%] | 2/8 | 1,900 | 12345 -> '12\\|4' |" in body


def test_serve_load_results_that_keep_their_environment_under_env_render():
    import serve_load_report

    res = {"benchmark": "serve_load", "env": {"gpu": None, "cpu": "Xeon", "host": "h", "cpus": 2, "torch": "2.13",
                                              "ray": "2.60", "commit": "abc"},
           "in_process": {"batched": {}}, "markdown": "| mode | req/s |\n|---|---:|\n| plain | 3.0 |\n"}
    body = serve_load_report.render(res)
    assert body.startswith("Device: Xeon, host h, 2 CPUs; torch 2.13; ray 2.60; commit abc\n\n| mode | req/s |")


def test_latest_results_in_full_older_ones_on_a_line(tmp_path: Path):
    """Each benchmark's newest session (else its batch: within an hour of the newest) in full; the
    older results one line with their JSON link and command; ``--full`` renders all of them."""
    assert [report.session_of(n) for n in ("serve_load_h200_s15_proxy", "serve_load-cpu-tiny-s8-before-r3",
                                           "long_context_h200_s12b", "op_counts_session6", "long_context_h100_r4",
                                           "train_scaling_fsdp")] == [15, 8, 12, 6, None, None]
    assert report.started_of({"started": "2026-12-03T00:00:10Z"}) - report.started_of({"time": 1796256000.0}) == 10
    results = tmp_path / "results"
    results.mkdir()
    res = json.loads((BENCH / "results" / "train_scaling_h200_b8_bf16.json").read_text())
    for stem, started in (("train_scaling_s3_a", 100.0), ("train_scaling_s4_a", 50.0), ("train_scaling_s4_b", 60.0),
                          ("train_scaling_old", 10.0), ("train_scaling_batch", 9000.0)):
        (results / f"{stem}.json").write_text(json.dumps({**res, "time": started}))
    (results / "train_scaling_s3_a.md").write_text("# s3\n")
    assert report.main(["--results", str(results)]) == 0
    text = (results / "README.md").read_text()
    assert "### `train_scaling_s4_a.json`" in text and "### `train_scaling_s4_b.json`" in text
    assert "### `train_scaling_s3_a.json`" not in text and "### `train_scaling_old.json`" not in text
    assert "- [`train_scaling_s3_a.json`](./train_scaling_s3_a.json) ([md](./train_scaling_s3_a.md)): " in text
    assert "Older results (3, one line each" in text and f"`{report.stored_command(res, 'train_scaling')}`" in text
    assert report.latest([("a_old", {"time": 0.0}), ("a_b", {"time": 5000.0}), ("a_c", {"time": 8000.0})]) == \
        {"a_b", "a_c"}  # no session: the newest's batch
    full = tmp_path / "full" / "README.md"
    assert report.main(["--results", str(results), "--full", "--readme", str(full)]) == 0
    assert all(f"### `{p.stem}.json`" in full.read_text() for p in results.glob("*.json"))
    assert "Older results" not in full.read_text()


def test_serve_load_rounds_store_each_row_once_and_the_migration_is_lossless(tmp_path: Path):
    """A multi-round serve_load result keeps its rows once (``results``); the renderer rebuilds
    the rounds, the proxy summary and the tables. bench/compact_results.py turns the older form
    (rows in both places, the summary and the tables stored) into exactly that, rendering the same."""
    import compact_results
    import serve_load_report as slr

    res = json.loads((BENCH / "results" / "serve_load_h200_s15_proxy.json").read_text())
    assert "markdown" not in res and "proxy_summary" not in res and all("rows" not in r for r in res["rounds"])
    rounds = slr.rounds_of(res)
    assert [len(r["rows"]) for r in rounds] == [4, 4] and sum(map(len, (r["rows"] for r in rounds))) == len(res["results"])
    body = slr.render(res)
    assert "Proxy comparison: medians over the rounds" in body and body.count("\n#### Round ") == 2
    assert all("rows" not in v and v["pairs"] >= 1 for r in rounds for v in r["paired"].values())  # counts kept
    # the older form: rows in both places, the summary and tables stored, the per-pair samples
    samples = [{**r, "paired": {m: {**v, "rows": [{"served_ms": 1.0, "in_process_ms": 0.5}] * v["pairs"]}
                                for m, v in r["paired"].items()}} for r in rounds]
    legacy = {**res, "rounds": samples, "proxy_summary": slr.proxy_summary(rounds),
              "markdown": slr.result_markdown(rounds, res["in_process"])}
    (tmp_path / "serve_load_x.json").write_text(json.dumps(legacy, indent=2))
    (tmp_path / "broken_rows.json").write_text(json.dumps({**legacy, "results": legacy["results"][1:]}, indent=2))
    (tmp_path / "serve_load_x.md").write_text(f"# serve_load x\n\n{legacy['markdown']}\n")
    (tmp_path / "broken_rows.md").write_text("# broken\n\n| 123456.789 |\n")
    assert compact_results.main(["--results", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "serve_load_x.json").read_text()) == res
    assert slr.render(json.loads((tmp_path / "serve_load_x.json").read_text())) == body == slr.render(legacy)
    assert not (tmp_path / "serve_load_x.md").exists()  # it repeated the JSON's figures
    assert (tmp_path / "broken_rows.md").read_text() == "# broken\n\n| 123456.789 |\n"  # a figure the JSON lacks
    # two copies of the rows that disagree: both kept (only the indentation goes)
    assert json.loads((tmp_path / "broken_rows.json").read_text())["rounds"][0]["rows"] == samples[0]["rows"]
    assert compact_results.same_figures("a; 1.5 b\n| 2 |", "a. 1.5 b\n| 2 |")
    assert not compact_results.same_figures("a 1.5", "a 1.6")
