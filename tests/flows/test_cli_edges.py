"""Friendly edges of the ``ckreg`` command: an unreachable server is one line naming its URL
(exit 1, no traceback), ``--version``, server-side commands say which database they use, and a
fine-tune without a base is refused before anything is sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_settings import database_line
from registry.settings import Settings
from tests.services import free_port

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
CKREG = [sys.executable, "-c", "from flows.cli import app; app(prog_name='ckreg')"]


@pytest.fixture(scope="module")
def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edges") / "ft.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKREG_")}
    return env | {"PYTHONPATH": str(REPO)} | extra


@pytest.mark.parametrize(
    "args",
    [
        ["ls"],
        ["show", "1"],
        ["lineage", "1"],
        ["download", "1", "model.safetensors"],
        ["register", "WEIGHTS", "--kind", "base", "--quiet"],
        ["merges", "ls"],
        ["merges", "show", "1"],
        ["merges", "watch", "1"],
        ["policy", "ls"],
        ["pull", "1", "WEIGHTS.d"],
    ],
)
def test_unreachable_server_is_one_line(args: list[str], closed_url: str, weights: Path) -> None:
    argv = [a.replace("WEIGHTS", str(weights)) for a in args]
    result = runner.invoke(app, [*argv, "--url", closed_url, "--token", "t"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert closed_url in lines[0] and ("cannot reach" in lines[0] or "unreachable" in lines[0])


def test_unreachable_in_a_real_process_has_no_traceback(closed_url: str) -> None:
    done = subprocess.run(
        [*CKREG, "ls", "--url", closed_url], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: cannot reach the registry at {closed_url} ([Errno 111] Connection refused); "
        "is `ckreg serve` running there? (set --url or CKREG_API_URL)"
    ]


def test_version() -> None:
    from importlib.metadata import version

    done = subprocess.run([*CKREG, "--version"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ckreg {version('ckreg')}"


def test_token_create_says_which_database(tmp_path: Path) -> None:
    """Without CKREG_HOME the home is ./.ckreg of the working folder, and the line says so."""
    done = subprocess.run(
        [*CKREG, "token", "create", "--name", "ci"],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    home = tmp_path / ".ckreg"
    assert (home / "registry.db").is_file()
    assert done.stderr.splitlines()[0] == (
        f"using database sqlite:///{home}/registry.db "
        f"(CKREG_DATABASE_URL unset; CKREG_HOME unset, so {home})"
    )
    assert len(done.stdout.split()) == 1  # the secret, alone on stdout


def test_database_line_masks_the_password(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url="postgresql://ckreg:s3cret@db:5432/ckreg")
    line = database_line(settings)
    assert line == (
        "using database postgresql://ckreg:***@db:5432/ckreg "
        f"(from CKREG_DATABASE_URL; CKREG_HOME={tmp_path})"
    )


def test_finetune_without_base_is_refused(closed_url: str, weights: Path, tmp_path: Path) -> None:
    auth = ["--url", closed_url, "--token", "t", "--quiet"]
    refused = runner.invoke(app, ["register", str(weights), *auth])
    assert refused.exit_code == 1
    assert "fine-tune without a base" in refused.output
    assert "--base ID" in refused.output and "--kind base" in refused.output
    assert "cannot reach" not in refused.output  # refused before any request
    for extra in (["--kind", "base"], ["--no-base"], ["--base", "1"]):
        passed = runner.invoke(app, ["register", str(weights), *extra, *auth])
        assert passed.exit_code == 1 and "cannot reach the registry" in passed.output, extra
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    save_file({"a.lora_A.weight": torch.ones(1, 2)}, str(adapter / "adapter_model.safetensors"))
    passed = runner.invoke(app, ["register", str(adapter), *auth])
    assert "fine-tune without a base" not in passed.output, passed.output
