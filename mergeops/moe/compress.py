"""Fewer experts per MoE layer: MC-SMoE, Sub-MoE, or naive averaging of neighbouring experts.

``compress_moe`` runs the model (transformers) on calibration inputs, records each MoE layer's
input tokens with forward pre-hooks, derives routing frequency, router logits and expert outputs
from them, merges N experts into M per layer (math in ``mergeops.ops.moe``), keeps the router rows
of the merged experts' leaders and writes a folder that ``AutoModelForCausalLM.from_pretrained``
loads, with config.json's expert count updated. Papers: MC-SMoE https://arxiv.org/abs/2310.01334,
Sub-MoE https://arxiv.org/abs/2506.23266.

Not an engine method: the engine's hooks see one tensor at a time, and these need the whole layer
and the model's forward pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from mergeops.moe import factored
from mergeops.moe.experts import MoeError, read_experts, router_name, write_experts
from mergeops.moe.layout import EXPERT_COUNT_KEYS, MoeLayout, detect_moe
from mergeops.moe.stats import collect_layer_inputs, safetensors_shapes
from mergeops.ops import moe as ops

Method = Literal["mc_smoe", "sub_moe", "average"]


class CompressParams(BaseModel):
    """How to shrink each MoE layer to ``num_experts`` experts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: Method
    num_experts: int = Field(ge=1)
    align: bool = True  # permute neurons onto the group leader before merging
    # mc_smoe leaders: the most used experts (the paper), or "diverse": the most used, then
    # farthest-point on mean-centred router-logit similarity (twins never both lead)
    leaders: Literal["frequency", "diverse"] = "frequency"
    rank: int | None = Field(default=None, ge=1)  # sub_moe: rank r of the shared basis
    low_rank: int | None = Field(default=None, ge=1)  # mc_smoe: low-rank + sparse compression
    sparse_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    # sub_moe: keep each merged expert as its two SVD factors (ckreg's own layout, see
    # ``mergeops.moe.factored``; ``materialize`` makes it loadable)
    factored: bool = False


@dataclass(frozen=True)
class CompressResult:
    out_dir: Path
    experts_before: int
    experts_after: int
    groups: dict[int, list[list[int]]]
    bytes_before: int
    bytes_after: int


