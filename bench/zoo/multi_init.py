"""A digits-zoo variant for merges of models that share no base: K backbones trained from K
different initialisations, each jointly on the same tasks with its own heads inside its
checkpoint (``heads.<task>.weight``/``bias``), so plain averaging mixes unrelated neurons.

``build_multi_init(out_dir)`` writes ``models/<k>/model.safetensors`` plus ``multi_init.json``;
``DigitsFeatureProbe`` is the ``FeatureProbe`` the alignment methods (pleas, ot_fusion) read
the backbone's activations through. The original zoo (``bench.zoo.build``) is unchanged.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.zoo.data import task_data
from bench.zoo.model import backbone_forward, head_from, init_backbone, init_linear
from mergeops.sources import NeuronLayer

Params = Mapping[str, torch.Tensor]
DEFAULT_TASKS: tuple[str, ...] = ("plain", "rot90", "invert")
MANIFEST = "multi_init.json"


class DigitsFeatureProbe:
    """Activations of the digits backbone (fc1 -> LN -> ReLU -> fc2 -> LN -> ReLU) on ``inputs``;
    the last layer's neurons also index the columns of every ``heads.<task>.weight``."""

    def __init__(self, inputs: torch.Tensor, tasks: Sequence[str] = ()) -> None:
        self.inputs = inputs.float()
        self.tasks = tuple(tasks)

    def layer_order(self) -> list[NeuronLayer]:
        heads = tuple(f"heads.{t}.weight" for t in self.tasks)
        return [
            NeuronLayer("fc1", "fc1.weight", "fc1.bias",
                        ("fc1.weight", "fc1.bias", "norm1.weight", "norm1.bias"),
                        ("fc2.weight",)),
            NeuronLayer("fc2", "fc2.weight", "fc2.bias",
                        ("fc2.weight", "fc2.bias", "norm2.weight", "norm2.bias"), heads),
        ]  # fmt: skip

    def _hidden(self, params: Params) -> torch.Tensor:
        h = F.linear(self.inputs, params["fc1.weight"], params["fc1.bias"])
        return F.relu(F.layer_norm(h, h.shape[-1:], params["norm1.weight"], params["norm1.bias"]))

    def features(self, params: Params, layer: str) -> torch.Tensor:
        with torch.no_grad():
            if layer == "fc1":
                return self._hidden(params)
            if layer == "fc2":
                return backbone_forward(params, self.inputs)
        raise KeyError(f"digits probe has no layer {layer!r}; layers: fc1, fc2")

    def layer_inputs(self, params: Params, layer: str) -> torch.Tensor:
        with torch.no_grad():
            if layer == "fc1":
                return self.inputs
            if layer == "fc2":
                return self._hidden(params)
        raise KeyError(f"digits probe has no layer {layer!r}; layers: fc1, fc2")


def _generator(seed: int, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(label.encode()))


def train_model(
    index: int, tasks: Sequence[str], *, seed: int = 0, steps: int = 600, lr: float = 3e-3
) -> dict[str, torch.Tensor]:
    """One backbone + heads from initialisation ``index``, trained on all ``tasks`` at once."""
    gen = _generator(seed, f"init-{index}")
    params = dict(init_backbone(gen))
    data = {t: task_data(t, "train", seed=seed) for t in tasks}
    for task, d in data.items():
        head = init_linear(int(d.y.max()) + 1, params["fc2.weight"].shape[0], gen)
        params.update({f"heads.{task}.{k}": v for k, v in head.items()})
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(list(leaves.values()), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for task, d in data.items():
            idx = torch.randint(len(d.y), (64,), generator=gen)
            feats = backbone_forward(leaves, d.x[idx])
            head = head_from(leaves, task)
            assert head is not None
            loss = loss + F.cross_entropy(F.linear(feats, head["weight"], head["bias"]), d.y[idx])
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone().contiguous() for k, v in leaves.items()}


def hits(model: Params, tasks: Sequence[str], split: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per task, 1.0 where ``model`` (with its own heads) classifies an example right."""
    out = {}
    with torch.no_grad():
        for task in tasks:
            d = task_data(task, split, seed=seed)
            head = head_from(model, task)
            assert head is not None, f"model has no head for task {task!r}"
            pred = F.linear(backbone_forward(model, d.x), head["weight"], head["bias"]).argmax(-1)
            out[task] = (pred == d.y).float()
    return out


def probe_inputs(tasks: Sequence[str], *, seed: int = 0, per_task: int = 200) -> torch.Tensor:
    """Unlabeled validation inputs of every task (the alignment methods' shared inputs)."""
    return torch.cat([task_data(t, "validation", seed=seed).x[:per_task] for t in tasks])


def build_multi_init(
    out_dir: Path, *, k: int = 2, tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0,
    steps: int = 600,
) -> list[Path]:  # fmt: skip
    """Train ``k`` models from different initialisations; returns their safetensors paths."""
    torch.manual_seed(seed)
    paths = []
    for index in range(k):
        path = out_dir / "models" / str(index) / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(train_model(index, tasks, seed=seed, steps=steps), str(path))
        paths.append(path)
    manifest = {"k": k, "tasks": list(tasks), "seed": seed, "steps": steps}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return paths


def load_multi_init(out_dir: Path) -> tuple[list[dict[str, torch.Tensor]], dict]:  # type: ignore[type-arg]
    """The models and the manifest written by ``build_multi_init``."""
    manifest = json.loads((out_dir / MANIFEST).read_text())
    models = [load_file(str(out_dir / "models" / str(i) / "model.safetensors"))
              for i in range(manifest["k"])]  # fmt: skip
    return models, manifest
