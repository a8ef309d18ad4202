"""Model references of a mergekit config: ``path`` or ``path+lora`` to opened sources.

``path/to/model+path/to/lora`` is the model with the PEFT LoRA applied (W + (alpha/r)·B·A on
the adapted weights, in float32 and cast back), as mergekit's ``model+lora`` references.
Relative paths are taken from the config file's folder; hub names are not downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergeops.io.layouts import open_source
from mergeops.io.peft import PeftAdapter
from mergeops.mergekit.schema import MergeConfig
from mergeops.methods.base import MergeError
from mergeops.sources import TensorSource


@dataclass
class ModelRef:
    """One referenced model: its YAML key, folder, optional LoRA and opened source."""

    key: str
    path: Path
    lora: Path | None
    source: TensorSource

    @property
    def folder(self) -> Path:
        """The folder holding config.json and tokenizer files."""
        return self.path if self.path.is_dir() else self.path.parent


def referenced_keys(config: MergeConfig) -> list[str]:
    """Every model key in YAML order (models or slices' sources), the base included."""
    keys = [m.model for m in config.models]
    for out_slice in config.slices:
        keys.extend(s.model for s in out_slice.sources)
        if out_slice.base_model:
            keys.append(out_slice.base_model)
    if config.base_model:
        keys.append(config.base_model)
    return list(dict.fromkeys(keys))


def _path(root: Path, value: str, key: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise MergeError(f"model '{key}': nothing at '{path}' (ckreg reads local files and "
                         "folders; hub names are not downloaded)")  # fmt: skip
    return path


def _names(keys: list[str]) -> dict[str, str]:
    """Short unique display names: the path's last part, the whole key where they clash."""
    short = {}
    for key in keys:
        parts = [Path(p).name.removesuffix(".safetensors") for p in key.split("+")]
        short[key] = "+".join(parts)
    counts: dict[str, int] = {}
    for name in short.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: name if counts[name] == 1 else key for key, name in short.items()}


def open_models(config: MergeConfig, root: Path) -> dict[str, ModelRef]:
    """Open every referenced model (LoRA references applied)."""
    keys = referenced_keys(config)
    names = _names(keys)
    refs = {}
    for key in keys:
        model_part, _, lora_part = key.partition("+")
        path = _path(root, model_part, key)
        source = open_source(path, name=names[key])
        lora = None
        if lora_part:
            lora = _path(root, lora_part, key)
            if not (lora / "adapter_config.json").is_file():
                raise MergeError(f"model '{key}': '{lora}' is not a PEFT LoRA folder "
                                 "(no adapter_config.json)")  # fmt: skip
            source = PeftAdapter(lora, name=names[key], mode="full", base=source)
        refs[key] = ModelRef(key, path, lora, source)
    return refs
