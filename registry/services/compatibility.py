"""Base compatibility: a checkpoint's tensors must fit the base it declares.

Full fine-tunes and merged checkpoints: every tensor exists in the base with the same shape; a
fine-tune's tensors also keep the base's dtype (a change would otherwise surface only at merge
time; merged outputs may be written in another dtype on request).
Adapters (PEFT LoRA) are checked loosely: for each ``<module>.lora_A/.lora_B`` pair whose base
weight ``<module>.weight`` can be found, ``lora_A`` is ``(r, in)`` and ``lora_B`` is ``(out, r)``
with ``(out, in)`` the base weight's shape; modules not found in the base are skipped, since
PEFT naming varies between model families.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from sqlmodel import Session

from registry.errors import BaseMismatch
from registry.models import Checkpoint, CheckpointKind, CheckpointStatus
from registry.safetensors_check import SafetensorsHeader
from registry.services.common import checkpoint_files, load_checkpoint

MAX_REPORTED = 5
_LORA = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$"
)

Shapes = dict[str, tuple[int, ...]]


def tensor_shapes(session: Session, base: Checkpoint) -> Shapes:
    """Tensor name -> shape of a ready checkpoint's weights, from the index kept on its files."""
    shapes: Shapes = {}
    for artifact in checkpoint_files(session, base.id or 0):
        for tensor, entry in artifact.tensor_index.items():
            shapes[tensor] = tuple(entry["shape"])
    return shapes


def tensor_dtypes(session: Session, base: Checkpoint) -> dict[str, str]:
    """Tensor name -> safetensors dtype (``F32``, ``BF16``, ...) of a ready checkpoint's weights."""
    return {
        tensor: str(entry["dtype"])
        for artifact in checkpoint_files(session, base.id or 0)
        for tensor, entry in artifact.tensor_index.items()
    }


def _full_mismatches(
    headers: Mapping[str, SafetensorsHeader], base: Shapes, dtypes: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for file, header in headers.items():
        for tensor, entry in header.tensors.items():
            if tensor not in base:
                found.append((file, tensor, "missing in base"))
            elif tuple(entry.shape) != base[tensor]:
                found.append((file, tensor, f"shape {tuple(entry.shape)} vs base {base[tensor]}"))
            elif tensor in dtypes and entry.dtype != dtypes[tensor]:
                found.append((file, tensor, f"dtype {entry.dtype} vs base {dtypes[tensor]}"))
    return found


def _adapter_mismatches(
    headers: Mapping[str, SafetensorsHeader], base: Shapes
) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for file, header in headers.items():
        for tensor, entry in header.tensors.items():
            match = _LORA.match(tensor)
            target = base.get(f"{match['module']}.weight") if match else None
            if match is None or target is None or len(target) != 2 or len(entry.shape) != 2:
                continue
            out_features, in_features = target
            if match["part"] == "A" and entry.shape[1] != in_features:
                found.append(
                    (
                        file,
                        tensor,
                        f"lora_A shape {tuple(entry.shape)} needs {in_features} columns (base {target})",
                    )
                )
            if match["part"] == "B" and entry.shape[0] != out_features:
                found.append(
                    (
                        file,
                        tensor,
                        f"lora_B shape {tuple(entry.shape)} needs {out_features} rows (base {target})",
                    )
                )
    return found


def _raise(
    checkpoint: Checkpoint, base: Checkpoint, mismatches: Sequence[tuple[str, str, str]]
) -> None:
    shown = "; ".join(f"file '{f}', tensor '{t}': {why}" for f, t, why in mismatches[:MAX_REPORTED])
    file, tensor, _ = mismatches[0]
    raise BaseMismatch(
        f"checkpoint '{checkpoint.name}' does not fit base {base.id} '{base.name}': "
        f"{len(mismatches)} mismatching tensors, first: {shown}",
        file=file,
        tensor=tensor,
    )


def check_base_compatibility(
    *, session: Session, checkpoint: Checkpoint, headers: Mapping[str, SafetensorsHeader]
) -> None:
    """Raise ``BaseMismatch`` listing the first mismatching tensors; no-op without a base."""
    if checkpoint.base_id is None:
        return
    base = load_checkpoint(session, checkpoint.base_id)
    if base.status != CheckpointStatus.ready:
        raise BaseMismatch(f"base checkpoint {base.id} '{base.name}' is {base.status}, not ready")
    shapes = tensor_shapes(session, base)
    if checkpoint.kind == CheckpointKind.adapter:
        mismatches = _adapter_mismatches(headers, shapes)
    else:
        # Merged outputs may be written in another dtype on request (mergekit's ``dtype``).
        dtypes = tensor_dtypes(session, base) if checkpoint.kind == CheckpointKind.finetune else {}
        mismatches = _full_mismatches(headers, shapes, dtypes)
    if mismatches:
        _raise(checkpoint, base, mismatches)
