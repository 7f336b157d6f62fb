"""bench/model_speed.py's --model-set: the timed model is the trained config, and a bad field fails
before any timing with a message naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "model_speed.py"


def _run(*args: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--presets", "tiny", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_model_set_times_the_overridden_config_and_records_it(tmp_path):
    r = _run("--train-lengths", "256", "--no-infer", "--iters", "1", "--warmup", "1", "--tag", "t",
             "--model-set", "segment_len=64", "--model-set", "self_read=true", out=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "model_speed_cpu_t.json").read_text())
    assert res["args"]["model_overrides"] == ["segment_len=64", "self_read=true"]
    dnc = [row for row in res["rows"] if row["model"] == "dnc"]
    assert dnc and all(row["kind"] == "train" for row in dnc)


def test_model_set_rejects_an_unknown_field_or_a_bad_value_before_timing(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import model_speed

    for bad, says in (("segment_length=64", "--model-set: unknown config fields: ['segment_length']"),
                      ("kv_window=-1", "kv_window must be in")):
        with pytest.raises(SystemExit) as e:
            model_speed.main(["--device", "cpu", "--presets", "tiny", "--out", str(tmp_path), "--model-set", bad])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
