"""Sub-MoE's factored form on disk (ckreg's own layout), and ``materialize`` back to dense experts.

``compress_moe(..., method="sub_moe", rank=r, factored=True)`` keeps each merged expert's
projections as the two factors of Sub-MoE's joint SVD (https://arxiv.org/abs/2506.23266):
``W_m = (U_r S_r) V_mᵀ``, stored as ``<moe block>.experts.<e>.<gate|up|down>_proj.factor_a``
(d_out, r) and ``.factor_b`` (r, d_in): ``r (d_out + d_in)`` numbers instead of ``d_out d_in``.
No transformers architecture loads factored experts (its MoE blocks hold dense ``gate_up_proj`` /
``down_proj``; given the factors, ``from_pretrained`` ignores them and initialises the experts at
random), so such a folder is deliberately not a ``from_pretrained`` model: it has no
``config.json`` but ``ckreg_moe_config.json`` (the MoE config with M experts), ``model.safetensors``
(every other tensor under transformers' in-memory names, plus the factors) and
``ckreg_moe_factored.json`` (format and rank).
``materialize`` multiplies the factors out and writes a folder ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mergeops.moe.experts import MoeError, router_name, write_experts
from mergeops.moe.layout import MoeLayer, detect_moe

FORMAT = "ckreg-moe-factored/1"
MANIFEST = "ckreg_moe_factored.json"
WEIGHTS = "model.safetensors"
CONFIG = "ckreg_moe_config.json"  # not config.json: from_pretrained must refuse the folder
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # gate|up|down -> (A, B)
_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def factor_names(prefix: str, expert: int, proj: str) -> tuple[str, str]:
    """The two tensor names of one factored projection."""
    base = f"{prefix}.experts.{expert}.{_PROJ[proj]}"
    return f"{base}.factor_a", f"{base}.factor_b"


def is_factored(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def replace_with_factors(
    state: dict[str, torch.Tensor],
    layer: MoeLayer,
    experts: Sequence[Factors],
    router: Mapping[str, torch.Tensor],
) -> None:
    """Drop the layer's dense experts from ``state``; put in the router and each merged expert's
    factors (in the experts' dtype)."""
    router_name(layer)
    dense = list(layer.fused_tensors) + [n for ns in layer.expert_tensors.values() for n in ns]
    dtype = state[dense[0]].dtype
    for name in dense:
        del state[name]
    for name, tensor in router.items():
        state[name] = tensor.to(state[name].dtype)
    for index, factors in enumerate(experts):
        for proj, (left, right) in factors.items():
            a, b = factor_names(layer.prefix, index, proj)
            state[a], state[b] = left.to(dtype).contiguous(), right.to(dtype).contiguous()


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data starts: equal for tensors that share storage (tied weights)."""
    return tensor.untyped_storage().data_ptr(), int(tensor.storage_offset())


def _untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the later names of tensors that share storage (tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        key = _storage(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def write_factored(
    state: Mapping[str, torch.Tensor], config: Any, out: Path, manifest: dict[str, Any]
) -> None:
    """Write the factored folder atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        staged = Path(scratch) / "model"
        staged.mkdir()
        save_file(_untied(state), str(staged / WEIGHTS), metadata={"format": "pt"})
        config.to_json_file(str(staged / CONFIG))
        (staged / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2))
        if out.exists():
            out.rmdir()
        shutil.move(str(staged), out)


def _expert_factors(
    tensors: Mapping[str, torch.Tensor], layer: MoeLayer, count: int
) -> list[dict[str, torch.Tensor]]:
    experts = []
    for index in range(count):
        expert = {}
        for proj in _PROJ:
            a, b = factor_names(layer.prefix, index, proj)
            if a not in tensors or b not in tensors:
                raise MoeError(f"factored MoE is missing tensor '{a if a not in tensors else b}'")
            expert[proj] = tensors[a].float() @ tensors[b].float()
        experts.append(expert)
    return experts


def _fill(state: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of ``state`` the file holds, tied names (one storage) from whichever is kept."""
    tied: dict[tuple[int, int], list[str]] = {}
    for name, tensor in state.items():
        tied.setdefault(_storage(tensor), []).append(name)
    for names in tied.values():
        kept = [n for n in names if n in tensors]
        for name in names if kept else ():
            state[name] = tensors[name] if name in tensors else tensors[kept[0]]


def materialize(source: str | Path, out: str | Path) -> Path:
    """Multiply a factored folder's experts out into a ``from_pretrained``-loadable folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dst = Path(source), Path(out)
    if not is_factored(src):
        raise MoeError(f"'{src}' is not a factored MoE folder (no '{MANIFEST}')")
    manifest = json.loads((src / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise MoeError(f"'{src / MANIFEST}' has format {manifest.get('format')!r}; need {FORMAT!r}")
    if dst.exists() and any(dst.iterdir()):
        raise MoeError(f"output folder '{dst}' is not empty")
    tensors = load_file(str(src / WEIGHTS))
    values = json.loads((src / CONFIG).read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config)
    state = dict(model.state_dict())
    layout = detect_moe({k: list(v.shape) for k, v in state.items()})
    if layout is None:
        raise MoeError(f"'{src / CONFIG}' describes a dense model")
    _fill(state, tensors)
    for layer in layout.layers:
        experts = _expert_factors(tensors, layer, layer.num_experts)
        write_experts(state, layer, experts, {})
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    model.to(dtype).load_state_dict(state, strict=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}-") as scratch:
        staged = Path(scratch) / "model"
        model.save_pretrained(staged)
        if dst.exists():
            dst.rmdir()
        shutil.move(str(staged), dst)
    return dst
