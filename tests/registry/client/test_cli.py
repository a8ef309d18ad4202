"""The registry CLI (typer CliRunner, in-process) against a real registry server over HTTP."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from registry.client.cli import registry_app
from tests.registry.conftest import LiveRegistry

runner = CliRunner()


def weights(path: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"w": torch.randn(4, 2, generator=generator), "b": torch.randn(4, generator=generator)},
        str(path),
    )
    return path


def invoke(live: LiveRegistry, *args: str, token: str | None = None) -> tuple[int, str]:
    result = runner.invoke(registry_app, [*args, "--url", live.url, "--token", token or live.token])
    return result.exit_code, result.output


def registered_id(output: str) -> int:
    match = re.search(r"registered checkpoint (\d+)", output)
    assert match, output
    return int(match.group(1))


@pytest.fixture(scope="module")
def base_id(live_registry: LiveRegistry, tmp_path_factory: pytest.TempPathFactory) -> int:
    path = weights(tmp_path_factory.mktemp("cli") / "cli-base.safetensors", seed=0)
    code, output = invoke(live_registry, "register", str(path), "--kind", "base", "--quiet")
    assert code == 0, output
    return registered_id(output)


def test_register_with_options_and_show(
    live_registry: LiveRegistry, base_id: int, tmp_path: Path
) -> None:
    path = weights(tmp_path / "ft.safetensors", seed=1)
    code, output = invoke(
        live_registry,
        "register", str(path), "--base", str(base_id), "--task", "math", "--run", "r9", "--step", "40",
        "--name", "cli-ft", "--tag", "a", "--tag", "b", "--metric", "loss=0.42", "--metric", "acc=0.9",
    )  # fmt: skip
    assert code == 0, output
    checkpoint_id = registered_id(output)
    code, output = invoke(live_registry, "show", str(checkpoint_id), "--json")
    shown = json.loads(output)
    assert (shown["name"], shown["task"], shown["run"], shown["step"]) == (
        "cli-ft",
        "math",
        "r9",
        40,
    )
    assert sorted(shown["tags"]) == ["a", "b"]
    code, output = invoke(live_registry, "show", str(checkpoint_id))
    assert code == 0 and "cli-ft" in output and "ft.safetensors" in output


def test_ls_table_and_json(live_registry: LiveRegistry, base_id: int, tmp_path: Path) -> None:
    code, output = invoke(live_registry, "register", str(weights(tmp_path / "ls-ft.safetensors", 2)),
                          "--base", str(base_id), "--task", "lsonly", "--quiet")  # fmt: skip
    assert code == 0, output
    code, output = invoke(live_registry, "ls", "--task", "lsonly")
    assert code == 0, output
    header, row, footer = output.strip().splitlines()
    assert header.split()[:4] == ["ID", "NAME", "KIND", "BASE_ID"]
    assert "ls-ft" in row and "lsonly" in row and "ready" in row
    assert footer == "(1 of 1)"
    code, output = invoke(
        live_registry, "ls", "--base", str(base_id), "--kind", "finetune", "--json", "--limit", "1"
    )
    page = json.loads(output)
    assert page["limit"] == 1 and len(page["items"]) == 1 and page["total"] >= 1


def test_lineage_tree(live_registry: LiveRegistry, base_id: int, tmp_path: Path) -> None:
    code, output = invoke(live_registry, "register", str(weights(tmp_path / "lin.safetensors", 3)),
                          "--base", str(base_id), "--quiet")  # fmt: skip
    child = registered_id(output)
    code, output = invoke(live_registry, "lineage", str(child), "--depth", "2")
    assert code == 0, output
    assert output.splitlines()[:3] == [
        f"checkpoint {child} 'lin' [finetune]",
        "  ancestors:",
        f"    └─ {base_id} 'cli-base' [base] (base)",
    ]
    code, output = invoke(live_registry, "lineage", str(base_id))
    assert f"└─ {child} 'lin' [finetune] (base)" in output


def test_download(live_registry: LiveRegistry, base_id: int, tmp_path: Path) -> None:
    code, output = invoke(
        live_registry, "download", str(base_id), "cli-base.safetensors", "--out", str(tmp_path)
    )
    assert code == 0, output
    target = tmp_path / "cli-base.safetensors"
    assert output.strip().endswith(str(target))
    assert target.read_bytes() == weights(tmp_path / "expected.safetensors", seed=0).read_bytes()
    code, output = invoke(
        live_registry,
        "download",
        str(base_id),
        "cli-base.safetensors",
        "--out",
        f"{tmp_path}/new/",
        "-q",
    )
    assert code == 0, output
    assert (tmp_path / "new" / "cli-base.safetensors").read_bytes() == target.read_bytes()


def test_errors_are_clean(live_registry: LiveRegistry, tmp_path: Path) -> None:
    code, output = invoke(live_registry, "show", "987654")
    assert code == 1 and "HTTP 404" in output and "Traceback" not in output
    path = weights(tmp_path / "x.safetensors", 4)
    code, output = invoke(
        live_registry, "register", str(path), "--no-base", "--quiet", token=live_registry.read_token
    )
    assert code == 1 and "HTTP 403" in output
    code, output = invoke(live_registry, "register", str(path), "--metric", "loss:0.1")
    assert code == 2 and "NAME=VALUE" in output
    code, output = invoke(live_registry, "register", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in output
