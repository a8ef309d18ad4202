"""``ckreg merge --config merge.yml --out DIR`` through the typer sub-app."""

import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeops.cli import merge_app

runner = CliRunner()


def _setup(tmp_path, method="linear", **extra):
    save_file({"w": torch.tensor([1.0, 3.0])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([3.0, 5.0])}, str(tmp_path / "b.safetensors"))
    config = {
        "merge_method": method,
        "models": [{"model": "a.safetensors"}, {"model": "b.safetensors"}],
        **extra,
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_merge_command_writes_the_output(tmp_path):
    config = _setup(tmp_path)
    result = runner.invoke(
        merge_app,
        [
            "merge",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "merged 1 tensors with linear" in result.output
    merged = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    assert torch.equal(merged["w"], torch.tensor([2.0, 4.0]))


def test_merge_command_reports_errors_without_traceback(tmp_path):
    config = _setup(tmp_path, method="ties")
    result = runner.invoke(
        merge_app,
        ["merge", "--config", str(config), "--out", str(tmp_path / "out"), "--device", "cpu"],
    )
    assert result.exit_code == 2
    assert "needs a base model" in result.output
    assert not (tmp_path / "out").exists()


def test_help_mentions_the_schema():
    result = runner.invoke(merge_app, ["merge", "--help"])
    assert result.exit_code == 0
    assert "merge_method" in result.output and "--out" in result.output
