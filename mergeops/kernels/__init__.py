"""Fused float32 merges on the CPU, compiled from C on first use: ``combine.c`` (weighted sums,
TIES), ``ram.c`` (RAM), ``dare.c`` (DARE's L1 rescale), ``select.c`` (exact quantiles),
``averaging.c`` (nearswap, nuslerp, linear combinations, Gram matrices), ``cast.c`` (input
slices cast and checked finite), ``rank.c`` (DELLA's ranks by radix sort), and ``sortsim.c``:
torch's CPU sort algorithm run only where it
reaches given positions (``sort_windows``, for mergekit's tie rule).

The torch path of a task-vector combine runs one op per model and step over each block
(sub, mul, add per model, then divide, scale, add the base): about 3.5 ns per entry for four
models here, most of it per-op cost and passes over memory. ``combine.c`` does the same
arithmetic per element in one pass (0.5 ns; TIES's consensus 1.0 ns against 3.7) with the same
bits: it is built with ``-ffp-contract=off`` and without fast-math, so each product and sum is
rounded as torch rounds it, in the same order.

The library is compiled once per machine into a private cache folder (``cache_dir`` of
``mergeops.kernel_settings``; the ``ckreg`` CLI takes it from ``CKREG_KERNEL_DIR``, default
``$XDG_CACHE_HOME/ckreg/kernels``), named by the hash of the source, the compiler and its
flags; later processes load it in milliseconds. Without a C compiler (``cc`` or ``gcc``, or
``CC`` for the CLI), or when disabled (``CKREG_FUSED_KERNELS=0``), the callers keep the torch
path; the results are the same either way. ctypes releases the GIL for the call, so reader and writer threads run
meanwhile.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergeops import kernel_settings

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "combine.c",
        "sortsim.c",
        "ram.c",
        "dare.c",
        "select.c",
        "averaging.c",
        "cast.c",
        "rank.c",
    )
]
FLAGS = [
    "-O3",
    "-std=c99",
    "-fPIC",
    "-shared",
    "-ffreestanding",  # the compiler's own stdint.h: no C library headers needed
    "-nostdlib",  # no libc calls: links without a C library's development files
    "-ffp-contract=off",  # a product is never fused into a sum (torch rounds both)
    "-fno-trapping-math",  # lets selects vectorise; changes no value
    "-fno-tree-loop-distribute-patterns",  # no memset calls
]
COMPILE_TIMEOUT_S = 120

_P = ctypes.c_void_p
_I32, _I64, _F32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_tried = -1  # the settings generation the library was (tried to be) loaded under


def enabled() -> bool:
    """Whether fused kernels may be used (``kernel_settings``)."""
    return kernel_settings.current()[0].enabled


def _compiler() -> list[str] | None:
    configured = kernel_settings.current()[0].compiler
    if configured:
        return list(configured)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _cpu_flags() -> list[str]:
    """AVX2 where this x86-64 CPU has it (the library is built for the machine it runs on)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return ["-mavx2"] if " avx2" in flags else []


def cache_dir() -> Path:
    """Where compiled kernels are kept (private to the user)."""
    configured = kernel_settings.current()[0].cache_dir
    return configured if configured is not None else Path.home() / ".cache" / "ckreg" / "kernels"


