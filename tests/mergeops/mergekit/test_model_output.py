"""``ckreg merge --config`` writes a loadable Hugging Face model folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.mergeops.mergekit.examples import orcamini_platy, ties
from tests.mergeops.mergekit.harness import CkregMergeFailed, run_ckreg


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_frankenmerge_folder_loads_with_transformers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = orcamini_platy(zoo, "bfloat16")
    out = tmp_path / "franken"
    tensors = run_ckreg(config, out)
    assert "model.layers.5.mlp.up_proj.weight" in tensors
    assert "model.layers.6.mlp.up_proj.weight" not in tensors
    model_config = json.loads((out / "config.json").read_text())
    assert model_config["num_hidden_layers"] == 6
    assert model_config["dtype"] == model_config["torch_dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model_relation"] == "merge"
    assert set(front["tags"]) >= {"merge", "ckreg", "mergekit"}
    assert front["base_model"] == [zoo.path("bfloat16", "ft1"), zoo.path("bfloat16", "ft2")]
    assert "merge_method: passthrough" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    # layer 3 of the output is layer 1 of ft2 (slices renumbered)
    source = AutoModelForCausalLM.from_pretrained(zoo.path("bfloat16", "ft2"))
    assert torch.equal(
        model.model.layers[3].mlp.up_proj.weight, source.model.layers[1].mlp.up_proj.weight
    )


def test_out_dtype_and_float32_folder(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    config = {**ties(zoo, "float32"), "out_dtype": "bfloat16"}
    out = tmp_path / "ties"
    tensors = run_ckreg(config, out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_overwrite_replaces_only_after_success(zoo, tmp_path):
    config = orcamini_platy(zoo, "float32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(CkregMergeFailed, match="--overwrite"):
        run_ckreg(config, out)
    bad = {**config, "merge_method": "no_such_method"}
    with pytest.raises(CkregMergeFailed, match="no_such_method"):
        run_ckreg(bad, out, "--overwrite")
    assert (out / "old.txt").read_text() == "keep me"
    run_ckreg(config, out, "--overwrite")
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_output_folder_may_not_hold_an_input(zoo, tmp_path):
    config = orcamini_platy(zoo, "float32")
    with pytest.raises(CkregMergeFailed, match="holds input model"):
        run_ckreg(config, zoo.root / "float32" / "ft1", "--overwrite")
    assert (zoo.root / "float32" / "ft1" / "config.json").is_file()
