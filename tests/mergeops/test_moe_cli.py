"""``ckreg moe build`` / ``ckreg moe compress`` end to end on tiny models; help stays torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mergeops.cli_moe import moe_app
from tests.mergeops import moe_tiny


def test_build_then_compress_from_the_command_line(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = moe_tiny.llama(0)
    moe_tiny.save(base, tmp_path / "base")
    for seed in (1, 2, 3, 4):
        moe_tiny.save(moe_tiny.nudged(base, seed, 0.05), tmp_path / f"ft{seed}")
    config = {
        "base_model": "base",
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "shared_expert": "base",  # a Qwen2-MoE with the base's MLP always on
        "experts": [
            {"source_model": f"ft{s}", "positive_token_ids": [[s, s + 1, s + 2]]}
            for s in (1, 2, 3, 4)
        ],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    built = runner.invoke(
        moe_app, ["build", "-c", str(tmp_path / "moe.yml"), "-o", str(tmp_path / "moe")]
    )
    assert built.exit_code == 0, built.output
    assert "4 experts per layer" in built.output
    (tmp_path / "calib.json").write_text(json.dumps([[1, 2, 3, 4, 5], [6, 7, 8, 9]]))
    args = ["compress", str(tmp_path / "moe"), "-o", str(tmp_path / "small"), "-m", "2"]
    args += ["--calibration", str(tmp_path / "calib.json"), "--method", "sub_moe"]
    done = runner.invoke(moe_app, args)
    assert done.exit_code == 0, done.output
    assert "4 -> 2 experts per layer" in done.output
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert small.config.model_type == "qwen2_moe" and small.config.num_experts == 2
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in small.state_dict()
    factored = [*args[:2], "-o", str(tmp_path / "fac"), *args[4:], "--rank", "4", "--factored"]
    assert runner.invoke(moe_app, factored).exit_code == 0
    dense = runner.invoke(
        moe_app, ["materialize", str(tmp_path / "fac"), "-o", str(tmp_path / "d")]
    )
    assert dense.exit_code == 0, dense.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_experts == 2
    again = runner.invoke(moe_app, [*args[:2], "-o", str(tmp_path / "odd"), "-m", "3", *args[6:]])
    assert again.exit_code == 1 and "do not divide into num_experts=3" in again.output
    assert not (tmp_path / "odd").exists()


def test_bad_build_config_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "moe.yml").write_text(
        yaml.safe_dump({"base_model": "b", "experts": [{}], "gates": 1})
    )
    result = CliRunner().invoke(
        moe_app, ["build", "-c", str(tmp_path / "moe.yml"), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "unknown key(s)" in result.output and "gates" in result.output


def test_moe_help_imports_no_torch() -> None:
    probe = (
        "import sys\nfrom flows.cli import app\n"
        "try:\n    app(['moe', 'build', '--help'], prog_name='ckreg')\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "base_model" in done.stdout and done.stdout.strip().endswith("LIGHT")
