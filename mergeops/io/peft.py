"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

By default the adapter's tensors are exposed as they are stored (``mode="factors"``), so
merging adapters merges their A and B factors entry by entry — cheap, and what MWA over one
run's adapter checkpoints does, but not the same as merging their products. ``mode="delta"``
exposes ΔW = (alpha/r)·B·A under the adapted module's weight name instead; ``mode="full"`` adds ΔW
to a base source and exposes every base tensor, giving full weights that any method can merge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch

from mergeops.io.readers import SafetensorsFile, SourceError
from mergeops.sources import TensorMeta, TensorSource

_PREFIX = "base_model.model."


class PeftAdapter:
    """A LoRA adapter folder as a tensor source (see the module docstring for ``mode``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        mode: Literal["factors", "delta", "full"] = "factors",
        base: TensorSource | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self.mode = mode
        if mode == "full" and base is None:
            raise SourceError(f"adapter '{self.name}': mode 'full' needs a base source")
        self.base = base
        config = json.loads((self.path / "adapter_config.json").read_text())
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        self.scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            raise SourceError(f"adapter folder '{self.path}' has no adapter_model.safetensors")
        self._file = SafetensorsFile(weights, name=self.name)
        self._pairs = self._find_pairs()

    def _find_pairs(self) -> dict[str, tuple[str, str]]:
        """Adapted weight name -> (lora_A key, lora_B key)."""
        pairs: dict[str, tuple[str, str]] = {}
        names = set(self._file.keys())
        for key in sorted(names):
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix(_PREFIX)
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in names:
                raise SourceError(f"adapter '{self.name}': '{key}' has no matching lora_B")
            pairs[f"{module}.weight"] = (key, b_key)
        return pairs

    def keys(self) -> list[str]:
        if self.mode == "factors":
            return self._file.keys()
        if self.mode == "delta":
            return list(self._pairs)
        assert self.base is not None
        return self.base.keys()

    def _delta(self, key: str) -> torch.Tensor:
        a_key, b_key = self._pairs[key]
        lora_a = self._file.get(a_key).float()
        lora_b = self._file.get(b_key).float()
        return self.scale * (lora_b @ lora_a)

    def get(self, key: str) -> torch.Tensor:
        if self.mode == "factors":
            return self._file.get(key)
        if self.mode == "delta":
            if key not in self._pairs:
                raise KeyError(f"adapter '{self.name}' adapts no weight '{key}'")
            return self._delta(key)
        assert self.base is not None
        weight = self.base.get(key)
        if key not in self._pairs:
            return weight
        return (weight.float() + self._delta(key)).to(weight.dtype)

    def metadata(self, key: str) -> TensorMeta:
        if self.mode == "factors":
            return self._file.metadata(key)
        if self.mode == "delta":
            a_meta = self._file.metadata(self._pairs[key][0])
            b_meta = self._file.metadata(self._pairs[key][1])
            return TensorMeta(torch.float32, (b_meta.shape[0], a_meta.shape[1]))
        assert self.base is not None
        return self.base.metadata(key)
