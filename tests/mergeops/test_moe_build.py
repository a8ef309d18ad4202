"""build_moe: a dense base + fine-tunes -> a loadable Mixtral whose experts are the fine-tunes' MLPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergeops.moe.build import BuildParams, ExpertSource, build_moe
from mergeops.moe.experts import MoeError
from tests.mergeops import moe_tiny


@pytest.fixture(scope="module")
def dense_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("dense")
    base = moe_tiny.llama(0)
    base_dir = moe_tiny.save(base, root / "base")
    tunes = [moe_tiny.save(moe_tiny.nudged(base, s, 0.05), root / f"ft{s}") for s in (1, 2, 3)]
    return base_dir, tunes


def _experts(tunes: list[Path]) -> list[ExpertSource]:
    prompts = moe_tiny.calibration(count=6, seed=7)
    return [
        ExpertSource(t, positive=prompts[2 * i : 2 * i + 2], negative=prompts[:1])
        for i, t in enumerate(tunes)
    ]


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_build_loads_and_experts_are_the_finetunes(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path, gate_mode: str
) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, tunes = dense_zoo
    params = BuildParams(gate_mode=gate_mode, experts_per_token=2)  # type: ignore[arg-type]
    result = build_moe(base_dir, _experts(tunes), tmp_path / "moe", params)
    moe = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 3
    assert moe.config.num_experts_per_tok == 2
    state = moe.state_dict()
    ft2 = AutoModelForCausalLM.from_pretrained(tunes[2]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    torch.testing.assert_close(
        state["model.layers.1.mlp.experts.down_proj"][2], ft2["model.layers.1.mlp.down_proj.weight"]
    )
    torch.testing.assert_close(
        state["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )
    router = state["model.layers.0.mlp.gate.weight"]
    torch.testing.assert_close(router.norm(dim=-1), torch.ones(3))
    if gate_mode != "random":
        assert not torch.allclose(router[0], router[1])
    assert torch.isfinite(moe(torch.tensor([[1, 2, 3]])).logits).all()


def test_one_expert_per_token_with_identical_experts_equals_the_dense_model(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Every expert = the base's MLP and top-1 routing: the MoE computes what the base computes."""
    from transformers import AutoModelForCausalLM

    base_dir, _ = dense_zoo
    experts = [ExpertSource(base_dir, positive=moe_tiny.calibration(2, seed=s)) for s in (1, 2)]
    build_moe(base_dir, experts, tmp_path / "moe", BuildParams(experts_per_token=1))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(ids).logits
    want = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_experts_are_named_and_nothing_is_written(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base_dir, tunes = dense_zoo
    moe_dir = moe_tiny.save(moe_tiny.mixtral(), tmp_path / "already-moe")
    out = tmp_path / "out"
    with pytest.raises(
        MoeError,
        match=r"not a dense Llama-style model: no tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'",
    ):
        build_moe(
            base_dir,
            [ExpertSource(tunes[0]), ExpertSource(moe_dir)],
            out,
            BuildParams(gate_mode="random"),
        )
    with pytest.raises(MoeError, match="has no positive prompts"):
        build_moe(base_dir, [ExpertSource(t) for t in tunes], out)
    with pytest.raises(MoeError, match="experts_per_token=3 exceeds the 2 experts"):
        build_moe(
            base_dir,
            [ExpertSource(t) for t in tunes[:2]],
            out,
            BuildParams(gate_mode="random", experts_per_token=3),
        )
    assert not out.exists()


def test_shared_weights_average(dense_zoo: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, tunes = dense_zoo
    params = BuildParams(gate_mode="random", shared_weights="average")
    build_moe(base_dir, [ExpertSource(t) for t in tunes[:2]], tmp_path / "moe", params)
    name = "model.layers.1.self_attn.o_proj.weight"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").state_dict()[name]
    tuned = [AutoModelForCausalLM.from_pretrained(t).state_dict()[name] for t in tunes[:2]]
    torch.testing.assert_close(got, (tuned[0] + tuned[1]) / 2)


def test_shared_base_expert_with_identical_experts_equals_the_dense_model(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Qwen2-MoE with the base's MLP as shared expert: (1-w)·E + w·E = E when every expert is it."""
    from transformers import AutoModelForCausalLM

    base_dir, _ = dense_zoo
    experts = [ExpertSource(base_dir, positive=moe_tiny.calibration(2, seed=s)) for s in (1, 2)]
    params = BuildParams(experts_per_token=1, shared_expert="base", shared_expert_weight=0.3)
    build_moe(base_dir, experts, tmp_path / "moe", params)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.model_type == "qwen2_moe" and moe.config.num_experts == 2
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    torch.testing.assert_close(moe(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_shared_expert_is_the_finetunes_average_and_is_gated(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from mergeops.moe.layout import detect_moe
    from mergeops.moe.stats import safetensors_shapes

    base_dir, tunes = dense_zoo
    params = BuildParams(shared_expert="average", shared_expert_weight=0.25)
    build_moe(base_dir, _experts(tunes), tmp_path / "moe", params)
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").state_dict()
    downs = [
        AutoModelForCausalLM.from_pretrained(t).state_dict()["model.layers.1.mlp.down_proj.weight"]
        for t in tunes
    ]
    mlp = "model.layers.1.mlp"
    torch.testing.assert_close(
        state[f"{mlp}.shared_expert.down_proj.weight"], 0.5 * torch.stack(downs).mean(dim=0)
    )
    torch.testing.assert_close(state[f"{mlp}.experts.down_proj"][1], 0.75 * downs[1])
    assert state[f"{mlp}.shared_expert_gate.weight"].shape == (1, 16)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    layout = detect_moe(safetensors_shapes(tmp_path / "moe"), config=config)
    assert layout is not None and layout.summary()["layers_with_shared_experts"] == 2


def test_a_mixtral_cannot_have_a_shared_expert(
    dense_zoo: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base_dir, tunes = dense_zoo
    params = BuildParams(architecture="mixtral", shared_expert="base")
    with pytest.raises(MoeError, match="needs architecture 'qwen2_moe'"):
        build_moe(base_dir, _experts(tunes), tmp_path / "moe", params)
    assert not (tmp_path / "moe").exists()
