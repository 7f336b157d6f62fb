"""Every benchmark script answers ``--help`` (exit 0, a usage line, its defaults), as the README's
"every user-facing command has --help" asks; ``bench/common.HelpFormatter`` names the defaults."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import HelpFormatter  # noqa: E402

# every bench/*.py that runs as a command (has a __main__ block)
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text())


def test_every_bench_script_answers_help():
    assert len(SCRIPTS) >= 10, SCRIPTS                       # the glob found the scripts
    # one interpreter runs every script's --help as if alone (tests/script_runner.py): torch, numpy and
    # Ray load once instead of once per script (~10 s of a 2-core CI run)
    argvs = [[str(s), "--help"] for s in SCRIPTS]
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "script_runner.py"), json.dumps(argvs)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert [r["argv"] for r in results] == argvs
    for r in results:
        name = Path(r["argv"][0]).name
        assert r["code"] == 0, (name, r["stderr"][-2000:])
        assert r["stdout"].startswith("usage:"), (name, r["stdout"][:200])
        assert "default" in r["stdout"], name                 # defaults are named


def test_help_formatter_names_defaults_without_changing_parsing():
    p = argparse.ArgumentParser(description="first\n  indented", formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=3)                    # no help string
    p.add_argument("--tag", default="x", help="result name")
    p.add_argument("--out", default=None, help="path (null: bench/results)")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--n", type=int, default=5, help="samples; default 5")
    p.add_argument("--share", type=float, default=0.5, help="50%% of it")
    text = p.format_help()
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip().startswith("--")}
    assert "first\n  indented" in text                               # the description keeps its layout
    assert lines["--steps"].endswith("(default: 3)")
    assert lines["--tag"].endswith("result name (default: x)")
    assert "default" not in lines["--out"] and "default" not in lines["--fast"]
    assert lines["--n"].endswith("samples; default 5")                # said once
    assert lines["--share"].endswith("50% of it (default: 0.5)")
    a = p.parse_args(["--steps", "4"])
    assert (a.steps, a.tag, a.out, a.fast, a.n, a.share) == (4, "x", None, False, 5, 0.5)
    assert [x.help for x in p._actions if x.dest == "steps"] == [None]   # the parser was not changed
