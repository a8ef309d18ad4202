"""Merge YAML: mergekit's schema and mergeops' extensions."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergeops import MergeError, merge_files
from mergeops.config import load_config, parse_config, to_merge_kwargs


def _write_config(folder: Path, data: dict) -> Path:
    path = folder / "merge.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_mergekit_schema_with_base_listed_among_models(tmp_path):
    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "base"},
                {"model": "ft1", "parameters": {"weight": 0.7, "density": 0.5}},
                "ft2",
            ],
            "parameters": {"normalize": True, "lambda": 0.9},
            "dtype": "bfloat16",
            "tokenizer_source": "base",
        }
    )
    kwargs = to_merge_kwargs(config, tmp_path)
    assert kwargs["models"] == [str(tmp_path / "ft1"), str(tmp_path / "ft2")]
    assert kwargs["model_names"] == ["ft1", "ft2"]
    # mergekit's defaults fill what the YAML omits (ties keeps every entry: density 1.0)
    assert kwargs["model_params"] == [{"weight": 0.7, "density": 0.5}, {"density": 1.0}]
    assert kwargs["base"] == str(tmp_path / "base")
    assert kwargs["params"]["normalize"] is True and kwargs["params"]["lambda"] == 0.9
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["compute_dtype"] == torch.bfloat16


def test_ckreg_conventions_keep_ckreg_defaults_and_float32(tmp_path):
    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": ["ft1", "ft2"],
            "dtype": "bfloat16",
            "conventions": "ckreg",
        }
    )
    kwargs = to_merge_kwargs(config, tmp_path)
    assert kwargs["model_params"] == [{}, {}]
    assert kwargs["params"] == {}
    assert kwargs["compute_dtype"] == torch.float32


def test_linear_keeps_a_listed_base_model_as_an_input(tmp_path):
    config = parse_config(
        {"merge_method": "linear", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}
    )
    assert len(to_merge_kwargs(config, tmp_path)["models"]) == 2


def test_extensions_metrics_side_inputs_and_state(tmp_path):
    config = parse_config(
        {
            "merge_method": "fisher",
            "models": [
                {"model": "/abs/a.safetensors", "metric": 0.5, "fisher": "fa.safetensors"},
                {
                    "model": "b.safetensors",
                    "name": "bee",
                    "metric": 0.7,
                    "fisher": "fb.safetensors",
                },
            ],
            "state": "state",
            "max_shard_size": "1GB",
        }
    )
    kwargs = to_merge_kwargs(config, tmp_path)
    assert kwargs["model_names"] == ["a", "bee"]
    assert kwargs["models"][0] == "/abs/a.safetensors"
    assert kwargs["metrics"] == [0.5, 0.7]
    assert kwargs["fisher"] == [str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")]
    assert kwargs["state_path"] == str(tmp_path / "state")
    assert kwargs["max_shard_size"] == "1GB"


def test_partial_side_inputs_name_the_model(tmp_path):
    config = parse_config(
        {"merge_method": "fisher", "models": [{"model": "a", "fisher": "fa"}, {"model": "b"}]}
    )
    with pytest.raises(MergeError, match="'b' has no 'fisher'"):
        to_merge_kwargs(config, tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"merge_method": "ties", "slices": []}, "slices"),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "a", "parameters": {"density": {"filter": "mlp"}}}],
            },
            "density",
        ),
        ({"merge_method": "ties", "models": ["a"], "modules": {}}, "modules"),
        ({"merge_method": "ties", "models": ["a"], "colour": "red"}, "colour"),
        ({"models": ["a"]}, "merge_method"),
    ],
)
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(MergeError, match=match):
        parse_config(data)


def test_unknown_method_in_config(tmp_path):
    config = parse_config({"merge_method": "tiez", "models": ["a"]})
    with pytest.raises(MergeError, match="unknown merge method 'tiez'"):
        to_merge_kwargs(config, tmp_path)


def test_objective_entry(tmp_path):
    config = parse_config(
        {
            "merge_method": "linear",
            "models": ["a"],
            "objective": "tests.mergeops.test_config:ToyObjective",
        }
    )
    assert isinstance(to_merge_kwargs(config, tmp_path)["objective"], ToyObjective)
    broken = parse_config(
        {"merge_method": "linear", "models": ["a"], "objective": "no_such_module:x"}
    )
    with pytest.raises(MergeError, match="cannot load objective"):
        to_merge_kwargs(broken, tmp_path)


class ToyObjective:
    def loss(self, params):
        return sum(p.sum() for p in params.values())


def test_config_file_end_to_end(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.ones(3)}, str(tmp_path / "ft.safetensors"))
    path = _write_config(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": "base.safetensors",
            "models": [{"model": "ft.safetensors", "parameters": {"weight": 2.0}}],
            "parameters": {"lambda": 0.25},
            "device": "cpu",
        },
    )
    result = merge_files(
        out_dir=tmp_path / "out", progress=False, **to_merge_kwargs(load_config(path), tmp_path)
    )
    assert result.tensor_count == 1
