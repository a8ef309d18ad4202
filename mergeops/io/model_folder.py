"""The non-tensor files of a merged Hugging Face model folder.

``config.json`` comes from the reference model (the base, else the first model) with the
layer count after slices, the output vocabulary size and ``torch_dtype``/``dtype`` set to the
output dtype; ``generation_config.json`` is copied from it; tokenizer files come from a folder
prepared by the tokenizer step; ``README.md`` is a model card with the merge YAML,
``base_model:`` and ``base_model_relation: merge`` (https://huggingface.co/docs/hub/model-cards).
Width fields follow the written tensors (``config_widths``): a merge that writes wider MLP
blocks (pleas at ``width_factor`` > 1) gets the ``intermediate_size`` of its tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from mergeops.device import dtype_name

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: Config fields that follow a tensor's size in every layer: (field, tensor name pattern, dim).
_WIDTH_FIELDS = (
    ("intermediate_size", re.compile(r"(?:^|\.)layers\.\d+\.mlp\.up_proj\.weight$"), 0),
)


@dataclass
class ModelFolder:
    """What to write beside the shards (every field optional)."""

    reference_dir: Path | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_dir: Path | None = None
    method: str = ""
    base_models: list[str] = field(default_factory=list)
    config_yaml: str = ""

    def write(self, folder: Path) -> None:
        """Write config, generation config, tokenizer files and the card into ``folder``."""
        self._write_config(folder)
        if self.reference_dir is not None:
            generation = self.reference_dir / "generation_config.json"
            if generation.is_file():
                shutil.copyfile(generation, folder / generation.name)
        if self.tokenizer_dir is not None and self.tokenizer_dir.is_dir():
            for item in sorted(self.tokenizer_dir.iterdir()):
                if item.is_file():
                    shutil.copyfile(item, folder / item.name)
        if self.config_yaml:
            (folder / "ckreg_merge.yml").write_text(self.config_yaml)
        (folder / "README.md").write_text(self.card())

    def _write_config(self, folder: Path) -> None:
        source = self.reference_dir / "config.json" if self.reference_dir else None
        if source is None or not source.is_file():
            return
        config: dict[str, Any] = json.loads(source.read_text())
        scope = _scope(config)
        if self.num_layers is not None:
            key = next((k for k in _LAYER_KEYS if k in scope), "num_hidden_layers")
            scope[key] = self.num_layers
            if isinstance(scope.get("layer_types"), list):
                scope["layer_types"] = _resized(scope["layer_types"], self.num_layers)
        if self.vocab_size is not None:
            scope["vocab_size"] = self.vocab_size
        if self.out_dtype is not None:
            for key in ("torch_dtype", "dtype"):
                config[key] = dtype_name(self.out_dtype)
        scope.update(config_widths(scope, tensor_shapes(folder)))
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def card(self) -> str:
        """The model card: front matter, a line on the merge, the YAML."""
        front = {
            "base_model": self.base_models,
            "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["merge", "ckreg", "mergekit"],
        }
        header = yaml.safe_dump(front, sort_keys=False)
        models = "\n".join(f"- {m}" for m in self.base_models)
        return (
            f"---\n{header}---\n# Merged model\n\n"
            f"Merged with ckreg (mergeops) using the `{self.method}` "
            f"method.\n\n## Models merged\n\n{models}\n\n## Configuration\n\n"
            f"```yaml\n{self.config_yaml.rstrip()}\n```\n"
        )


def _scope(config: dict[str, Any]) -> dict[str, Any]:
    """The part of ``config`` describing the language model (``text_config`` when nested)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    return text if text is not None and not _has_layer_key(config) else config


def _has_layer_key(config: dict[str, Any]) -> bool:
    return any(k in config for k in _LAYER_KEYS)


def _resized(layer_types: list[Any], count: int) -> list[Any]:
    """A per-layer list cut or extended (repeating its pattern) to ``count`` layers."""
    if not layer_types:
        return layer_types
    return [layer_types[i % len(layer_types)] for i in range(count)]


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors files at the top of ``folder`` (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def config_widths(
    config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, int]:
    """The width fields of ``config`` the tensors disagree with, set to the tensors' size
    (only where every layer has the same size, which a single field can say)."""
    updates = {}
    for name, pattern, dim in _WIDTH_FIELDS:
        sizes = {shape[dim] for key, shape in shapes.items() if pattern.search(key)}
        if isinstance(config.get(name), int) and len(sizes) == 1 and config[name] not in sizes:
            updates[name] = next(iter(sizes))
    return updates


def update_config_widths(folder: Path) -> dict[str, int]:
    """Set ``folder/config.json``'s width fields to the tensors written in ``folder``;
    returns what changed (nothing without a config or a readable mapping)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    scope = _scope(config)
    updates = config_widths(scope, tensor_shapes(folder))
    if updates:
        scope.update(updates)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return updates
