"""Counting which fused kernels a merge took (``mergeops.kernels``), for the tests that check
a merge uses them and gives the same bytes without them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mergeops import kernel_settings, kernels


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch, names: Iterable[str]) -> dict[str, int]:
    """Wrap each ``kernels.<name>`` so the returned dict counts the calls it took (a result
    that is neither None nor False)."""
    calls = dict.fromkeys(names, 0)
    for name in calls:

        def counted(*args: object, _real: Any = getattr(kernels, name), _name: str = name,
                    **kw: object) -> Any:  # fmt: skip
            taken = _real(*args, **kw)
            calls[_name] += taken is not None and taken is not False
            return taken

        monkeypatch.setattr(kernels, name, counted)
    return calls


def write_family(
    root: Path, base: torch.Tensor, models: list[torch.Tensor], dtype: torch.dtype
) -> list[Path]:
    """One folder per checkpoint (base first) holding ``w``, a 1024-row view of the tensor."""
    folders = []
    for name, tensor in [("base", base), *[(f"ft{i}", m) for i, m in enumerate(models)]]:
        folder = root / name
        folder.mkdir()
        save_file({"w": tensor.reshape(1024, -1).to(dtype)}, str(folder / "model.safetensors"))
        folders.append(folder)
    return folders


def merged_bytes_with_kernels_on_and_off(
    root: Path, method: str, folders: list[Path], **options: Any
) -> tuple[bytes, bytes]:
    """The output shards' bytes of one file merge (base ``folders[0]``, then the models) with
    the kernels on, then off; ``options`` go to ``merge_files``."""
    from mergeops import merge_files

    outputs = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        out = root / f"out-{on}"
        merge_files(method=method, base=folders[0], models=folders[1:], out_dir=out,
                    device="cpu", dtype="float32", progress=False, **options)  # fmt: skip
        outputs.append(b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors"))))
    return outputs[0], outputs[1]
