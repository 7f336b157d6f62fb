"""bench/long_context.py end to end on the tiny preset (train both models for one step, evaluate
every suite at tiny lengths), and bench/report.py rebuilding a README from its JSON plus a
model_speed result, twice, byte for byte."""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def lc_run(tmp_path_factory) -> Path:
    """One tiny run of bench/long_context.py; returns its output folder."""
    out = tmp_path_factory.mktemp("long_context")
    cmd = [sys.executable, str(BENCH / "long_context.py"), "--preset", "tiny", "--max-len", "128",
           "--train-minutes", "0.5", "--max-steps", "1", "--set", "log_interval=1", "--set", "eval_interval=1",
           "--set", "eval_samples=1", "--set", "corpus_eval_bytes=1024",
           "--passkey-lengths", "128,256", "--depths", "0,1", "--n", "1",
           "--recall-lengths", "256", "--n-recall", "1",
           "--mqar-pairs", "12", "--mqar-len", "64", "--n-mqar", "1",
           "--bpb-context", "128", "--bpb-bytes", "2048",
           "--device", "cpu", "--threads", "1", "--tag", "test", "--out", str(out), "--work-dir", str(out / "runs")]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Targets" in proc.stdout  # the markdown report is printed at the end
    return out


def test_long_context_json(lc_run: Path):
    res = json.loads((lc_run / "long_context_test.json").read_text())
    assert res["benchmark"] == "long_context" and res["status"] == "complete"
    assert res["command"].startswith("python bench/long_context.py --preset tiny")
    assert res["env"]["torch"] and res["env"]["device_type"] == "cpu" and "commit" in res["env"]
    assert res["train_config"]["dnc"]["max_len"] == 128 and res["train_config"]["dnc"]["max_steps"] == 1
    assert set(res["models"]) == {"dnc", "baseline"}
    dnc, base = res["models"]["dnc"], res["models"]["baseline"]
    assert dnc["config"]["memory"] is True and base["config"]["memory"] is False
    assert base["eval_segment_len"] >= 256  # one segment spans the longest baseline input
    for m in (dnc, base):
        t = m["training"]
        assert t["steps"] == 1 and t["tokens_seen"] > 0 and t["final_stage"] == "foundation"
        assert t["stages"] and t["stages"][0]["stage"] == "foundation"  # the eval at step 1
        assert all(0.0 <= a <= 1.0 for a in t["stages"][0]["last_acc"].values())

    cells = res["cells"]
    by = lambda suite: [c for c in cells if c["suite"] == suite]  # noqa: E731
    assert len(by("passkey")) == 2 * 2 * 2  # lengths x depths x models
    assert len(by("relational_2hop")) == len(by("kv_retrieval")) == 2
    for c in by("passkey") + by("relational_2hop") + by("kv_retrieval") + by("mqar"):
        assert c["status"] == "ok" and 0.0 <= c["acc"] <= 1.0 and c["n"] == 1
    for c in by("passkey"):  # the DNC's cells count needles that cross a segment boundary
        assert ("boundary_n" in c) == (c["model"] == "dnc")
        assert c["model"] != "dnc" or 0 <= c["boundary_correct"] <= c["boundary_n"] <= c["n"]
    mq = by("mqar")
    assert len(mq) == 2 and all(0.0 <= c["query_acc"] <= 1.0 and c["queries"] == 12 for c in mq)
    assert mq[0]["length"] == 75 and "raised" in mq[0]["note"]  # 12 pairs + 12 queries do not fit 64 tokens
    bpb = by("bpb")
    assert len(bpb) == 2 and all(math.isfinite(c["bpb"]) and c["bpb"] > 0 for c in bpb)

    assert [t["met"] for t in res["targets"]][1] is None  # no 16k recall cell in this run
    assert all(t["met"] in (True, False, None) for t in res["targets"])
    assert (lc_run / "long_context_test.md").read_text().count("| target |") == 1
    assert (lc_run / "long_context_test_passkey.png").stat().st_size > 0
    assert (lc_run / "long_context_test_accuracy.png").stat().st_size > 0


