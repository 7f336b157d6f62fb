"""Run several Python command-line scripts in one interpreter, each as ``python <script> <args>``
would run it alone. Argument: a JSON list of argv lists
(``[["bench/x.py", "--help"], ["-m", "pkg.mod", "--help"]]``); prints a JSON list of
``{"argv", "code", "stdout", "stderr"}``, one per argv, in order.

Why: a subprocess per script pays its imports (torch, Ray) each time; test_bench_help's 21 scripts
took 21 s of CPU one by one and take 3 s here (seconds of wall time on a 2-core CI machine). Here
third-party modules load once; everything else a script imported (this project's modules,
``bench/common``) is dropped before the next one, and each gets ``sys.argv`` and ``sys.path`` as
``python <script>`` gives them, so a script that only works because another ran first still fails."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import sysconfig
import traceback

_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep


def _project_modules() -> list[str]:
    """Modules loaded from outside the standard library and site-packages (this project's, found
    through a script's ``sys.path`` or the editable install). Third-party ones stay: a second
    ``import torch`` after dropping it from ``sys.modules`` would break its C extensions."""
    out = []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and f"{os.sep}site-packages{os.sep}" not in f and not os.path.realpath(f).startswith(_STDLIB):
            out.append(name)
    return out


def run_script(argv: list[str], base_path: list[str]) -> dict:
    """``argv[0]`` run as ``__main__`` with ``argv`` (``["-m", module, ...]``: the module, as
    ``python -m`` runs it); its exit code and what it printed."""
    module = argv[1] if argv[0] == "-m" else None
    if module:   # `python -m`: the working directory first, sys.argv[0] becomes the module's file
        sys.path[:] = [os.getcwd(), *base_path]
        sys.argv[:] = [module, *argv[2:]]
    else:        # `python script`: the script's directory first
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *base_path]
        sys.argv[:] = list(argv)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:   # argparse's exit(2), --help's exit(0), sys.exit("message")
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    for name in _project_modules():
        del sys.modules[name]
    return {"argv": list(argv), "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    argvs = json.loads(sys.argv[1])
    base_path = sys.path[1:]   # without this file's directory (tests/): each script gets its own
    results = [run_script(argv, base_path) for argv in argvs]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
