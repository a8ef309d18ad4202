"""Family compression with TALL masks (arXiv 2405.07813): checks, tensor math and storage.

A family is T ready fine-tunes of one base. Its stored form is ONE multi-task vector
``τ_MTL = Σ_t (θ_t - θ0)`` (an artifact of the base checkpoint, role ``task_vector``) plus ONE
bit-packed mask per member (role ``mask``); each member's file row is then served by the lossy
``tall`` codec (``registry.storage.tall_codec``) as ``θ0 + m_t ⊙ τ_MTL``. Choosing λ and deciding
whether to replace the originals is the flow's work (it needs an evaluator); this module only
checks a family, builds its tensors and stores them (``registry.services.family_store``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from sqlmodel import Session

from mergeops.ops.masks import tall_mask
from registry.errors import InvalidInput, InvalidState
from registry.models import Artifact, ArtifactRole, Checkpoint
from registry.safetensors_check import TORCH_DTYPES
from registry.services.common import checkpoint_files, load_checkpoint, load_ready_checkpoint
from registry.services.tensors import checkpoint_tensor_source
from registry.storage import ObjectStore
from registry.storage.tall_codec import CODEC, rebuild_tensor

StateDict = dict[str, torch.Tensor]
LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)  # the paper's λ grid


@dataclass(frozen=True)
class FamilyMember:
    """One fine-tune of the family."""

    checkpoint_id: int
    name: str
    task: str | None
    size: int  # bytes of its weights files


@dataclass(frozen=True)
class Family:
    """A checked family: the base, its weights files (name -> tensor names) and the members."""

    base_id: int
    base_name: str
    files: Mapping[str, tuple[str, ...]]
    members: tuple[FamilyMember, ...]

    @property
    def original_bytes(self) -> int:
        return sum(member.size for member in self.members)


def weight_files(session: Session, checkpoint_id: int) -> list[Artifact]:
    """A checkpoint's safetensors weights files, by name."""
    return [
        row for row in checkpoint_files(session, checkpoint_id) if row.role == ArtifactRole.weights
    ]


def _layout(rows: Sequence[Artifact]) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """file name -> tensor name -> (dtype, shape), from the stored tensor indexes."""
    return {
        row.name: {t: (e["dtype"], tuple(e["shape"])) for t, e in row.tensor_index.items()}
        for row in rows
    }


def _check_member(
    session: Session, member_id: int, base: Checkpoint, expected: dict
) -> FamilyMember:
    checkpoint = load_ready_checkpoint(session, member_id)
    label = f"checkpoint {member_id} '{checkpoint.name}'"
    if member_id == base.id:
        raise InvalidInput(f"{label} is the family's base; list only its fine-tunes")
    if checkpoint.base_id != base.id:
        raise InvalidInput(
            f"{label} has base {checkpoint.base_id}, not the family's base {base.id} '{base.name}'"
        )
    rows = weight_files(session, member_id)
    if any(row.codec == CODEC for row in rows):
        raise InvalidState(f"{label} is already stored in family (tall) form")
    layout = _layout(rows)
    if set(layout) != set(expected):
        raise InvalidInput(
            f"{label} has weights files {sorted(layout)}, the base has {sorted(expected)}"
        )
    for file_name, tensors in expected.items():
        for tensor, (_, shape) in tensors.items():
            found = layout[file_name].get(tensor)
            if found is None or found[1] != shape:
                raise InvalidInput(
                    f"{label}, file '{file_name}', tensor '{tensor}': "
                    f"{'missing' if found is None else f'shape {found[1]}'}, the base has {shape}"
                )
        extra = sorted(set(layout[file_name]) - set(tensors))
        if extra:
            raise InvalidInput(f"{label}, file '{file_name}': tensors {extra} are not in the base")
    return FamilyMember(member_id, checkpoint.name, checkpoint.task, sum(r.size for r in rows))


def check_family(*, session: Session, base_id: int, member_ids: Sequence[int]) -> Family:
    """The family of ``member_ids`` over ``base_id``; raises naming the first bad member.

    Needs at least two distinct ready fine-tunes whose base is ``base_id`` and whose weights
    files hold the base's tensors with the base's shapes.
    """
    if len(set(member_ids)) != len(member_ids):
        raise InvalidInput(f"task vectors list a checkpoint twice: {list(member_ids)}")
    if len(member_ids) < 2:
        raise InvalidInput(
            f"family compression needs at least 2 fine-tunes of one base, got {list(member_ids)}"
        )
    base = load_ready_checkpoint(session, base_id)
    base_rows = weight_files(session, base_id)
    if not base_rows:
        raise InvalidInput(f"base checkpoint {base_id} '{base.name}' has no safetensors weights")
    expected = _layout(base_rows)
    members = tuple(_check_member(session, m, base, expected) for m in member_ids)
    files = {name: tuple(tensors) for name, tensors in expected.items()}
    return Family(base_id, base.name, files, members)


def load_state(*, session: Session, store: ObjectStore, checkpoint_id: int) -> StateDict:
    """Every weight tensor of a checkpoint in its stored dtype (range-read through codecs)."""
    load_checkpoint(session, checkpoint_id)
    source = checkpoint_tensor_source(session=session, store=store, checkpoint_id=checkpoint_id)
    names = list(source.keys())  # a TensorSource, not a dict
    return {key: source.get(key) for key in names}


# ---- tensor math (pure) ----------------------------------------------------------------------


def maskable(tensor: torch.Tensor) -> bool:
    """Floating tensors get a mask; integer buffers are taken from the base unchanged."""
    return tensor.is_floating_point()


def multitask_vector(base: StateDict, members: Iterable[StateDict]) -> StateDict:
    """``τ_MTL = Σ_t (θ_t - θ0)`` per floating tensor, summed in float32 and kept in the
    members' dtype; ``members`` is read once (one member in memory at a time). Integer tensors
    must equal the base's in every member."""
    totals = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in base.items() if maskable(v)}
    dtypes: dict[str, torch.dtype] = {}
    for index, member in enumerate(members):
        for key, theta0 in base.items():
            if key in totals:
                totals[key] += member[key].float() - theta0.float()
                dtypes[key] = member[key].dtype
            elif not torch.equal(member[key], theta0):
                raise InvalidInput(
                    f"tensor '{key}' ({theta0.dtype}) of family member #{index + 1} differs "
                    "from the base; only floating tensors can be family-compressed"
                )
    return {key: total.to(dtypes.get(key, torch.float32)) for key, total in totals.items()}


def tall_masks(
    base: StateDict, member: StateDict, merged: StateDict, lam: float
) -> dict[str, torch.Tensor]:
    """The member's mask ``m_t = [|τ_t| > λ·|τ_MTL - τ_t|]`` for every merged tensor."""
    return {
        key: tall_mask(member[key].float() - base[key].float(), merged[key], lam) for key in merged
    }


def rebuild_state(
    base: StateDict, merged: StateDict, masks: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]
) -> StateDict:
    """The member as the ``tall`` codec serves it: ``θ0 + m ⊙ τ_MTL`` in the member's dtypes."""
    return {
        key: rebuild_tensor(theta0, merged.get(key), masks.get(key), TORCH_DTYPES[dtypes[key]])
        for key, theta0 in base.items()
    }


def state_dtypes(state: StateDict) -> dict[str, str]:
    """Safetensors dtype names of a state dict's tensors."""
    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    return {key: names[tensor.dtype] for key, tensor in state.items()}