def test_report_rebuilds_readme(lc_run: Path, tmp_path: Path):
    sys.path.insert(0, str(BENCH))
    import report

    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(lc_run / "long_context_test.json", results)
    shutil.copy(BENCH / "results" / "model_speed_cuda.json", results)
    readme = tmp_path / "README.md"
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main(args) == 0
    text = readme.read_text()
    assert "## Long-context accuracy" in text and "## DNC vs the Transformer baseline" in text
    assert "python bench/long_context.py --preset tiny" in text  # the command stored in the JSON
    assert "python bench/model_speed.py --device cuda" in text  # given to the old result by the migration
    for png in ("long_context_test_passkey", "long_context_test_accuracy", "model_speed_cuda_throughput",
                "model_speed_cuda_memory", "model_speed_cuda_decode", "model_speed_cuda_state_bytes"):
        assert f"](results/plots/{png}.png)" in text
    pngs = {p.name: p.read_bytes() for p in (results / "plots").glob("*.png")}
    assert len(pngs) == 6 and sum(len(b) for b in pngs.values()) < 1_000_000

    assert report.main(args) == 0  # same inputs -> same README and the same PNG bytes
    assert readme.read_text() == text
    assert {p.name: p.read_bytes() for p in (results / "plots").glob("*.png")} == pngs


def test_cells_record_out_of_memory_and_skips(tmp_path: Path, monkeypatch):
    """A CUDA OOM in one cell is recorded (acc null) and the run goes on; baseline cells above
    --baseline-max-len are recorded as skipped without running."""
    import torch

    sys.path.insert(0, str(BENCH))
    import long_context
    import long_context_eval as lc
    from long_context_report import Run

    args = long_context.build_parser().parse_args(["--out", str(tmp_path), "--tag", "unit", "--device", "cpu"])
    run = Run(args, [], torch.device("cpu"), {"baseline_max_len": 1024})

    def fake_answer(reader, sample):
        if reader == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return True, 1, 1

    monkeypatch.setattr(lc, "answer", fake_answer)
    no_memory = SimpleNamespace(config=SimpleNamespace(memory=False))  # what run_cells reads of a model
    models, readers = {"dnc": no_memory, "baseline": no_memory}, {"dnc": "fine", "baseline": "oom"}
    for length in (512, 2048):
        lc.run_cells(run, models, readers, "passkey", length, [None, None], {"depth": 0.0})
    cells = json.loads(run.json_path.read_text())["cells"]
    assert [(c["model"], c["length"], c["status"]) for c in cells] == [
        ("dnc", 512, "ok"), ("baseline", 512, "oom"), ("dnc", 2048, "ok"), ("baseline", 2048, "skipped")]
    assert cells[0]["acc"] == 1.0 and cells[1]["acc"] is None and cells[3]["acc"] is None
    assert "OutOfMemoryError" in cells[1]["error"]