def _check_groups(config: Any, num_experts: int) -> None:
    """DeepSeek-style group-limited routing needs n_group | M, with at least 2 experts a group."""
    n_group = getattr(config, "n_group", None) or 1
    if n_group > 1 and (num_experts % n_group or num_experts // n_group < 2):
        raise MoeError(
            f"num_experts={num_experts} does not split into the config's n_group={n_group} "
            "routing groups of at least 2 experts each"
        )


def _check_plan(layout: MoeLayout, params: CompressParams, top_k: int) -> None:
    if params.factored and (params.method != "sub_moe" or params.rank is None):
        raise MoeError(
            f"factored=True needs method 'sub_moe' and a rank; got method '{params.method}', "
            f"rank {params.rank}"
        )
    for layer in layout.layers:
        router_name(layer)
        n, m = layer.num_experts, params.num_experts
        if m >= n:
            raise MoeError(
                f"MoE layer {layer.index} ('{layer.prefix}') has {n} experts; num_experts={m} must be fewer"
            )
        if params.method != "mc_smoe" and n % m:
            raise MoeError(
                f"{params.method} makes equal groups: {n} experts of layer {layer.index} ('{layer.prefix}') "
                f"do not divide into num_experts={m}"
            )
        if m < top_k:
            raise MoeError(
                f"num_experts={m} is fewer than the {top_k} experts each token uses (num_experts_per_tok)"
            )


def _groups(
    params: CompressParams,
    experts: list[ops.Expert],
    logits: torch.Tensor,
    inputs: torch.Tensor,
    frequency: torch.Tensor,
    act: Any,
) -> list[list[int]]:
    n, m = len(experts), params.num_experts
    if params.method == "average":
        size = n // m
        return [list(range(g * size, (g + 1) * size)) for g in range(m)]
    if params.method == "mc_smoe" and params.leaders == "diverse":
        similarity = ops.centered_cosine_matrix(logits.T)
        return ops.group_around(ops.farthest_leaders(frequency, similarity, m), similarity)
    if params.method == "mc_smoe":
        return ops.group_by_dominant(frequency, ops.cosine_matrix(logits.T), m)
    outputs = torch.stack([ops.expert_output(e, inputs, act).flatten() for e in experts])
    return ops.group_balanced(frequency, ops.centered_cosine_matrix(outputs), m)


def _merge_group(params: CompressParams, members: list[ops.Expert], frequency: torch.Tensor) -> Any:
    """The merged expert: ``{"gate", "up", "down"}`` tensors, or their factor pairs."""
    if params.method == "average":
        return ops.weighted_merge(members, torch.ones(len(members)))
    if params.align:
        members = [members[0]] + [ops.align_to(members[0], e) for e in members[1:]]
    if params.factored:
        return ops.sub_moe_factors(members, frequency, params.rank)
    if params.method == "sub_moe":
        return ops.sub_moe_merge(members, frequency, params.rank)
    merged = ops.weighted_merge(members, frequency)
    if params.low_rank is not None:
        merged = {
            p: ops.low_rank_plus_sparse(w, params.low_rank, params.sparse_fraction)
            for p, w in merged.items()
        }
    return merged


def routing_scores(
    router: dict[str, torch.Tensor], weight: str, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits, scores the top-k is taken on): the logits, or for DeepSeek-V3-style routers
    with an ``e_score_correction_bias`` sigmoid(logits) + bias."""
    logits = inputs @ router[weight].float().T
    bias = next((t for n, t in router.items() if n.endswith("e_score_correction_bias")), None)
    return logits, logits if bias is None else logits.sigmoid() + bias.float()


def merge_router(
    router: dict[str, torch.Tensor], groups: list[list[int]], average: bool
) -> dict[str, torch.Tensor]:
    """Each per-expert router tensor cut to one row per group: the leader's (or the group mean)."""
    out = {}
    for name, tensor in router.items():
        if average:
            out[name] = torch.stack([tensor.float()[g].mean(dim=0) for g in groups])
        else:
            out[name] = tensor.float()[[g[0] for g in groups]]
    return out


def merge_layer(
    params: CompressParams,
    experts: list[ops.Expert],
    router: dict[str, torch.Tensor],
    weight: str,
    inputs: torch.Tensor,
    top_k: int,
    act: Any,
) -> tuple[list[Any], dict[str, torch.Tensor], list[list[int]]]:
    """One layer's merged experts (dense, or factor pairs when ``factored``), its router tensors
    cut to the groups, and the groups."""
    logits, choice = routing_scores(router, weight, inputs)
    frequency = ops.routing_frequency(choice, top_k)
    groups = _groups(params, experts, logits, inputs, frequency, act)
    merged = [_merge_group(params, [experts[i] for i in g], frequency[g]) for g in groups]
    return merged, merge_router(router, groups, params.method == "average"), groups


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _expert_count_key(config: Any) -> str:
    for key in EXPERT_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key
    raise MoeError(
        f"config of model_type '{config.model_type}' names no expert count ({', '.join(EXPERT_COUNT_KEYS)})"
    )


def compress_moe(
    model_dir: str | Path,
    out_dir: str | Path,
    method: Method,
    num_experts: int,
    calibration: Sequence[torch.Tensor],
    *,
    progress: bool = True,
    **options: Any,
) -> CompressResult:
    """Merge each MoE layer's experts down to ``num_experts``; writes a loadable model folder.

    ``calibration`` is a list of token-id tensors (1-D or (batch, seq)). ``options``: ``align``,
    ``rank`` and ``factored`` (sub_moe; a factored folder is ckreg's own layout, see
    ``mergeops.moe.factored``), ``leaders``, ``low_rank`` and ``sparse_fraction`` (mc_smoe). Raises ``MoeError`` for a
    dense model, a missing router or expert counts that do not fit; nothing is written then.
    """
    from transformers import AutoModelForCausalLM
    from transformers.activations import ACT2FN

    params = CompressParams(method=method, num_experts=num_experts, **options)
    source, out = Path(model_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MoeError(f"output folder '{out}' is not empty")
    if factored.is_factored(source):
        raise MoeError(f"'{source}' holds factored experts; materialize it first")
    disk = detect_moe(
        safetensors_shapes(source), config=json.loads((source / "config.json").read_text())
    )
    if disk is None:
        raise MoeError(f"'{source}' is a dense model: no expert tensors (…experts.E.*) found")
    if not calibration:
        raise MoeError("calibration holds no inputs; routing statistics need at least one")
    # kept in the checkpoint's dtype; each layer's merge computes in float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
    _check_plan(disk, params, top_k)
    _check_groups(model.config, params.num_experts)
    state = dict(model.state_dict())
    layout = detect_moe({k: list(v.shape) for k, v in state.items()})
    assert layout is not None  # the files were MoE, so is the model loaded from them
    inputs = collect_layer_inputs(model, [layer.prefix for layer in layout.layers], calibration)
    act = ACT2FN[model.config.hidden_act]
    groups: dict[int, list[list[int]]] = {}
    for layer in tqdm(layout.layers, desc=f"{method}: layers", disable=not progress, leave=False):
        router = {name: state[name] for name in layer.router}
        merged, new_router, groups[layer.index] = merge_layer(
            params,
            read_experts(state, layer),
            router,
            router_name(layer),
            inputs[layer.prefix],
            top_k,
            act,
        )
        if params.factored:
            factored.replace_with_factors(state, layer, merged, new_router)
        else:
            write_experts(state, layer, merged, new_router)
    setattr(model.config, _expert_count_key(model.config), params.num_experts)
    if params.factored:
        manifest = {"method": method, "rank": params.rank, "source_experts": disk.num_experts}
        factored.write_factored(state, model.config, out, manifest)
    else:
        _save(type(model)(model.config).to(model.dtype), state, out)
    return CompressResult(
        out, disk.layers[0].num_experts, params.num_experts, groups, _bytes(source), _bytes(out)
    )


def _save(model: Any, state: dict[str, torch.Tensor], out: Path) -> None:
    """Load ``state`` strictly into the resized model and write it, atomically."""
    model.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        staged = Path(scratch) / "model"
        model.save_pretrained(staged)
        if out.exists():
            out.rmdir()
        shutil.move(str(staged), out)
