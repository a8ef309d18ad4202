"""Pure math of merging models that share no base: neuron matching, optimal transport, fusion
through alignment maps and PLeaS's per-layer least squares.

An alignment map ``E_k`` (m x n_k) says how merged neuron r is made of model k's neurons:
a 0/1 assignment for permutations (PLeaS, exact OT) or n·T for a soft transport plan T
(OT fusion, rows summing to 1). Rows of a layer's tensors are mapped ``E_k @ rows`` and
averaged over the models that contribute to each merged neuron; the next layer's input
columns are mapped ``cols @ E_kᵀ``. Papers: PLeaS https://arxiv.org/abs/2407.02447,
OT fusion https://arxiv.org/abs/2310.05719 (and Singh & Jaggi, arXiv 1910.05653).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mergeops.sources import NeuronLayer

Params = Mapping[str, torch.Tensor]


def correlation(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (n_a, n_b) between the columns of two (samples, width) matrices;
    a constant (dead) neuron correlates 0 with everything."""
    a = features_a.double() - features_a.double().mean(dim=0)
    b = features_b.double() - features_b.double().mean(dim=0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.T @ b


def match_neurons(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation π maximising Σ_i similarity[i, π(i)] (Hungarian; square input):
    reference neuron i is matched with neuron π[i] of the other model."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = similarity.shape
    if rows != cols:
        raise ValueError(f"neuron matching needs equal widths, got {rows} and {cols}")
    _, perm = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(perm, dtype=torch.long)


def sinkhorn(cost: torch.Tensor, reg: float, iters: int = 200) -> torch.Tensor:
    """Entropic OT plan T (n_a, n_b) between uniform marginals for ``cost`` (log domain):
    rows sum to 1/n_a, columns to 1/n_b. ``reg`` is relative to the mean cost."""
    cost = cost.double()
    scaled = cost / (reg * cost.abs().mean().clamp_min(1e-12))
    n_a, n_b = cost.shape
    log_a = torch.full((n_a,), -math.log(n_a), dtype=torch.float64)
    log_b = torch.full((n_b,), -math.log(n_b), dtype=torch.float64)
    f = torch.zeros(n_a, dtype=torch.float64)
    g = torch.zeros(n_b, dtype=torch.float64)
    for _ in range(iters):
        f = log_a - torch.logsumexp(g[None, :] - scaled, dim=1)
        g = log_b - torch.logsumexp(f[:, None] - scaled, dim=0)
    return torch.exp(f[:, None] + g[None, :] - scaled)


def activation_cost(features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance (n_a, n_b) between neurons' activation vectors."""
    return torch.cdist(features_a.double().T, features_b.double().T).pow(2)


def grouped(features: torch.Tensor, group: int) -> torch.Tensor:
    """Features (n, G·g) of G blocks of g neurons as (n·g, G): one column per block, so
    blocks (attention heads) are matched as wholes."""
    n, width = features.shape
    blocks = features.reshape(n, width // group, group)
    return blocks.permute(0, 2, 1).reshape(n * group, width // group)


def expand_map(block_map: torch.Tensor, group: int) -> torch.Tensor:
    """A map between blocks (M x G) as a map between their neurons: ``block_map`` ⊗ I_g."""
    eye = torch.eye(group, dtype=block_map.dtype)
    return torch.kron(block_map, eye)


def permutation_map(perm: torch.Tensor) -> torch.Tensor:
    """The 0/1 map E (n x n) with E[i, perm[i]] = 1."""
    n = perm.numel()
    out = torch.zeros(n, n, dtype=torch.float64)
    out[torch.arange(n), perm] = 1.0
    return out


def partial_match_maps(similarity: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PLeaS's maps for two models to ``width`` merged neurons (n ≤ width ≤ 2n).

    Of the Hungarian pairs the 2n - width most similar are merged; the other neurons of
    both models are kept on their own. Returns (E_a, E_b), each (width, n)."""
    n = similarity.shape[0]
    if not n <= width <= 2 * n:
        raise ValueError(f"PLeaS width {width} outside [{n}, {2 * n}] (model width {n})")
    perm = match_neurons(similarity)
    scores = similarity[torch.arange(n), perm]
    order = torch.argsort(scores, descending=True, stable=True)
    merged, alone = order[: 2 * n - width], order[2 * n - width :]
    alone_b = torch.tensor(sorted(set(range(n)) - set(perm[merged].tolist())), dtype=torch.long)
    e_a = torch.zeros(width, n, dtype=torch.float64)
    e_b = torch.zeros(width, n, dtype=torch.float64)
    pairs = torch.sort(merged).values
    k = pairs.numel()
    e_a[torch.arange(k), pairs] = 1.0
    e_b[torch.arange(k), perm[pairs]] = 1.0
    alone_a = torch.sort(alone).values
    e_a[k + torch.arange(alone_a.numel()), alone_a] = 1.0
    e_b[k + alone_a.numel() + torch.arange(alone_b.numel()), alone_b] = 1.0
    return e_a, e_b


def fuse(
    models: Sequence[Params],
    layers: Sequence[NeuronLayer],
    maps: Mapping[str, Sequence[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Merge ``models`` through alignment maps ``maps[layer][k]`` (m x n_k).

    Every floating tensor is first column-mapped by the layer whose ``cols`` it is in, then,
    if it is in a layer's ``rows``, row-mapped and divided by the number (or mass) of models
    behind each merged neuron; tensors in no layer's rows are averaged over the models."""
    row_of = {name: layer.name for layer in layers for name in layer.rows}
    col_of = {name: layer.name for layer in layers for name in layer.cols}
    merged: dict[str, torch.Tensor] = {}
    for key, ref in models[0].items():
        if not ref.is_floating_point():
            merged[key] = ref
            continue
        mapped = []
        for k, model in enumerate(models):
            tensor = model[key].double()
            if key in col_of:
                tensor = tensor @ maps[col_of[key]][k].T if tensor.dim() == 2 else tensor
            if key in row_of:
                e_k = maps[row_of[key]][k]
                tensor = (e_k @ tensor.reshape(tensor.shape[0], -1)).reshape(
                    e_k.shape[0], *tensor.shape[1:]
                )
            mapped.append(tensor)
        total = torch.stack(mapped).sum(dim=0)
        if key in row_of:
            mass = torch.stack([e.sum(dim=1) for e in maps[row_of[key]]]).sum(dim=0)
            shape = (-1,) + (1,) * (total.dim() - 1)
            merged[key] = (total / mass.clamp_min(1e-12).reshape(shape)).float()
        else:
            merged[key] = (total / len(models)).float()
    return merged


def least_squares_layer(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: bool,
    ridge: float,
    prior: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) minimising ‖inputs·Wᵀ + b - targets‖² + ridge·n·‖(W, b) - prior‖² (PLeaS's
    per-layer step; ``prior`` (W₀, b₀) defaults to zero, so the ridge pulls towards it:
    directions the inputs never span keep the prior's weights).

    ``inputs`` (n, in), ``targets`` (n, out); solved in float64 through the normal
    equations (lstsq when they are singular)."""
    x = inputs.double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    strength = ridge * x.shape[0]
    gram = x.T @ x + strength * torch.eye(x.shape[1], dtype=torch.float64)
    rhs = x.T @ targets.double()
    if prior is not None and strength > 0:
        w0, b0 = prior
        rows = [w0.double().T] + ([_bias_row(b0, w0)] if bias else [])
        rhs = rhs + strength * torch.cat(rows, dim=0)
    solution, info = torch.linalg.solve_ex(gram, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(gram, rhs).solution
    weight = solution[: inputs.shape[1]].T.float()
    return (weight, solution[-1].float()) if bias else (weight, None)


def _bias_row(b0: torch.Tensor | None, w0: torch.Tensor) -> torch.Tensor:
    if b0 is None:
        return torch.zeros(1, w0.shape[0], dtype=torch.float64)
    return b0.double()[None, :]


def linear_output(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """inputs·Wᵀ + b in float64: (n, out)."""
    out = inputs.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def relative_error(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """‖outputs - targets‖² / ‖targets - mean‖²: the unexplained share of the targets."""
    targets = targets.double()
    spread = (targets - targets.mean(dim=0)).pow(2).sum().clamp_min(1e-24)
    return float((outputs.double() - targets).pow(2).sum() / spread)


def preactivation(params: Params, layer: NeuronLayer, inputs: torch.Tensor) -> torch.Tensor:
    """inputs·Wᵀ + b of ``layer`` under ``params``: (n, width)."""
    if layer.weight is None:
        raise ValueError(f"layer '{layer.name}' has no weight to solve for")
    out = inputs.double() @ params[layer.weight].double().T
    if layer.bias is not None:
        out = out + params[layer.bias].double()
    return out


def mapped_targets(preacts: Sequence[torch.Tensor], maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each merged neuron's target: the mass-weighted mean of its models' neurons (n, m)."""
    total = sum((p @ e.T for p, e in zip(preacts, maps, strict=True)), torch.zeros(1))
    mass = torch.stack([e.sum(dim=1) for e in maps]).sum(dim=0).clamp_min(1e-12)
    return total / mass
