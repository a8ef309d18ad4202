"""Client-side capture of Adam second moments (``exp_avg_sq``) as a safetensors artifact
(and, re-exported from ``capture_gram``, of layer-input Grams: ``capture_gram``).

The registry stores them as a ``second_moment`` artifact keyed by parameter name, so merge
methods that weight by curvature can use them. Nothing here runs on the server.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.client.capture_gram import GramRecorder, capture_gram
from registry.client.layouts import LayoutError

__all__ = [
    "CaptureError",
    "GramRecorder",
    "UnsafeOptimizerFile",
    "capture_gram",
    "capture_second_moments",
]

# torch is imported where it is used: the ``ckreg`` commands that never touch tensors start fast.
if TYPE_CHECKING:
    import torch


class CaptureError(LayoutError):
    """The optimizer state cannot be turned into second moments; names the parameters at fault."""


class UnsafeOptimizerFile(CaptureError, pickle.UnpicklingError):
    """``torch.load(weights_only=True)`` refused the file: it holds more than tensors."""


def capture_second_moments(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path | str
) -> Path:
    """Write Adam's ``exp_avg_sq`` of every parameter of ``model`` to ``path``; returns the path.

    Parameters are matched to optimizer state by identity, keyed by ``model.named_parameters()``
    names. Raises ``CaptureError`` naming the parameters that have no ``exp_avg_sq`` yet
    (e.g. before the first ``optimizer.step()``, or frozen parameters).
    """
    moments: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter, {})
        if "exp_avg_sq" in state:
            moments[name] = state["exp_avg_sq"]
        elif parameter.requires_grad:
            missing.append(name)
    if missing:
        raise CaptureError(
            f"no optimizer state 'exp_avg_sq' for parameters {missing}; "
            "run optimizer.step() first and use an Adam-family optimizer"
        )
    return write_second_moments(moments, path)


def second_moments_from_optimizer_file(
    path: Path | str, param_names: Sequence[str] | Mapping[int, str]
) -> dict[str, torch.Tensor]:
    """Read ``exp_avg_sq`` tensors from a saved optimizer ``state_dict`` (e.g. HF ``optimizer.pt``).

    The file is loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
    ``param_names[i]`` names the optimizer's parameter index ``i`` -- the order of the params in
    ``optimizer.param_groups`` flattened, which is NOT always ``model.named_parameters()`` order
    (HF Trainer groups decay / no-decay parameters). A mapping index -> name is also accepted.
    """
    state_dict = load_optimizer_state(path)
    names = dict(param_names) if isinstance(param_names, Mapping) else dict(enumerate(param_names))
    indices = _param_indices(state_dict)
    if indices and len(indices) != len(names):
        raise CaptureError(
            f"'{path}' holds {len(indices)} optimizer parameters but {len(names)} parameter names were given"
        )
    return moments_by_name(state_dict, names, path)


def load_optimizer_state(path: Path | str) -> dict[str, Any]:
    """A saved optimizer ``state_dict``, read with ``torch.load(weights_only=True)``."""
    import torch

    try:
        try:  # mapped, not read: only the exp_avg_sq tensors are ever touched
            state_dict = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            state_dict = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeOptimizerFile(f"'{path}' was not loaded: {exc}") from exc
    except (RuntimeError, EOFError) as exc:
        raise CaptureError(f"'{path}' cannot be read as an optimizer state_dict: {exc}") from exc
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise CaptureError(f"'{path}' is not an optimizer state_dict (no 'state' key)")
    return state_dict


def moments_by_name(
    state_dict: dict[str, Any], names: Mapping[int, str], path: Path | str
) -> dict[str, torch.Tensor]:
    """``{names[i]: exp_avg_sq of parameter i}``; ``CaptureError`` naming a parameter without one."""
    moments: dict[str, torch.Tensor] = {}
    for index, name in names.items():
        state = state_dict["state"].get(index, {})
        if "exp_avg_sq" not in state:
            raise CaptureError(f"'{path}': no 'exp_avg_sq' for parameter {index} ('{name}')")
        moments[name] = state["exp_avg_sq"]
    return moments


def write_second_moments(moments: Mapping[str, torch.Tensor], path: Path | str) -> Path:
    """Save second moments as safetensors (detached, contiguous copies); returns the path."""
    from mergeops.io import write_safetensors

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in moments.items()
    }
    write_safetensors(target, tensors, {"ckreg.role": "second_moment"})
    return target


def _param_indices(state_dict: dict[str, Any]) -> list[int]:
    groups = state_dict.get("param_groups") or []
    return [index for group in groups for index in group.get("params", [])]