def _private(path: Path) -> bool:
    """Ours and not writable by others: nobody else could have put code there."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build(compiler: list[str]) -> Path:
    flags = [*FLAGS, *_cpu_flags()]
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join([*(p.read_text() for p in SOURCES), version, *flags, platform.machine()]).encode()
    ).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private(folder):
        raise RuntimeError(f"{folder} is writable by other users; not loading code from it")
    target = folder / f"combine-{key}.so"
    if target.exists():
        if not _private(target):
            raise RuntimeError(f"{target} is writable by other users; not loading it")
        return target
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [*compiler, *flags, "-o", str(built), *map(str, SOURCES)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=True,
        )
        os.replace(built, target)  # atomic: concurrent builders each put a whole file
    return target


_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ck_weighted_sum": ([_P, _P, _I32, _I32, _P, _I32, _F32, _I32, _F32, _P, _I64], None),
    "ck_consensus_sum": ([_P, _P, _I32, _P, _I32, _I32, _F32, _P, _I64], None),
    "ck_key_counts": ([_P, _I64, _P], _I32),
    "ck_tau_key_counts": ([_P, _P, _I64, _P], None),
    "ck_trim": ([_P, _P, _F32, _I32, ctypes.POINTER(_I64), _I64], None),
    "ck_window_trim": ([_P, _P, _F32, _F32, _P, _P, _P, _P, _I64], None),
    "ck_sort_windows": ([_P, _P, _I64, _I32, _P, _P, _I32, _I64], _I32),
    "ck_nth_element": ([_P, _P, _I64, _I64, _I32, _I64], _I32),
    "ck_della_probabilities": ([_P, _I64, _I64, _F32, _F32, _P, _P, _P], None),
    "ck_ram": ([_P, _P, _I32, _F32, _P, _P, _I64], None),
    "ck_ram_counts": ([_P, _P, _I32, _F32, _P, _P, _I64], None),
    "ck_dare_sweep": ([_P, _P, _P, _F32, _P, _P, _I64], None),
    "ck_lane_sums": ([_P, _P, _I64], None),
    "ck_dare_apply": ([_P, _P, _P, _F32, _I64], None),
    "ck_select_ranks": ([_P, _I64, _P, _I32, _P, _P], _I32),
    "ck_nearswap": ([_P, _P, _F32, _P, _I64], None),
    "ck_linear_combination": ([_P, _P, _I32, _I32, _P, _P, _I64], None),
    "ck_gram_lanes": ([_P, _P, _I32, _I32, _P, _I64], None),
    "ck_nuslerp_apply": ([_P, _P, _F32, _F32, _F32, _P, _I64], None),
    "ck_cast_bf16": ([_P, _P, _I64], _I64),
    "ck_copy_f32": ([_P, _P, _I64], _I64),
    "ck_round_bf16": ([_P, _P, _I64], _I64),
    "ck_copy_bf16": ([_P, _P, _I64], _I64),
}
"""ctypes argument and result types of every exported kernel, by C name."""


def _load() -> ctypes.CDLL | None:
    global _loaded, _tried
    generation = kernel_settings.current()[1]
    with _lock:
        if _tried == generation:
            return _loaded
        _tried, _loaded = generation, None
        compiler = _compiler()
        if compiler is None:
            log.info("no C compiler (cc, gcc): fused CPU kernels off, torch ops used")
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            log.warning("fused CPU kernels unavailable, torch ops used: %s", detail)
            return None
        for name, (argtypes, restype) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
        _loaded = lib
        return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, no compiler, or the build failed)."""
    return _load() if enabled() else None


