"""Input slices are cast to float32 and checked finite in one pass (``kernels.cast_checked``,
``cast.c``): torch's cast bit for bit, and a NaN or Inf found wherever it is."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mergeops import kernel_settings, kernels
from mergeops.slice_reads import cast_into

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cast_checked_gives_torch_s_cast(kernel_dir: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    src = (torch.randn(64 * 99 + 7, generator=g) * 10.0 ** torch.randint(-30, 30, (64 * 99 + 7,),
                                                                         generator=g)).to(dtype)  # fmt: skip
    src[:3] = torch.tensor([-0.0, 1e-40, -1e-45]).to(dtype)  # signed zero, subnormals
    out = torch.empty(src.shape, dtype=torch.float32)
    assert kernels.cast_checked(src, out) is True
    assert torch.equal(out.view(torch.int32), src.float().view(torch.int32))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, src.numel() // 2, src.numel() - 1):
            broken = src.clone()
            broken[where] = bad
            assert kernels.cast_checked(broken, out) is False, (bad, where)


def test_cast_into_is_the_same_with_the_kernels_off(kernel_dir: Path) -> None:
    src = torch.randn(1000).bfloat16()
    src[10] = float("nan")
    results = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        out = torch.empty(1000)
        results.append((cast_into(src, out, True), cast_into(src[20:40], out[:20], False), out))
    (ok_on, unchecked_on, out_on), (ok_off, unchecked_off, out_off) = results
    assert ok_on is False and ok_off is False and unchecked_on is None and unchecked_off is None
    assert torch.equal(out_on.view(torch.int32), out_off.view(torch.int32))
    assert kernels.cast_checked(torch.randn(10).half(), torch.empty(10)) is None  # not taken
    kernel_settings.configure(enabled=True)
    copied = torch.empty(1000, dtype=torch.bfloat16)
    assert kernels.cast_checked(src, copied) is False  # bfloat16 copied, the NaN found
    assert torch.equal(copied.view(torch.int16), src.view(torch.int16))
    assert kernels.cast_checked(src[20:], copied[20:]) is True


def test_rounding_to_bfloat16_gives_torch_s_bits_and_finds_overflow(kernel_dir: Path) -> None:
    g = torch.Generator().manual_seed(2)
    src = torch.randn(64 * 50, generator=g) * 10.0 ** torch.randint(-40, 38, (64 * 50,),
                                                                     generator=g).float()  # fmt: skip
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1e-40, -0.0, 3.3e38]
    src[: len(ties)] = torch.tensor(ties)  # halfway cases (to even), subnormal, -0, near max
    out = torch.empty(src.shape, dtype=torch.bfloat16)
    assert kernels.cast_checked(src, out) is True
    assert torch.equal(out.view(torch.int16), src.bfloat16().view(torch.int16))
    src[100] = 3.4e38  # finite in float32, Inf in bfloat16
    assert torch.isinf(src[100:101].bfloat16()).all()
    assert kernels.cast_checked(src, out) is False
    for nan_bits in (0x7FC00000, 0x7F800001, -1, -0x00400000):  # quiet, signalling, negative
        src[100:101].view(torch.int32).fill_(nan_bits)
        assert torch.isnan(src[100])
        assert kernels.cast_checked(src, out) is False
        assert torch.isnan(out[100])  # still a NaN for the count of what is not finite
