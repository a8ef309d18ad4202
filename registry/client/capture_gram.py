"""Client-side capture of layer-input Gram matrices (XᵀX) for activation-aware merges
(RegMean), written as a ``gram`` safetensors artifact keyed by each linear weight's name.

Forward hooks on every ``torch.nn.Linear`` (what RegMean treats as one linear map) add the
layer inputs' XᵀX and token count in float32; memory is one (in, in) matrix per layer, not
the activations. ``GramRecorder`` keeps hooks across a training loop and samples every N-th
forward; ``capture_gram`` runs a set of batches through a model in one go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class GramRecorder:
    """Accumulates XᵀX of every linear layer's inputs while active; a context manager.

    ``every``: record one forward in ``every`` (sampling during training keeps the cost low).
    The stored Gram is the per-token mean XᵀX / n, so models with more data do not outweigh
    the others in a merge; n is kept in the file's metadata.
    """

    def __init__(self, model: torch.nn.Module, *, every: int = 1) -> None:
        import torch

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.every = model, every
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._calls = 0
        self._handles: list[Any] = []
        self._linears = {
            f"{name}.weight" if name else "weight": module
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        if not self._linears:
            raise ValueError("the model has no torch.nn.Linear layer to capture Grams for")

    def __enter__(self) -> GramRecorder:
        # the tick runs before any layer's hook, also when the model is itself a Linear
        self._handles.append(self.model.register_forward_pre_hook(self._tick, prepend=True))
        for key, module in self._linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _tick(self, module: Any, args: Any) -> None:
        self._calls += 1

    def _recording(self) -> bool:
        return (self._calls - 1) % self.every == 0

    def _hook(self, key: str) -> Callable[[Any, tuple[Any, ...]], None]:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not self._recording():
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.T @ x
            if key in self.sums:
                self.sums[key] += gram
            else:
                self.sums[key] = gram
            if key == next(iter(self._linears)):
                self.tokens += x.shape[0]

        return record

    def save(self, path: Path | str) -> Path:
        """Write the mean Grams (float32, CPU) to ``path``; returns the path."""
        from safetensors.torch import save_file

        if not self.sums or self.tokens == 0:
            raise ValueError("no forward pass was recorded; run batches through the model first")
        path = Path(path)
        tensors = {k: (v / self.tokens).cpu().contiguous() for k, v in self.sums.items()}
        save_file(
            tensors, str(path), metadata={"format": "pt", "ckreg.gram.tokens": str(self.tokens)}
        )
        return path


def capture_gram(
    model: torch.nn.Module,
    batches: Iterable[Any],
    path: Path | str,
    *,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
) -> Path:
    """Run ``batches`` through ``model`` (no gradients) and write the linear layers' mean Grams.

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``, or ``model(**batch)``
    for a mapping such as a tokenizer's output). Returns ``path``."""
    import torch

    def default_forward(module: torch.nn.Module, batch: Any) -> Any:
        return module(**batch) if isinstance(batch, dict) else module(batch)

    run = forward or default_forward
    with GramRecorder(model) as recorder, torch.no_grad():
        for batch in batches:
            run(model, batch)
    return recorder.save(path)
