"""Bit-packed masks: hand-computed bytes and exact round trips through safetensors files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeops.ops.masks import (
    pack_mask,
    pack_masks,
    pack_masks_inline,
    unpack_mask,
    unpack_masks,
)


def test_pack_mask_hand_computed_bytes() -> None:
    # bits 1011 0001 | 10 (padded with six zeros) -> 0xB1 = 177, 0x80 = 128
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [177, 128]
    assert torch.equal(unpack_mask(packed, [10]), mask)


@pytest.mark.parametrize("shape", [(0,), (), (1,), (8,), (3, 5, 7), (2, 9)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=gen) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, list(shape)), mask)


def test_masks_round_trip_through_a_safetensors_file(tmp_path) -> None:
    masks = {
        "layer.0.weight": torch.rand(4, 7) > 0.3,
        "layer.0.bias": torch.tensor([True, False, True]),
        "scalar": torch.tensor(True),
    }
    tensors, metadata = pack_masks(masks)
    path = tmp_path / "mask.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with safe_open(str(path), framework="pt") as handle:
        loaded = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        stored_metadata = handle.metadata()
    assert all(t.dtype == torch.uint8 for t in loaded.values())
    back = unpack_masks(loaded, stored_metadata)
    assert back.keys() == masks.keys()
    for key, mask in masks.items():
        assert back[key].dtype == torch.bool
        assert torch.equal(back[key], mask), key


def test_bad_packed_input_is_rejected_with_names() -> None:
    with pytest.raises(TypeError, match="bool"):
        pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3, 5\)"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), [3, 5])
    tensors, metadata = pack_masks({"a": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'b'"):
        unpack_masks({**tensors, "b": tensors["a"]}, metadata)
    with pytest.raises(ValueError, match="format"):
        unpack_masks(tensors, {"mask_shapes": "{}"})
    with pytest.raises(ValueError, match="'a'"):
        unpack_masks(tensors)


def test_inline_shapes_round_trip() -> None:
    masks = {"w": torch.rand(3, 11) > 0.5, "b": torch.tensor([False, True])}
    tensors = pack_masks_inline(masks)
    assert tensors["w:shape"].tolist() == [3, 11]
    back = unpack_masks(tensors)
    assert back.keys() == masks.keys()
    assert all(torch.equal(back[k], masks[k]) for k in masks)
