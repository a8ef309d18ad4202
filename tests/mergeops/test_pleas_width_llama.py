"""pleas at ``width_factor`` 1.5 on a tiny Llama through ``ckreg merge --config``: the MLP
blocks are widened (residual stream and heads kept), ``config.json`` says the new
``intermediate_size`` and ``from_pretrained`` loads the output with no key left over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

import mergeops
from mergeops.cli import merge_app

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False,
         "max_position_embeddings": 32}  # fmt: skip


def llama_probe():
    """The objective the YAML names: a ``LlamaFeatureProbe`` on fixed token ids."""
    from transformers import LlamaConfig

    from bench.lmzoo.features import LlamaFeatureProbe

    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(4))
    return LlamaFeatureProbe(LlamaConfig(**LLAMA), ids)


def _llama_folder(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path, safe_serialization=True)
    return path


def test_ckreg_merge_writes_a_wider_llama_that_from_pretrained_loads(tmp_path):
    from transformers import LlamaForCausalLM

    _llama_folder(tmp_path / "a", 0)
    _llama_folder(tmp_path / "b", 1)
    config = {"merge_method": "pleas", "conventions": "ckreg",
              "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"width_factor": 1.5, "least_squares": False},
              "objective": "tests.mergeops.test_pleas_width_llama:llama_probe"}  # fmt: skip
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    args = ["merge", "--config", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(merge_app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    written = json.loads((out / "config.json").read_text())
    assert written["intermediate_size"] == 36 and written["hidden_size"] == 16
    shapes = _shapes(out)
    assert shapes["model.layers.1.mlp.up_proj.weight"] == (36, 16)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (16, 36)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (16, 16)  # residual, heads kept
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.intermediate_size == 36
    logits = model(llama_probe().input_ids).logits
    assert bool(torch.isfinite(logits).all())


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    source = mergeops.open_source(folder)
    return {k: tuple(source.metadata(k).shape) for k in source.keys()}  # noqa: SIM118
