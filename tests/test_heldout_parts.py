"""bench/heldout_parts.py: each cell's samples take every part of their wording from the split the
cell names, the needle sits in the bank or the question's segment as asked, and the result renders
in bench/README.md (a small untrained model; the verdicts themselves are not the point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import heldout_parts  # noqa: E402
import report  # noqa: E402

from dnc.data import phrasings as ph  # noqa: E402


def test_cells_take_each_part_from_its_split_and_place_the_needle(tmp_path: Path):
    argv = ["--preset", "tiny", "--model-set", "segment_len=128", "--length", "1k", "--n", "3",
            "--cells", "train,subject,fact,question,filler,heldout", "--device", "cpu", "--threads", "1",
            "--out", str(tmp_path), "--tag", "t"]
    assert heldout_parts.main(argv) == 0
    res = json.loads((tmp_path / "heldout_parts_t.json").read_text())
    assert res["benchmark"] == "heldout_parts" and res["argv"] == argv
    assert len(res["cells"]) == 6 * 2 and len(res["rows"]) == 6 * 2 * 3
    pools = {"subject": ph.subject_pool, "fact": ph.fact_pool, "question": ph.question_pool}
    for row in res["rows"]:
        phrasing, filler = heldout_parts.CELLS[row["cell"]]
        splits = ph.needle_part_splits(phrasing)
        for part, split in zip(ph.NEEDLE_PARTS, splits):
            assert row["frames"][part] in pools[part](split), (row["cell"], part)
        # the bank position is segments before the question, the own position in its segment
        assert row["in_question_segment"] == (row["position"] == "own"), row
    for c in res["cells"]:
        assert c["n"] == 3 and c["correct"] <= c["first_is_digit"] and c["digits"] == 15  # 5-digit passkeys
    body = heldout_parts.render(res)
    assert body.startswith("Device: ") and "|---" in body and report.benchmark_of("heldout_parts_t", res) == "heldout_parts"


def test_samples_do_not_depend_on_which_cells_run():
    a = heldout_parts.cell_samples(1, 2048, 2, 2, 0, 0.0, "heldout_subject", "stdlib", True)[1]
    b = heldout_parts.cell_samples(1, 2048, 2, 2, 0, 0.0, "heldout_subject", "stdlib", True)[1]
    c = heldout_parts.cell_samples(1, 2048, 2, 3, 0, 0.0, "heldout_subject", "stdlib", True)[1]
    assert all((x.tokens == y.tokens).all() for x, y in zip(a, b))
    assert not all((x.tokens == y.tokens).all() for x, y in zip(a, c))


def test_bad_arguments_are_refused():
    assert heldout_parts.parse_cells("x=heldout_fact/stdlib_heldout") == {"x": ("heldout_fact", "stdlib_heldout")}
    with pytest.raises(ValueError, match="unknown cell"):
        heldout_parts.parse_cells("nope")
    with pytest.raises(ValueError, match="needle phrasing must be one of"):
        heldout_parts.parse_cells("x=heldout_filler/stdlib")
    out = subprocess.run([sys.executable, "bench/heldout_parts.py", "--preset", "tiny", "--positions", "middle"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--positions takes" in out.stderr
    helped = subprocess.run([sys.executable, "bench/heldout_parts.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "--cells" in helped.stdout
