"""Binary masks: FFG saliency masks, TALL/consensus masks, exact global thresholds, bit-packing.

Pure tensor functions. A bit-packed mask is a flat uint8 tensor (8 entries per byte, most
significant bit first, zero-padded) plus the mask's shape, which the caller records in metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

MASK_FORMAT = "ckreg.bitpacked-bool/v1"
SHAPE_SUFFIX = ":shape"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


# -- bit packing ------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask (any shape) into ``ceil(n/8)`` uint8 bytes, MSB first."""
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool masks are bit-packed, got {mask.dtype}")
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the bool mask of ``shape``."""
    numel = 1
    for dim in shape:
        numel *= int(dim)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask of {packed.numel()} {packed.dtype} bytes does not fit shape {tuple(shape)}"
        )
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(int(d) for d in shape))


def pack_masks(masks: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata (shapes as JSON) for a dict of bool masks."""
    tensors = {name: pack_mask(mask) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    return tensors, {"format": MASK_FORMAT, "mask_shapes": json.dumps(shapes)}


def pack_masks_inline(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed masks with each shape as a companion int64 tensor ``<name>:shape``.

    For outputs whose file metadata the caller cannot set (the engine's extra streams share
    one metadata dict); ``:`` never occurs in a PyTorch parameter name.
    """
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        out[name] = pack_mask(mask)
        out[name + SHAPE_SUFFIX] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


def unpack_masks(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_masks` (shapes in metadata) or :func:`pack_masks_inline`.

    Raises naming the tensor whose shape is recorded nowhere.
    """
    if metadata and "mask_shapes" in metadata:
        if metadata.get("format") != MASK_FORMAT:
            raise ValueError(f"not a bit-packed mask file: format {metadata.get('format')!r}")
        shapes = json.loads(metadata["mask_shapes"])
    else:
        shapes = {
            name[: -len(SHAPE_SUFFIX)]: tensor.tolist()
            for name, tensor in tensors.items()
            if name.endswith(SHAPE_SUFFIX)
        }
    packed = {name: t for name, t in tensors.items() if not name.endswith(SHAPE_SUFFIX)}
    missing = sorted(set(packed) - set(shapes))
    if missing:
        raise ValueError(f"no recorded shape for mask tensor(s) {missing}")
    return {name: unpack_mask(t, shapes[name]) for name, t in packed.items()}


# -- exact global threshold (radix selection over float bit patterns) --------------------------


def _magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns of ``|values|`` (float32): monotone in the magnitude."""
    flat = values.detach().float().reshape(-1)
    if torch.isnan(flat).any():
        raise ValueError("NaN in values passed to a threshold selection")
    return (flat.contiguous().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)


def _select_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry, and k's rank inside that bin."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k]), side="left").item())
    bin_id = counts.numel() - 1 - index
    above = int(from_top[index].item()) - int(counts[bin_id].item())
    return bin_id, k - above


class MagnitudeSelector:
    """Exact k-th largest ``|x|`` over streamed tensors, in two passes with bounded memory.

    Pass 1 (``observe`` before ``begin_second_pass``) counts the high 16 bits of every float32
    bit pattern (non-negative floats order like their bit patterns); pass 2 counts the low
    16 bits inside the one high bin that holds the k-th entry. Memory: one tensor plus two
    fixed histograms (32 768 and 65 536 bins, kept on the CPU), whatever the number of entries.
    """

    def __init__(self) -> None:
        self._high = torch.zeros(1 << 15, dtype=torch.int64)
        self._low: torch.Tensor | None = None
        self._high_bin = self._rank = 0

    @property
    def total(self) -> int:
        """Entries seen in the first pass."""
        return int(self._high.sum().item())

    def observe(self, values: torch.Tensor) -> None:
        """Count one tensor (first or second pass, whichever is running)."""
        bits = _magnitude_bits(values)
        if self._low is None:
            self._high += torch.bincount(bits >> 16, minlength=1 << 15).cpu()
        else:
            inside = bits[(bits >> 16) == self._high_bin] & 0xFFFF
            self._low += torch.bincount(inside, minlength=1 << 16).cpu()

    def begin_second_pass(self, k: int) -> None:
        """Fix k (1 = the largest) after the first pass."""
        if not 1 <= k <= self.total:
            raise ValueError(f"cannot select the {k}-th largest of {self.total} values")
        self._high_bin, self._rank = _select_bin(self._high, k)
        self._low = torch.zeros(1 << 16, dtype=torch.int64)

    def result(self) -> float:
        """The k-th largest magnitude, exactly (after the second pass)."""
        if self._low is None:
            raise RuntimeError("the second pass has not run")
        low_bin, _ = _select_bin(self._low, self._rank)
        pattern = torch.tensor([(self._high_bin << 16) | low_bin], dtype=torch.int32)
        return float(pattern.view(torch.float32).item())


def kth_largest_magnitude(values: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The exact k-th largest ``|x|`` over many tensors; ``values()`` yields them per pass."""
    selector = MagnitudeSelector()
    for tensor in values():
        selector.observe(tensor)
    selector.begin_second_pass(k)
    for tensor in values():
        selector.observe(tensor)
    return selector.result()


def keep_count(total: int, density: float) -> int:
    """How many of ``total`` entries a ``density`` keeps: ``max(1, ⌊density·total⌋)``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, int(round(density * total, 6)))


# -- FFG (Fast Fisher Grafting) ----------------------------------------------------------------


def ffg_saliency(second_moment: torch.Tensor, task_vector: torch.Tensor) -> torch.Tensor:
    """``s = v ⊙ τ²`` with the raw second moment (before any power), float32."""
    return second_moment.float() * task_vector.float().square()


def threshold_mask(saliency: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[s ≥ thr]`` as a bool mask."""
    return saliency >= threshold


def graft(base: torch.Tensor, task_vector: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``θ0 + M ⊙ τ``, float32."""
    return base.float() + mask.to(torch.float32) * task_vector.float()


# -- TALL masks and consensus (arXiv 2405.07813) -----------------------------------------------


def tall_mask(task_vector: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """``m_t = [|τ_t| > λ_t·|τ_MTL - τ_t|]``."""
    tv = task_vector.float()
    return tv.abs() > lam * (mtl.float() - tv).abs()


def consensus_mask(masks: Sequence[torch.Tensor], k: int = 2) -> torch.Tensor:
    """``[Σ_t m_t ≥ k]``: entries that at least ``k`` tasks consider relevant."""
    if not masks:
        raise ValueError("consensus needs at least one mask")
    votes = torch.stack([m.to(torch.int32) for m in masks]).sum(dim=0)
    return votes >= k


def reconstruct_task(base: torch.Tensor, mtl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recover task t from the shared multi-task vector: ``θ0 + m_t ⊙ τ_MTL``, float32."""
    return graft(base, mtl, mask)


def consensus_merge(
    base: torch.Tensor, mtl: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``θ0 + alpha·(m ⊙ τ_MTL)``, float32."""
    return base.float() + alpha * (mask.to(torch.float32) * mtl.float())