def usable(inputs: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: contiguous float32 on the CPU, of one size, and
    ``out`` sharing no memory with an input."""
    tensors = [*inputs, out]
    if not all(
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.is_contiguous()
        and t.numel() == out.numel()
        for t in tensors
    ):
        return False
    start, stop = out.data_ptr(), out.data_ptr() + out.numel() * 4
    return all(t.data_ptr() >= stop or t.data_ptr() + t.numel() * 4 <= start for t in inputs)


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def weighted_sum(
    base: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    models: bool,
    divisor: float | None,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """``out = base + scale·(Σ_t w_t·τ_t [/ divisor])`` with τ_t = ``inputs[t] - base`` when
    ``models``, else ``inputs[t]``; with no base, ``out = scale·(Σ_t w_t·x_t [/ divisor])``.
    ``weights``: contiguous float32 on the CPU. False (nothing written) when the kernels are
    off or do not take these tensors."""
    lib = library()
    tensors = [*inputs, *([base] if base is not None else [])]
    if lib is None or not usable(tensors, out) or (models and base is None):
        return False
    _check(weights, len(inputs))
    lib.ck_weighted_sum(
        None if base is None else base.data_ptr(),
        _pointers(inputs),
        len(inputs),
        int(models),
        weights.data_ptr(),
        int(divisor is not None),
        1.0 if divisor is None else divisor,
        int(scale != 1),
        scale,
        out.data_ptr(),
        out.numel(),
    )
    return True


def consensus_sum(
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    normalize: bool,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """TIES's disjoint merge, ``out = base + scale·(Σ agreeing w_t·τ_t [/ Σ their w_t])``
    (``ops.sign_consensus.stacked_combine`` with ``consensus``); False when not taken."""
    lib = library()
    if lib is None or not usable([base, *taus], out):
        return False
    _check(weights, len(taus))
    lib.ck_consensus_sum(
        base.data_ptr(),
        _pointers(taus),
        len(taus),
        weights.data_ptr(),
        int(normalize),
        int(scale != 1),
        scale,
        out.data_ptr(),
        out.numel(),
    )
    return True


def key_counts(bits: torch.Tensor, counts: torch.Tensor) -> bool:
    """``counts[k] +=`` how many of ``bits`` (the int32 patterns of non-negative float32
    values) have key k = 2·(bits >> 16) + [bits & 0xFFFF ≠ 0], as the rank selection's first
    sweep counts them (``ops.select.RankCounter``); False when not taken. ``ValueError`` for a
    negative value (only magnitudes have these keys)."""
    lib = library()
    if (
        lib is None
        or bits.dtype != torch.int32
        or bits.device.type != "cpu"
        or not bits.is_contiguous()
        or not _histogram(counts)
    ):
        return False
    if not lib.ck_key_counts(bits.data_ptr(), bits.numel(), counts.data_ptr()):
        raise ValueError("key counts need non-negative values (magnitudes)")
    return True


def tau_key_counts(model: torch.Tensor, base: torch.Tensor, counts: torch.Tensor) -> bool:
    """``key_counts`` of the magnitudes ``|model - base|`` (float32), taken per element without
    writing them out; False when not taken."""
    lib = library()
    if lib is None or not usable([model], base) or not _histogram(counts):
        return False
    lib.ck_tau_key_counts(model.data_ptr(), base.data_ptr(), model.numel(), counts.data_ptr())
    return True


def trim(
    model: torch.Tensor, base: torch.Tensor, threshold: float, *, inclusive: bool, quota: int
) -> int | None:
    """TIES's trim of one slice in place: ``model`` becomes ``(model - base) * keep``, keep 1
    where ``|model - base|`` is above ``threshold`` (or equal, when ``inclusive``), and for the
    first ``quota`` entries equal to it in flat order; 0 elsewhere. Returns the quota left, or
    None (nothing written) when the kernels are off or do not take these tensors."""
    lib = library()
    if lib is None or not usable([base], model):  # model is written: it may not overlap base
        return None
    left = ctypes.c_int64(quota)
    lib.ck_trim(model.data_ptr(), base.data_ptr(), threshold, int(inclusive), ctypes.byref(left),
                model.numel())  # fmt: skip
    return left.value


def window_trim(
    model: torch.Tensor,
    base: torch.Tensor,
    low: float,
    high: float,
    runs: Sequence[tuple[float, int, int]],
    seen: Sequence[int],
) -> list[int] | None:
    """Breadcrumbs' window of one slice in place: ``model`` becomes ``(model - base) * keep``,
    keep 1 where ``low < |model - base| < high`` and, for each of up to two ``runs`` (value,
    first, last), where ``|model - base|`` equals value and is the i-th such entry of the
    tensor with first <= i < last (``seen``: how many the earlier slices held); 0 elsewhere.
    Returns ``seen`` advanced past this slice, or None (nothing written) when the kernels are
    off or do not take these tensors."""
    lib = library()
    if lib is None or len(runs) > 2 or not usable([base], model):
        return None
    padded = [*runs, *[(math.nan, 0, 0)] * (2 - len(runs))]
    values = (ctypes.c_float * 2)(*[value for value, _, _ in padded])
    first = (ctypes.c_int64 * 2)(*[start for _, start, _ in padded])
    last = (ctypes.c_int64 * 2)(*[stop for _, _, stop in padded])
    counts = (ctypes.c_int64 * 2)(*[*seen, *[0] * (2 - len(seen))])
    lib.ck_window_trim(model.data_ptr(), base.data_ptr(), low, high, values, first, last,
                       counts, model.numel())  # fmt: skip
    return list(counts)[: len(runs)]


def _histogram(counts: torch.Tensor) -> bool:
    return (
        counts.dtype == torch.int64
        and counts.numel() >= 1 << 16
        and counts.device.type == "cpu"
        and counts.is_contiguous()
    )


def _check(weights: torch.Tensor, count: int) -> None:
    if (
        weights.dtype != torch.float32
        or weights.device.type != "cpu"
        or not weights.is_contiguous()
        or weights.numel() != count
    ):
        raise ValueError(f"weights must be {count} contiguous float32 values on the CPU")


# The wrappers of the other C sources live beside them; imported last (they call library()).
from mergeops.kernels.averaging import gram_lanes as gram_lanes  # noqa: E402
from mergeops.kernels.averaging import linear_combination as linear_combination  # noqa: E402
from mergeops.kernels.averaging import nearswap as nearswap  # noqa: E402
from mergeops.kernels.averaging import nuslerp_apply as nuslerp_apply  # noqa: E402
from mergeops.kernels.cast import cast_checked as cast_checked  # noqa: E402
from mergeops.kernels.dare import dare_apply as dare_apply  # noqa: E402
from mergeops.kernels.dare import dare_sweep as dare_sweep  # noqa: E402
from mergeops.kernels.dare import lane_sums as lane_sums  # noqa: E402
from mergeops.kernels.ram import ram_combine as ram_combine  # noqa: E402
from mergeops.kernels.ram import ram_counts as ram_counts  # noqa: E402
from mergeops.kernels.rank import della_probabilities as della_probabilities  # noqa: E402
from mergeops.kernels.select import select_ranks as select_ranks  # noqa: E402
from mergeops.kernels.sortsim import nth_element as nth_element  # noqa: E402
from mergeops.kernels.sortsim import sort_windows as sort_windows  # noqa: E402
