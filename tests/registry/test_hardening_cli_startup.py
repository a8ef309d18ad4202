"""Issue 9: ``ckreg --help`` (and the help of the client and merge commands) imports no torch,
no server stack and no MLflow/Prefect: help must come back at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "safetensors", "mergeops.engine", "fastapi", "sqlmodel", "mlflow", "prefect")
PROBE = (
    "import json, sys\n"
    "from flows.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:], prog_name='ckreg')\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
)


@pytest.mark.parametrize(
    "argv", [["--help"], ["register", "--help"], ["merge", "--help"], ["serve", "--help"]]
)
def test_help_imports_no_torch(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    *help_lines, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result == {"code": 0, "loaded": []}, result
    assert "Usage" in "\n".join(help_lines)


EXIT_PROBE = (
    "import gc, sys\n"
    "import flows.cli\n"
    "sys.argv = ['ckreg', '--version']\n"
    "try:\n"
    "    flows.cli.entry()\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(gc.get_freeze_count())\n"
)


def test_console_script_freezes_objects_before_exit() -> None:
    """``ckreg`` is ``flows.cli:entry``: the command runs, then every live object is frozen, so
    the interpreter's last collections skip them (0.45 s at exit after a merge imported torch)."""
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("ckreg") == "flows.cli:entry"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "ckreg" in done.stdout.splitlines()[0]  # the command itself ran
    assert int(done.stdout.strip().splitlines()[-1]) > 1000