def test_segment_transfer_evaluates_one_checkpoint_at_other_segment_lengths(tmp_path):
    from dnc.checkpoint import save_checkpoint
    from dnc.config import preset
    from dnc.model import DNC

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), DNC(preset("tiny")))
    out = tmp_path / "res"
    cmd = [sys.executable, str(BENCH / "segment_transfer.py"), "--checkpoint", ckpt, "--segments", "16,64",
           "--tasks", "mqar", "--n", "1", "--tag", "t", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "segment_transfer_t.json").read_text())
    assert [r["segment_len"] for r in res["rows"]] == [16, 64] and res["trained_segment_len"] == 32
    assert [r["lengths"] for r in res["rows"]] == [[24, 64], [96, 256]]
    for r in res["rows"]:
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"]["mqar"].values())
    bad = subprocess.run(cmd[:4] + ["--segments", "x"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "comma-separated" in bad.stderr


def test_a_needle_crosses_a_segment_when_its_digits_are_split():
    sys.path.insert(0, str(BENCH))
    import long_context_eval as lc

    needle = lambda pos: SimpleNamespace(meta={"needle_pos": pos, "passkey": "12345"})  # noqa: E731
    assert not lc.crosses_segment(needle(27), 32)  # digits at 27..31
    assert lc.crosses_segment(needle(28), 32) and lc.crosses_segment(needle(31), 32)
    assert not lc.crosses_segment(needle(32), 32) and not lc.crosses_segment(needle(28), 64)


def test_a_needle_is_split_from_its_words_when_they_end_in_the_segment_before():
    sys.path.insert(0, str(BENCH))
    import long_context_eval as lc

    needle = lambda fact, pos: SimpleNamespace(meta={"fact_pos": fact, "needle_pos": pos, "passkey": "12345"})  # noqa: E731
    assert lc.fact_split_from_digits(needle(510, 514), 512)  # "...is " in segment 0, digits in 1
    assert not lc.fact_split_from_digits(needle(512, 530), 512) and not lc.fact_split_from_digits(needle(0, 18), 512)
    assert not lc.fact_split_from_digits(SimpleNamespace(meta={"needle_pos": 514, "passkey": "1"}), 512)  # older samples


def test_wordings_are_cell_dimensions_from_a_checkpoint(tmp_path):
    """--phrasings x --markers run every suite per wording from a given checkpoint; the original
    wording keeps the headline tables, the Generalisation table shows the rest with counts."""
    from dnc.checkpoint import save_checkpoint
    from dnc.config import preset
    from dnc.model import DNC

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), DNC(preset("tiny")))
    out = tmp_path / "res"
    cmd = [sys.executable, str(BENCH / "long_context.py"), "--checkpoint", ckpt, "--skip-baseline",
           "--phrasings", "template,heldout", "--markers", "on,off", "--passkey-lengths", "256", "--depths", "0.5",
           "--n", "2", "--recall-lengths", "256", "--n-recall", "1", "--mqar-pairs", "4", "--mqar-len", "32",
           "--n-mqar", "1", "--bpb-context", "64", "--bpb-bytes", "512", "--device", "cpu", "--threads", "1",
           "--tag", "w", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "long_context_w.json").read_text())
    wordings = {("template", True, "words"), ("template", False, "words"), ("heldout", True, "stdlib_heldout"),
                ("heldout", False, "stdlib_heldout")}
    for suite in ("passkey", "relational_2hop", "kv_retrieval", "mqar"):
        cells = [c for c in res["cells"] if c["suite"] == suite]
        assert {(c["phrasing"], c["markers"], c["filler"]) for c in cells} == wordings, suite
        assert all(c["status"] == "ok" and 0 <= c["correct"] <= c["n"] for c in cells)
    mq = {(c["phrasing"], c["markers"]): c["length"] for c in res["cells"] if c["suite"] == "mqar"}
    assert mq[("template", True)] == 32 and mq[("heldout", True)] > 32  # worded pairs need a longer sample
    md = (out / "long_context_w.md").read_text()
    gen = md[md.index("## Generalisation"):md.index("## Targets")]
    assert gen.count("| passkey | DNC |") == 4 and len(re.findall(r"% \([012]/2\) \[", gen)) >= 4
    assert "95% Wilson" in gen and "–" in gen  # n < 50: intervals shown
    # the headline passkey table and targets count only the original wording (2 samples, not 8)
    assert res["summary"]["passkey_by_length"]["dnc"].keys() == {"256"}
    head = md[md.index("## Passkey retrieval"):md.index("## Recall")]
    assert head.count("| 0.5 |") == 1
    bad = subprocess.run(cmd[:4] + ["--phrasings", "paraphrased"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--phrasings takes" in bad.stderr


def test_base_wording_keeps_its_samples_and_others_differ():
    sys.path.insert(0, str(BENCH))
    import long_context_eval as lc
    import numpy as np

    from dnc.data import tasks

    seed = [1234, lc.SUITE_SEED["passkey"], 4096, 3]
    _, base = lc.draw_samples("needle", lc.variant_seed(seed, "template", True), 4096, 2, 0.0, depth=0.3,
                              **lc.variant_kwargs("template", True))
    rng = np.random.default_rng(seed)
    old = [tasks.generate("needle", rng, 4096, 0.0, depth=0.3) for _ in range(2)]  # what the suite drew before
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(base, old))
    _, held = lc.draw_samples("needle", lc.variant_seed(seed, "heldout", False), 4096, 2, 0.0, depth=0.3,
                              **lc.variant_kwargs("heldout", False))
    assert all(s.meta["phrasing"] == "heldout" and not s.meta["markers"] for s in held)
    assert lc.parse_variants("heldout,template", "off,on")[0] == ("template", True)


def test_wilson_interval():
    sys.path.insert(0, str(BENCH))
    import common

    lo, hi = common.wilson(0, 4)
    assert lo == 0.0 and abs(hi - 0.4899) < 1e-3
    lo, hi = common.wilson(20, 40)
    assert abs(lo - 0.352) < 1e-3 and abs(hi - 0.648) < 1e-3
    assert common.fmt_count(20, 40) == "50.0% (20/40) [35–65%]"
    assert common.fmt_count(60, 80) == "75.0% (60/80)"  # 50 samples or more: no interval


def test_resume_without_a_checkpoint_fails_fast_and_names_the_run_dir(lc_run: Path):
    """``--resume`` on a tag that has no checkpoint must not silently train afresh (session 12 lost a
    GPU budget that way); on the fixture's own tag it finds the checkpoint."""
    sys.path.insert(0, str(BENCH))
    try:
        from long_context import build_parser, runs_without_checkpoint
    finally:
        sys.path.remove(str(BENCH))
    args = build_parser().parse_args(["--resume", "--work-dir", str(lc_run / "runs")])
    assert runs_without_checkpoint(args, "test") == []
    assert runs_without_checkpoint(args, "other") == [str(lc_run / "runs" / "other" / "dnc"),
                                                      str(lc_run / "runs" / "other" / "baseline")]
    cmd = [sys.executable, str(BENCH / "long_context.py"), "--preset", "tiny", "--resume", "--skip-baseline",
           "--device", "cpu", "--tag", "other", "--out", str(lc_run / "other"), "--work-dir", str(lc_run / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"no checkpoint to continue from in {lc_run / 'runs' / 'other' / 'dnc'}" in proc.stderr
    assert not (lc_run / "runs" / "other").exists()


def test_cross_wordings_run_as_cells_beside_the_base_one(tmp_path):
    """--phrasings cross_template,cross_heldout (issue 11: wording and filler swapped) are cells of
    their own, with the other filler, and stay out of the headline passkey table."""
    from dnc.checkpoint import save_checkpoint
    from dnc.config import preset
    from dnc.model import DNC

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), DNC(preset("tiny")))
    out = tmp_path / "res"
    cmd = [sys.executable, str(BENCH / "long_context.py"), "--checkpoint", ckpt, "--skip-baseline",
           "--phrasings", "template,cross_template,cross_heldout", "--passkey-lengths", "256", "--depths", "0.5",
           "--n", "2", "--recall-lengths", "256", "--n-recall", "1", "--mqar-pairs", "4", "--mqar-len", "32",
           "--n-mqar", "1", "--bpb-context", "64", "--bpb-bytes", "512", "--device", "cpu", "--threads", "1",
           "--tag", "x", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "long_context_x.json").read_text())
    passkey = {(c["phrasing"], c["filler"]) for c in res["cells"] if c["suite"] == "passkey"}
    assert passkey == {("template", "words"), ("cross_template", "stdlib_heldout"), ("cross_heldout", "words")}
    assert res["summary"]["passkey_by_length"]["dnc"].keys() == {"256"}
    md = (out / "long_context_x.md").read_text()
    head = md[md.index("## Passkey retrieval"):md.index("## Recall")]
    assert head.count("| 0.5 |") == 1  # the base wording only
    assert "| passkey | DNC | cross_template | on | stdlib_heldout |" in md
