"""extract-lora: a tiny Llama fine-tune whose deltas are exactly rank 2, extracted and loaded
back through peft's PeftModel.from_pretrained + merge_and_unload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeops.lora_extract import ExtractError, extract_lora
from mergeops.ops.lowrank import kept_rank, lora_factors

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(hidden: int = 16):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       tie_word_embeddings=False)  # fmt: skip


def _save(
    folder: Path, state: dict[str, torch.Tensor], hidden: int = 16, shard: str = "5GB"
) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config(hidden))
    model.load_state_dict(state)
    model.save_pretrained(str(folder), max_shard_size=shard)
    return folder


def _rank2(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen) * 0.1


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """base, and a fine-tune = base + rank-2 deltas on every matrix + a changed final norm."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(_config()).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tuned = {k: (v + _rank2(v.shape, gen) if v.ndim == 2 else v.clone()) for k, v in base.items()}
    tuned["model.norm.weight"] += 0.25
    return _save(root / "base", base), _save(root / "tuned", tuned, shard="20KB")  # sharded


def _merged_state(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _tuned_state(folder: Path) -> dict[str, torch.Tensor]:
    from mergeops.io.layouts import open_source

    source = open_source(folder)
    names = source.keys()
    return {key: source.get(key) for key in names}


def test_rank2_delta_reproduced_through_peft(pair, tmp_path) -> None:
    base, tuned = pair
    report = extract_lora(base, tuned, tmp_path / "a", max_rank=8, sv_epsilon=1e-4, device="cpu")
    assert set(report.ranks.values()) == {2}  # the singular value rule finds the true rank
    assert sorted(report.modules_to_save) == ["lm_head", "model.embed_tokens", "model.norm"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["rank_pattern"] == {}
    assert "model.layers.1.mlp.down_proj" in config["target_modules"]
    merged, expected = _merged_state(base, tmp_path / "a"), _tuned_state(tuned)
    worst = max(float((merged[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-5, worst


def test_embeddings_as_lora_and_default_rank(pair, tmp_path) -> None:
    base, tuned = pair
    report = extract_lora(base, tuned, tmp_path / "a", max_rank=3, embeddings=True, device="cpu")
    assert report.modules_to_save == ["model.norm"]
    assert report.ranks["model.embed_tokens"] == 3  # sv_epsilon 0: every non-zero value counts
    names = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in names
    assert "base_model.model.lm_head.lora_A.weight" in names
    merged, expected = _merged_state(base, tmp_path / "a"), _tuned_state(tuned)
    assert max(float((merged[k] - expected[k]).abs().max()) for k in expected) <= 1e-5


def test_max_rank_1_error_is_measured_and_smaller(pair, tmp_path) -> None:
    base, tuned = pair
    report = extract_lora(base, tuned, tmp_path / "a", max_rank=1, device="cpu")
    merged, expected = _merged_state(base, tmp_path / "a"), _tuned_state(tuned)
    base_state = _tuned_state(base)
    for module, error in report.rel_errors.items():
        key = f"{module}.weight"
        delta = expected[key] - base_state[key]
        measured = float(torch.linalg.norm(merged[key] - expected[key]) / torch.linalg.norm(delta))
        assert 0.0 < measured < 1.0
        assert measured == pytest.approx(error, rel=1e-3, abs=1e-6), module


def test_lowrank_rule() -> None:
    s = torch.tensor([10.0, 1.0, 0.05, 0.0])
    assert kept_rank(s, max_rank=8, sv_epsilon=0.0) == 3
    assert kept_rank(s, max_rank=8, sv_epsilon=0.01) == 2
    assert kept_rank(s, max_rank=1, sv_epsilon=0.0) == 1
    assert kept_rank(torch.zeros(3), max_rank=4, sv_epsilon=0.0) == 0
    with pytest.raises(ValueError, match="sv_epsilon"):
        kept_rank(s, max_rank=2, sv_epsilon=1.5)
    delta = torch.randn(6, 2) @ torch.randn(2, 5)
    f = lora_factors(delta, max_rank=4, sv_epsilon=1e-5)
    assert f.rank == 2 and torch.allclose(f.b @ f.a, delta, atol=1e-5)


def test_bad_input_is_named(pair, tmp_path) -> None:
    base, tuned = pair
    with pytest.raises(ExtractError, match=r"base checkpoint .* does not exist"):
        extract_lora(tmp_path / "nope", tuned, tmp_path / "a")
    with pytest.raises(ExtractError, match="nothing to factorise"):
        extract_lora(base, base, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing half-written
    from transformers import LlamaForCausalLM

    wide = LlamaForCausalLM(_config(hidden=24)).state_dict()
    _save(tmp_path / "wide", wide, hidden=24)
    with pytest.raises(
        ExtractError, match=r"shape mismatch for '.+': base \(32, 16\), model \(32, 24\)"
    ):
        extract_lora(base, tmp_path / "wide", tmp_path / "c")
    extra = dict(_tuned_state(tuned), extra=torch.zeros(2))
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ExtractError, match=r"only in model \['extra'\]"):
        extract_lora(base / "model.safetensors", tmp_path / "extra.safetensors", tmp_path / "d")
    assert len(list(tuned.glob("model-*.safetensors"))) > 1  # the fine-tune is read sharded


def test_cli(pair, tmp_path) -> None:
    from flows.cli import app

    base, tuned = pair
    args = ["extract-lora", "--base", str(base), "--model", str(tuned), "--out"]
    result = CliRunner().invoke(
        app, [*args, str(tmp_path / "a"), "--max-rank", "2", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "LoRA modules (ranks 2..2)" in result.output
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    again = CliRunner().invoke(app, [*args, str(tmp_path / "a"), "--no-progress"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    missing = CliRunner().invoke(app, [*args, str(tmp_path / "b"), "--register"])
    assert missing.exit_code != 0 and "--base-id" in missing.output
    helped = CliRunner().invoke(app, ["extract-lora", "--help"], env={"COLUMNS": "200"})
    assert "sv-epsilon" in helped.output and "largest singular value" in helped.output


def test_factors_match_mergekit_extract_lora(pair, tmp_path) -> None:
    """Same tensor names and the same B·A as mergekit-extract-lora 0.1.5 (in-process)."""
    import mergekit  # noqa: F401 - the oracle (dev extra)
    from click.testing import CliRunner as ClickRunner
    from mergekit.scripts.extract_lora import main as mergekit_extract

    base, tuned = pair
    argv = ["--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "mk"),
            "--max-rank", "2"]  # fmt: skip
    result = ClickRunner().invoke(mergekit_extract, argv)
    assert result.exit_code == 0, result.output
    extract_lora(base, tuned, tmp_path / "ours", max_rank=2, device="cpu")
    theirs = load_file(str(tmp_path / "mk" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(ours) <= set(theirs)
    for key in set(theirs) - set(ours):  # mergekit saves every norm, changed or not
        assert "layernorm" in key and torch.equal(theirs[key], _tuned_state(base)[key[17:]])
    for key in (k for k in ours if ".lora_A." in k):
        key_b = key.replace(".lora_A.", ".lora_B.")
        expected = theirs[key_b] @ theirs[key]
        got = ours[key_b] @ ours[key]
        assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max()), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(pair, tmp_path) -> None:
    base, tuned = pair
    extract_lora(base, tuned, tmp_path / "cpu", max_rank=2, device="cpu")
    extract_lora(base, tuned, tmp_path / "gpu", max_rank=2, device="cuda")
    cpu = load_file(str(tmp_path / "cpu" / "adapter_model.safetensors"))
    gpu = load_file(str(tmp_path / "gpu" / "adapter_model.safetensors"))
    assert set(cpu) == set(gpu)
    for key in (k for k in cpu if ".lora_A." in k):
        key_b = key.replace(".lora_A.", ".lora_B.")
        assert torch.allclose(gpu[key_b] @ gpu[key], cpu[key_b] @ cpu[key], atol=1e-5), key
