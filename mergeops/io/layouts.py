"""Which reader a checkpoint needs: a file, a sharded folder, a PEFT adapter folder or a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from mergeops.io.peft import PeftAdapter
from mergeops.io.readers import SafetensorsFile, ShardedCheckpoint, SourceError, StateDictSource
from mergeops.sources import TensorSource


def open_source(
    item: str | Path | TensorSource | Mapping[str, torch.Tensor],
    name: str | None = None,
    *,
    lora: Literal["factors", "delta", "full"] = "factors",
    lora_base: TensorSource | None = None,
) -> TensorSource:
    """A source for a path (file, sharded folder, PEFT adapter folder), a state dict or a
    source (returned as is). ``lora`` and ``lora_base`` choose how an adapter folder is
    exposed (see ``mergeops.io.peft``)."""
    if isinstance(item, TensorSource):
        return item
    if isinstance(item, Mapping):
        return StateDictSource(item, name=name or "state_dict")
    path = Path(item)
    if path.is_file():
        return SafetensorsFile(path, name=name)
    if (path / "adapter_config.json").is_file():
        return PeftAdapter(path, name=name, mode=lora, base=lora_base)
    if path.is_dir():
        return ShardedCheckpoint(path, name=name)
    raise SourceError(f"no checkpoint at '{path}' (expected a .safetensors file or a folder)")
