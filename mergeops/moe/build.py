"""Build a Mixtral-style MoE from a dense base and its fine-tunes: each fine-tune's MLP is an expert.

Attention, norms and embeddings come from the base (or the average of the fine-tunes), the router
of every layer from prompts: ``hidden`` (mean input of that layer's MLP over each expert's positive
prompts, minus the mean over its negative prompts, normalised), ``cheap_embed`` (mean token
embedding of the prompts, the same at every layer) or ``random``. Optionally a shared expert (the
base's MLP or the fine-tunes' average) makes it a Qwen2-MoE (see ``mergeops.moe.architectures``).
The idea and gate modes follow
mergekit-moe (https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md); the output loads with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeops.moe.architectures import (
    Architecture,
    SharedExpert,
    add_shared_expert,
    moe_config,
    pick_architecture,
    shared_mlp,
)
from mergeops.moe.experts import MoeError
from mergeops.moe.stats import collect_layer_inputs

GateMode = Literal["hidden", "cheap_embed", "random"]
_MLP = ("gate_proj", "up_proj", "down_proj")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class BuildParams(BaseModel):
    """How to assemble the MoE."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    shared_weights: Literal["base", "average"] = "base"  # attention, norms, embeddings
    seed: int = 0
    # None: mixtral, or qwen2_moe when there is a shared expert
    architecture: Architecture | None = None
    shared_expert: SharedExpert = "none"  # the base's MLP or the fine-tunes' average
    shared_expert_weight: float = Field(default=0.5, gt=0.0, lt=1.0)


@dataclass
class ExpertSource:
    """One expert: a dense fine-tune of the base, and prompts (token-id tensors) it should get."""

    model_dir: Path
    positive: list[torch.Tensor] = field(default_factory=list)
    negative: list[torch.Tensor] = field(default_factory=list)


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _check_dense(model: Any, folder: Path, base: Any | None) -> None:
    names = set(model.state_dict())
    missing = f"model.layers.0.mlp.{_MLP[0]}.weight"
    if missing not in names:
        raise MoeError(f"'{folder}' is not a dense Llama-style model: no tensor '{missing}'")
    if base is not None:
        theirs, ours = base.state_dict(), model.state_dict()
        for name, tensor in theirs.items():
            if name not in ours or ours[name].shape != tensor.shape:
                got = tuple(ours[name].shape) if name in ours else "missing"
                raise MoeError(
                    f"expert '{folder}' does not match the base at '{name}': base {tuple(tensor.shape)}, expert {got}"
                )


def _prompt_vectors(
    base: Any, prompts: Sequence[torch.Tensor], mode: GateMode, layers: int
) -> torch.Tensor:
    """(layers, hidden) mean representation of ``prompts`` for one expert."""
    if mode == "cheap_embed":
        table = base.get_input_embeddings().weight
        mean = torch.cat([table[p.flatten()] for p in prompts]).mean(dim=0)
        return mean.expand(layers, -1)
    prefixes = [f"model.layers.{i}.mlp" for i in range(layers)]
    inputs = collect_layer_inputs(base, prefixes, prompts)
    return torch.stack([inputs[p].mean(dim=0) for p in prefixes])


def gate_weights(
    base: Any, experts: Sequence[ExpertSource], params: BuildParams, layers: int
) -> torch.Tensor:
    """(layers, experts, hidden) router weights, one unit row per expert."""
    hidden = base.config.hidden_size
    if params.gate_mode == "random":
        generator = torch.Generator().manual_seed(params.seed)
        rows = torch.randn(layers, len(experts), hidden, generator=generator)
        return torch.nn.functional.normalize(rows, dim=-1)
    per_expert = []
    for index, expert in enumerate(experts):
        if not expert.positive:
            raise MoeError(
                f"expert {index} ('{expert.model_dir}') has no positive prompts; gate_mode '{params.gate_mode}' needs them"
            )
        vector = _prompt_vectors(base, expert.positive, params.gate_mode, layers)
        if expert.negative:
            vector = vector - _prompt_vectors(base, expert.negative, params.gate_mode, layers)
        per_expert.append(vector)
    return torch.nn.functional.normalize(torch.stack(per_expert, dim=1), dim=-1)


def expert_states(
    base: Any, experts: Sequence[ExpertSource], average_shared: bool
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each expert's MLP tensors, and the non-MLP tensors (the base's, or the experts' mean).

    One expert model is in memory at a time."""
    shared = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
    if average_shared:
        shared = {k: torch.zeros_like(v) for k, v in shared.items()}
    mlps = []
    for expert in experts:
        model = _load(expert.model_dir)
        _check_dense(model, expert.model_dir, base)
        state = model.state_dict()
        mlps.append({k: v for k, v in state.items() if ".mlp." in k})
        if average_shared:
            for name in shared:
                shared[name] += state[name] / len(experts)
        del model, state
    return mlps, shared


def moe_state(
    mlps: Sequence[dict[str, torch.Tensor]], shared: dict[str, torch.Tensor], gates: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The routed part of the state dict (transformers 5 in-memory names: fused experts under
    ``mlp``), the same for Mixtral and Qwen2-MoE."""
    out = dict(shared)
    for layer in range(gates.shape[0]):
        mlp = f"model.layers.{layer}.mlp"
        out[f"{mlp}.gate.weight"] = gates[layer]
        out[f"{mlp}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([s[f"{mlp}.gate_proj.weight"], s[f"{mlp}.up_proj.weight"]]) for s in mlps]
        )
        out[f"{mlp}.experts.down_proj"] = torch.stack([s[f"{mlp}.down_proj.weight"] for s in mlps])
    return out


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    num_experts: int
    bytes_written: int


def build_moe(
    base_dir: str | Path,
    experts: Sequence[ExpertSource],
    out_dir: str | Path,
    params: BuildParams | None = None,
) -> BuildResult:
    """Assemble and write the MoE folder (atomically; nothing is written on a ``MoeError``)."""
    from transformers import AutoModelForCausalLM

    params = params or BuildParams()
    base_path, out = Path(base_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MoeError(f"output folder '{out}' is not empty")
    if len(experts) < 2:
        raise MoeError(f"an MoE needs at least 2 experts; got {len(experts)}")
    base = _load(base_path)
    _check_dense(base, base_path, None)
    architecture = pick_architecture(params.architecture, params.shared_expert)
    config = moe_config(base.config, architecture, len(experts), params.experts_per_token)
    mlps, shared = expert_states(base, experts, params.shared_weights == "average")
    gates = gate_weights(base, experts, params, config.num_hidden_layers)
    state = moe_state(mlps, shared, gates)
    if architecture == "qwen2_moe":
        source = params.shared_expert
        mlp = None if source == "none" else shared_mlp(base.state_dict(), mlps, source)
        add_shared_expert(state, mlp, config.num_hidden_layers, params.shared_expert_weight)
    moe = AutoModelForCausalLM.from_config(config)
    moe.load_state_dict(state, strict=True)
    _write(moe, base_path, out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return BuildResult(out, len(experts), size)


def _write(model: Any, base_path: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        staged = Path(scratch) / "model"
        model.save_pretrained(staged)
        for name in _COPIED:
            if (base_path / name).is_file():
                shutil.copy(base_path / name, staged / name)
        if out.exists():
            out.rmdir()
        shutil.move(str(staged), out)
