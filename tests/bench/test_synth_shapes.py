"""The synthetic benchmark sizes: parameter counts the size names promise, Llama proportions."""

import pytest

from bench._synth import SHAPES


@pytest.mark.parametrize(
    ("size", "params"), [("100m", 0.1e9), ("270m", 0.27e9), ("1b", 1.0e9), ("3b", 3.0e9)]
)
def test_sizes_have_the_parameter_count_their_name_says(size: str, params: float) -> None:
    shape = SHAPES[size]
    assert shape.parameters == pytest.approx(params, rel=0.05)
    assert shape.file_bytes() == 2 * shape.parameters  # bf16
    assert shape.vocab == 32000 and shape.hidden % shape.heads == 0
    assert shape.intermediate == pytest.approx(2.75 * shape.hidden, rel=0.01)
    assert shape.intermediate % 64 == 0  # the blocked kernels' fast path


def test_3b_has_realistic_tensors_and_a_valid_config() -> None:
    shape = SHAPES["3b"]
    shapes = dict(shape.tensor_shapes())
    assert shapes["model.embed_tokens.weight"] == (32000, 2048)
    assert shapes["model.layers.55.mlp.down_proj.weight"] == (2048, 5632)
    assert "model.layers.56.input_layernorm.weight" not in shapes
    config = shape.hf_config()
    assert config["hidden_size"] // config["num_attention_heads"] == 128  # type: ignore[operator]


def test_3b_names_and_shapes_match_a_transformers_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built on the meta device (no memory): the same tensors transformers would load."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES["3b"]
    config = {k: v for k, v in shape.hf_config().items() if k != "architectures"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert theirs == dict(shape.tensor_shapes())
