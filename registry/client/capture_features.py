"""Client-side capture of per-layer features for the alignment merges (pleas, ot_fusion),
written as a ``features`` safetensors artifact (``ckreg register --features FILE``).

Each ``FeatureLayer`` names the module whose output is the layer's post-activation features
(e.g. the activation after ``fc1``) and the tensors that index its neurons, as
``mergeops.sources.NeuronLayer`` does. A forward hook on that module keeps up to
``max_samples`` rows of its output (leading dims flattened: tokens count as samples). Every
checkpoint to be aligned must see the SAME inputs in the same order: the merge matches neurons
by how they respond to each sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FEATURES_KEY = "ckreg.features"


@dataclass(frozen=True)
class FeatureLayer:
    """A layer to align: ``module`` (its output = the features), ``weight``/``bias`` producing
    them, ``rows`` (default: weight and bias) and ``cols`` (dim 1: the next layer's weight);
    ``widen`` False keeps its width in a wider pleas merge (a residual stream, heads)."""

    name: str
    module: str
    weight: str | None
    bias: str | None = None
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    group: int = 1
    widen: bool = True

    def spec(self) -> dict[str, Any]:
        """The layer as stored in the file's metadata (without the module path; ``widen`` only
        when False)."""
        out = asdict(self)
        del out["module"]
        if self.widen:
            del out["widen"]
        rows = self.rows or tuple(t for t in (self.weight, self.bias) if t)
        return out | {"rows": list(rows), "cols": list(self.cols)}


def capture_features(
    model: torch.nn.Module,
    batches: Iterable[Any],
    layers: Sequence[FeatureLayer],
    path: Path | str,
    *,
    max_samples: int = 2048,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
) -> Path:
    """Run ``batches`` through ``model`` (no gradients) and write each layer's features
    (float32, at most ``max_samples`` rows) with the layer list in the metadata."""
    import torch
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("no layers to capture features for")
    kept: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = []
    for layer in layers:
        try:
            module = model.get_submodule(layer.module)
        except AttributeError:
            raise ValueError(
                f"layer '{layer.name}': the model has no module '{layer.module}'"
            ) from None
        handles.append(module.register_forward_hook(_keeper(kept[layer.name], max_samples)))
    run = forward or (lambda m, b: m(**b) if isinstance(b, dict) else m(b))
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
                if all(sum(len(t) for t in v) >= max_samples for v in kept.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
    if not all(kept.values()):
        missing = [name for name, v in kept.items() if not v]
        raise ValueError(f"no forward pass reached the modules of layers {missing}")
    tensors = {k: torch.cat(v)[:max_samples].contiguous() for k, v in kept.items()}
    metadata = {"format": "pt", FEATURES_KEY: json.dumps([layer.spec() for layer in layers])}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def _keeper(into: list[Any], max_samples: int) -> Callable[..., None]:
    def keep(module: Any, args: Any, output: Any) -> None:
        have = sum(len(t) for t in into)
        if have < max_samples:
            out = output[0] if isinstance(output, tuple) else output
            into.append(out.detach().reshape(-1, out.shape[-1]).float().cpu()[: max_samples - have])

    return keep
