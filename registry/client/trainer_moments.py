"""Adam second moments from a Hugging Face Trainer folder's ``optimizer.pt``, with no user code.

A saved optimizer ``state_dict`` keys its state by integer parameter index: the order of the
parameters in ``param_groups``. ``transformers.Trainer`` builds two groups from the model's
trainable ``named_parameters()``: those that get weight decay (``Trainer.get_decay_parameter_names``)
then those that do not. The names are recovered by instantiating the architecture named in
``config.json`` on the meta device (no weights, no download), trying that layout and the plain
one-group order, and keeping the one whose group sizes and every tensor shape match.
Client side only; the file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.client.capture import (
    CaptureError,
    load_optimizer_state,
    moments_by_name,
    second_moments_from_optimizer_file,
    write_second_moments,
)
from registry.client.layouts import CONFIG_FILE, UploadPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("registry.client")


class UnknownArchitecture(CaptureError):
    """``config.json`` does not name a ``transformers`` architecture: no names to give."""


Layout = list[list[tuple[str, tuple[int, ...]]]]  # groups of (parameter name, shape)


def trainer_second_moments(folder: Path, optimizer_file: Path) -> dict[str, torch.Tensor]:
    """``{parameter name: exp_avg_sq}`` of a Trainer checkpoint folder (``config.json`` + optimizer).

    Raises ``CaptureError`` naming the file, the parameter and the shapes when no layout fits.
    """
    state_dict = load_optimizer_state(optimizer_file)
    sizes = [len(group.get("params", [])) for group in state_dict.get("param_groups", [])]
    indices = [i for group in state_dict["param_groups"] for i in group.get("params", [])]
    problems = []
    for label, groups in candidate_layouts(folder):
        if [len(g) for g in groups] != sizes:
            problems.append(f"{label}: groups of {[len(g) for g in groups]} parameters")
            continue
        flat = [entry for group in groups for entry in group]
        mismatch = _shape_mismatch(state_dict, indices, flat)
        if mismatch is None:
            names = {index: name for index, (name, _) in zip(indices, flat, strict=True)}
            return moments_by_name(state_dict, names, optimizer_file)
        problems.append(f"{label}: {mismatch}")
    raise CaptureError(
        f"'{optimizer_file}' holds param groups of {sizes} parameters that match no layout of "
        f"the model in '{folder / 'config.json'}' ({'; '.join(problems)}); pass the names in "
        "optimizer order (Client.register(optimizer_param_names=...)), give --second-moment, or "
        "move optimizer.pt out of the folder to register without second moments"
    )


def candidate_layouts(folder: Path) -> list[tuple[str, Layout]]:
    """The Trainer's decay / no-decay split, then all trainable parameters as one group."""
    model = meta_model(folder)
    trainable = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    decay = set(_decay_names(model))
    split = [[e for e in trainable if e[0] in decay], [e for e in trainable if e[0] not in decay]]
    return [("Trainer decay/no-decay groups", split), ("one group", [trainable])]


def meta_model(folder: Path) -> torch.nn.Module:
    """The architecture of ``folder/config.json`` built on the meta device (no memory, no hub)."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UnknownArchitecture(f"cannot read '{folder / 'config.json'}': {exc}") from exc
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise UnknownArchitecture(
            f"'{folder / 'config.json'}' names no architecture transformers knows "
            f"(architectures={architectures}); cannot name the optimizer's parameters"
        )
    with torch.device("meta"):
        return model_class(config)  # type: ignore[no-any-return]


def _decay_names(model: torch.nn.Module) -> list[str]:
    from transformers import Trainer

    # The method reads nothing from the Trainer instance: the names come from the model alone.
    return list(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def _shape_mismatch(
    state_dict: dict[str, Any], indices: Sequence[int], flat: Sequence[tuple[str, tuple[int, ...]]]
) -> str | None:
    for index, (name, shape) in zip(indices, flat, strict=True):
        moment = state_dict["state"].get(index, {}).get("exp_avg_sq")
        if moment is None:
            return f"no 'exp_avg_sq' for parameter {index} ('{name}')"
        if tuple(moment.shape) != shape:
            return f"parameter {index} '{name}' has shape {shape}, exp_avg_sq {tuple(moment.shape)}"
    return None


def side_artifacts(
    plan: UploadPlan,
    *,
    second_moment: Path | str | None,
    optimizer_param_names: Sequence[str] | None,
    work_dir: Path,
) -> list[tuple[str, Path]]:
    """``(role, path)`` of the tensor artifacts to upload with ``plan``'s checkpoint.

    Second moments come from, in this order: ``second_moment``; the folder's own
    ``second_moment.safetensors``; its ``optimizer.pt`` named by ``optimizer_param_names``, or
    else through ``config.json`` (full models; an adapter's optimizer needs the names). Files
    are written under ``work_dir``; a file that cannot be converted raises ``CaptureError``
    before anything is uploaded.
    """
    found = dict(plan.artifacts)
    moments = Path(second_moment) if second_moment is not None else found.get("second_moment")
    if moments is None and plan.optimizer_file is not None:
        tensors = _optimizer_moments(plan, optimizer_param_names)
        if tensors is not None:
            moments = write_second_moments(tensors, work_dir / "second_moment.safetensors")
    others = [(role, path) for role, path in plan.artifacts if role != "second_moment"]
    return ([("second_moment", moments)] if moments is not None else []) + others


def _optimizer_moments(
    plan: UploadPlan, names: Sequence[str] | None
) -> dict[str, torch.Tensor] | None:
    assert plan.optimizer_file is not None and plan.directory is not None
    if names is not None:
        return second_moments_from_optimizer_file(plan.optimizer_file, names)
    if plan.kind == "adapter" or not (plan.directory / CONFIG_FILE).is_file():
        why = "an adapter" if plan.kind == "adapter" else f"no {CONFIG_FILE} names its parameters"
        log.warning(
            "optimizer.pt not converted to second moments (%s); pass optimizer_param_names", why
        )
        return None
    try:
        return trainer_second_moments(plan.directory, plan.optimizer_file)
    except UnknownArchitecture as exc:
        log.warning("optimizer.pt not converted to second moments: %s", exc)
        return None
