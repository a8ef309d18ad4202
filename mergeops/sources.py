"""The small protocols mergeops reads through: tensor sources, objectives and evaluators.

Anything that can list tensor names and hand out one tensor at a time is a ``TensorSource``:
a safetensors file, a sharded checkpoint directory, an in-memory state dict, or the registry's
S3 range reader. mergeops never learns where the bytes live.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch


class TensorMeta(NamedTuple):
    """What a source knows about one tensor without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@runtime_checkable
class TensorSource(Protocol):
    """A named, lazily read collection of tensors."""

    name: str

    def keys(self) -> list[str]:
        """Tensor names, in a stable order."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (raises ``KeyError`` naming the source when absent)."""
        ...

    def metadata(self, key: str) -> TensorMeta:
        """Dtype and shape of one tensor, without reading its data."""
        ...


@runtime_checkable
class Objective(Protocol):
    """A differentiable loss of a full parameter dict (FW-Merging's f, lower is better)."""

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss; gradients flow back into ``params``."""
        ...


@runtime_checkable
class GramProbe(Protocol):
    """Layer-input statistics of a model under given parameters (regmean_plusplus).

    ``linear_weights()`` names the linear weights in forward order; ``input_grams(params,
    model_name)`` runs ``params`` on that model's data and returns each linear weight's mean
    input Gram XᵀX / n."""

    def linear_weights(self) -> list[str]:
        """Linear weight names, in the order the forward pass reaches them."""
        ...

    def input_grams(
        self, params: Mapping[str, torch.Tensor], model_name: str
    ) -> dict[str, torch.Tensor]:
        """Mean input Gram per linear weight, with ``params`` on ``model_name``'s data."""
        ...


class NeuronLayer(NamedTuple):
    """One layer of neurons to align (pleas, ot_fusion): ``weight``/``bias`` produce them
    (``weight`` None for a residual stream, which no single weight produces); ``rows`` are all
    tensors whose dim 0 indexes them, ``cols`` those whose dim 1 does. ``group`` > 1 moves
    neurons only in blocks of that size (attention heads: ``group`` = head dim). ``widen``
    False keeps the layer at its width in a wider pleas merge."""

    name: str
    weight: str | None
    bias: str | None
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    group: int = 1
    widen: bool = True  # pleas width_factor > 1 may widen it (False: a residual stream, heads)


@runtime_checkable
class FeatureProbe(Protocol):
    """Activations of a model on shared unlabeled inputs (alignment methods).

    ``layer_order()`` lists the layers in forward order; ``features(params, layer)`` is the
    layer's post-activation output (n, width); ``layer_inputs(params, layer)`` the inputs
    (n, in) its ``weight`` sees. Shapes follow ``params``, so a wider merge runs too."""

    def layer_order(self) -> list[NeuronLayer]:
        """The layers to align, in forward order."""
        ...

    def features(self, params: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
        """Post-activation features of ``layer`` under ``params``, shape (n, width)."""
        ...

    def layer_inputs(self, params: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
        """Inputs of ``layer``'s weight under ``params``, shape (n, in)."""
        ...


class LinearUnit(NamedTuple):
    """One linear weight that pleas's least squares re-solves where no single weight produces a
    ``NeuronLayer`` (a transformer's q/k/v, o_proj, gate/up, down_proj): ``weight`` (out, in)
    and ``bias``; ``layer`` is the neuron layer whose map moves its rows (outputs); units with
    the same ``source`` see the same inputs (q, k and v), so one capture serves them all."""

    weight: str
    bias: str | None
    layer: str
    source: str


@runtime_checkable
class LinearUnitProbe(FeatureProbe, Protocol):
    """A ``FeatureProbe`` that also gives the inputs of each ``LinearUnit`` (pleas step 3 for
    transformers). ``linear_units()`` lists them in forward order; ``unit_inputs(params,
    sources)`` runs ``params`` once and returns each named source's inputs (n, in)."""

    def linear_units(self) -> list[LinearUnit]:
        """The linear units to re-solve, in forward order."""
        ...

    def unit_inputs(
        self, params: Mapping[str, torch.Tensor], sources: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Inputs (n, in) of every unit source in ``sources`` under ``params``."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    """Scores a merged state dict; registered under the ``ckreg.evaluators`` entry-point group."""

    name: str

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Metrics (name -> value) of one model."""
        ...

    def objective(self) -> Objective:
        """The proxy-set loss used by data-informed methods (fw)."""
        ...

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diagonal Fisher estimate per parameter (for the fisher method)."""
        ...
