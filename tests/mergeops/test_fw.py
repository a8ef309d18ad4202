"""FW-Merging (hard): oracle picks on a quadratic objective, layer granularity, streaming."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import save_file

import mergeops
from mergeops.io import ShardedCheckpoint
from mergeops.methods.base import MergeError
from mergeops.ops.frank_wolfe import Candidate, frank_wolfe_merge, linear_oracle


class Quadratic:
    """f(θ) = Σ_l ‖θ_l - target_l‖²: minimised by the target, gradient 2(θ - target)."""

    def __init__(self, target: Mapping[str, torch.Tensor]) -> None:
        self.target = dict(target)

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(((params[k] - t) ** 2).sum() for k, t in self.target.items())  # type: ignore[return-value]


class _Params(dict):
    """A dict that supports weak references, so tests can count live candidates."""


class Pool:
    """Candidates that load on demand and report how many are alive at once."""

    def __init__(self, models: dict[str, dict[str, torch.Tensor]]) -> None:
        self.models = models
        self.alive = 0
        self.max_alive = 0
        self.loads = 0

    def _release(self) -> None:
        self.alive -= 1

    def loader(self, name: str):
        def load() -> _Params:
            params = _Params({k: t.clone() for k, t in self.models[name].items()})
            self.alive += 1
            self.loads += 1
            self.max_alive = max(self.max_alive, self.alive)
            weakref.finalize(params, self._release)
            return params

        return load

    def candidates(self) -> list[Candidate]:
        return [Candidate(name, self.loader(name)) for name in self.models]


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


BASE = {"a": torch.zeros(3), "b": torch.zeros(2)}
TARGET = {"a": _t(1.0, 2.0, 0.0), "b": _t(0.0, 1.0)}


def test_oracle_picks_the_aligned_candidate_hand_computed() -> None:
    # θ = TA start 0.3·Σ τ = {a: [0, 0, 1.5], b: [.9, 0]} -> g = 2(θ - target) = {a: [-2,-4,3],
    # b: [1.8,-2]}. cos sums: good = -10/√145 - 2/√7.24 ≈ -1.57; irrelevant ≈ +0.56 + 0.67;
    # opposite ≈ +1.57 -> the oracle picks "good".
    pool = Pool(
        {
            "irrelevant": {"a": _t(0.0, 0.0, 5.0), "b": _t(3.0, 0.0)},
            "good": dict(TARGET),
            "opposite": {k: -t for k, t in TARGET.items()},
        }
    )
    grad = {"a": _t(-2.0, -4.0, 3.0), "b": _t(1.8, -2.0)}
    picks = linear_oracle(grad, BASE, pool.candidates())
    assert picks == {"a": 1, "b": 1}


def test_fw_ignores_irrelevant_candidates_and_lowers_the_loss() -> None:
    pool = Pool(
        {
            "irrelevant": {"a": _t(0.0, 0.0, 5.0), "b": _t(3.0, 0.0)},
            "good": dict(TARGET),
            "opposite": {k: -t for k, t in TARGET.items()},
        }
    )
    result = frank_wolfe_merge(base=BASE, candidates=pool.candidates(), objective=Quadratic(TARGET))
    assert len(result.picks) == 10
    assert all(set(p.values()) == {"good"} for p in result.picks)
    assert all(b < a for a, b in zip(result.losses, result.losses[1:], strict=False))
    final = Quadratic(TARGET).loss(result.params).item()
    assert final < result.losses[0]


def test_layer_granularity_picks_per_layer_hand_computed() -> None:
    # A is right on layer a and wrong on b, B the reverse; the TA start is 0 (they cancel).
    # Each step moves θ_l toward the pick's θ_l = target_l, so after T steps
    # θ = target · (1 - Π_t (1 - gamma_t)) with gamma_t = 0.1·2/(t+2).
    pool = Pool(
        {
            "A": {"a": TARGET["a"], "b": -TARGET["b"]},
            "B": {"a": -TARGET["a"], "b": TARGET["b"]},
        }
    )
    result = frank_wolfe_merge(
        base=BASE,
        candidates=pool.candidates(),
        objective=Quadratic(TARGET),
        granularity="layer",
        max_iters=4,
    )
    assert result.picks == [{"a": "A", "b": "B"}] * 4
    keep = 1.0
    for t in range(4):
        keep *= 1 - 0.2 / (t + 2)
    for key, target in TARGET.items():
        assert torch.allclose(result.params[key], target * (1 - keep), atol=1e-6)


def test_memory_is_constant_in_pool_size() -> None:
    gen = torch.Generator().manual_seed(0)
    models = {
        f"noise-{i}": {k: torch.randn(t.shape, generator=gen) * 0.1 for k, t in BASE.items()}
        for i in range(7)
    }
    models["good"] = dict(TARGET)
    pool = Pool(models)
    result = frank_wolfe_merge(
        base=BASE, candidates=pool.candidates(), objective=Quadratic(TARGET), max_iters=3
    )
    assert pool.max_alive == 1  # never two candidates in memory at once
    assert pool.alive == 0
    # loads: 8 for the start, then per iteration 8 for the oracle + 1 for the step
    assert pool.loads == 8 + 3 * (8 + 1)
    assert result.picks[0] == {"a": "good", "b": "good"}


def test_bad_candidates_are_named() -> None:
    pool = Pool({"ft-2": {"a": torch.zeros(4), "b": torch.zeros(2)}})
    with pytest.raises(ValueError, match=r"'a'.*candidate 'ft-2' \(4,\)"):
        frank_wolfe_merge(base=BASE, candidates=pool.candidates(), objective=Quadratic(TARGET))
    pool = Pool({"ft-3": {"a": torch.zeros(3)}})
    with pytest.raises(KeyError, match="'ft-3' lacks"):
        frank_wolfe_merge(base=BASE, candidates=pool.candidates(), objective=Quadratic(TARGET))


# -- end to end through mergeops.merge / merge_files -------------------------------------------


def _pool_models() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "irrelevant": {"a": _t(0.0, 0.0, 5.0), "b": _t(3.0, 0.0)},
        "good": dict(TARGET),
        "opposite": {k: -t for k, t in TARGET.items()},
    }


def test_merge_fw_matches_the_op_and_keeps_integer_buffers() -> None:
    models = {n: {**m, "n": torch.tensor([4])} for n, m in _pool_models().items()}
    base = {**BASE, "n": torch.tensor([4])}
    merged = mergeops.merge("fw", models, base=base, objective=Quadratic(TARGET))
    expected = frank_wolfe_merge(
        base=BASE, candidates=Pool(_pool_models()).candidates(), objective=Quadratic(TARGET)
    ).params
    for key in ("a", "b"):
        assert torch.allclose(merged[key], expected[key], atol=1e-6)
    assert torch.equal(merged["n"], torch.tensor([4]))


def test_merge_files_fw_streams_candidates_from_files(tmp_path) -> None:
    paths = []
    for name, model in _pool_models().items():
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(model, str(paths[-1]))
    save_file(BASE, str(tmp_path / "base.safetensors"))
    result = mergeops.merge_files(
        "fw",
        paths,
        base=tmp_path / "base.safetensors",
        objective=Quadratic(TARGET),
        out_dir=tmp_path / "out",
        params={"granularity": "layer", "max_iters": 3},
        progress=False,
    )
    merged = ShardedCheckpoint(result.out_dir)
    start = Quadratic(TARGET).loss({k: 0.3 * t for k, t in _pool_models()["irrelevant"].items()})
    assert Quadratic(TARGET).loss({k: merged.get(k) for k in ("a", "b")}) < start


def test_merge_fw_needs_base_and_objective() -> None:
    with pytest.raises(MergeError, match="objective"):
        mergeops.merge("fw", _pool_models(), base=BASE)
    with pytest.raises(MergeError, match="base"):
        mergeops.merge("fw", _pool_models(), objective=Quadratic(TARGET))
