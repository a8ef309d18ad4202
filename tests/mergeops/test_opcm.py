"""OPCM continual merging: projection, folds, lambda scaling and the saved state."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

import mergeops
from mergeops.io import ShardedCheckpoint
from mergeops.methods.base import MergeError
from mergeops.methods.continual.opcm import load_opcm_state  # also registers opcm
from mergeops.ops.opcm import (
    fold,
    merged_model,
    project_task_vector,
    split_rank,
    state_from_tensors,
    state_to_tensors,
)


def test_split_rank_is_first_index_over_alpha() -> None:
    # S = [4, 3, 1]: cumsum/ΣS = [.5, .875, 1]
    s = torch.tensor([4.0, 3.0, 1.0])
    assert split_rank(s, 0.4) == 0
    assert split_rank(s, 0.6) == 1
    assert split_rank(s, 0.9) == 2
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_projection_hand_computed() -> None:
    # τ̄ = diag(4, 3, 1): U = V = I, S = [4, 3, 1]. τ = [[1,2,3],[4,5,6],[7,8,9]].
    # alpha .6 -> r = 1: only diag(P) zeroed.  alpha .9 -> r = 2: P[:2,:2] zeroed as well.
    merged = torch.diag(torch.tensor([4.0, 3.0, 1.0]))
    tv = torch.arange(1.0, 10.0).reshape(3, 3)
    r1 = torch.tensor([[0.0, 2, 3], [4, 0, 6], [7, 8, 0]])
    r2 = torch.tensor([[0.0, 0, 3], [0, 0, 6], [7, 8, 0]])
    assert torch.allclose(project_task_vector(merged, tv, 0.6), r1, atol=1e-5)
    assert torch.allclose(project_task_vector(merged, tv, 0.9), r2, atol=1e-5)
    # 1-D tensors and a zero τ̄ are not projected
    assert torch.equal(project_task_vector(torch.ones(3), torch.ones(3), 0.5), torch.ones(3))
    assert torch.equal(project_task_vector(torch.zeros(3, 3), tv, 0.5), tv)


def test_projection_equals_full_svd_formula_on_non_square() -> None:
    gen = torch.Generator().manual_seed(3)
    merged = torch.randn(5, 2, generator=gen) @ torch.randn(2, 3, generator=gen)  # rank 2
    tv = torch.randn(5, 3, generator=gen)
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    p = u.T @ tv @ vh.T
    rank = split_rank(s, 0.5)
    p.diagonal().zero_()
    p[:rank, :rank] = 0
    assert torch.allclose(project_task_vector(merged, tv, 0.5), u @ p @ vh, atol=1e-5)


def _models():
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    m1 = {"w": torch.diag(torch.tensor([2.0, 0.0])), "b": torch.zeros(2)}
    m2 = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    m3 = {"w": torch.tensor([[0.0, -1.0], [2.0, 1.0]]), "b": torch.tensor([0.5, -1.0])}
    return base, m1, m2, m3


def test_two_folds_hand_computed() -> None:
    base, m1, m2, _ = _models()
    # fold 1: θ = θ1, λ = 1, Σ‖τ‖ = ‖diag(2, 0)‖ = 2
    s1 = fold(None, base=base, model=m1, name="ft-1")
    assert (s1.lam, s1.norm_sum, s1.order) == (1.0, 2.0, ["ft-1"])
    assert torch.equal(merged_model(s1, base)["w"], m1["w"])
    # fold 2: τ̄ = diag(2, 0) -> U = V = ±I, S = [2, 0], r = 0; P = ones with diag zeroed
    # τ̃_w = [[0,1],[1,0]], τ̃_b = [1,1]; u = 1·τ̄ + τ̃ = {w: [[2,1],[1,0]], b: [1,1]}
    # ‖u‖ = √8, ‖τ2‖ = √6, λ2 = √8 / ((2 + √6)/2)
    s2 = fold(s1, base=base, model=m2, name="ft-2")
    lam = math.sqrt(8) / ((2 + math.sqrt(6)) / 2)
    assert s2.lam == pytest.approx(lam, rel=1e-6)
    assert s2.norm_sum == pytest.approx(2 + math.sqrt(6), rel=1e-6)
    assert s2.order == ["ft-1", "ft-2"] and s2.count == 2
    merged = merged_model(s2, base)
    assert torch.allclose(merged["w"], torch.tensor([[2.0, 1.0], [1.0, 0.0]]) / lam, atol=1e-6)
    assert torch.allclose(merged["b"], torch.ones(2) / lam, atol=1e-6)
    # the first state is untouched by the second fold
    assert torch.equal(s1.task_vector["w"], m1["w"])


def test_state_round_trip_between_folds_matches_in_memory(tmp_path) -> None:
    base, m1, m2, m3 = _models()
    in_memory = fold(
        fold(fold(None, base=base, model=m1, name="a"), base=base, model=m2, name="b"),
        base=base,
        model=m3,
        name="c",
    )
    state = None
    for name, model in [("a", m1), ("b", m2), ("c", m3)]:
        state = fold(state, base=base, model=model, name=name, alpha=0.5)
        tensors, metadata = state_to_tensors(state)
        (tmp_path / "state.safetensors").write_bytes(save(tensors, metadata=metadata))
        from safetensors import safe_open

        with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as handle:
            stored_metadata = handle.metadata()
        state = state_from_tensors(
            load((tmp_path / "state.safetensors").read_bytes()), stored_metadata
        )
    assert state is not None
    assert state.order == ["a", "b", "c"] and state.lam == in_memory.lam
    assert state.norm_sum == in_memory.norm_sum
    for key in base:
        assert torch.equal(state.task_vector[key], in_memory.task_vector[key])


def test_fold_rejects_repeats_and_mismatches() -> None:
    base, m1, m2, _ = _models()
    s1 = fold(None, base=base, model=m1, name="ft-1")
    with pytest.raises(ValueError, match="'ft-1' was already folded"):
        fold(s1, base=base, model=m1, name="ft-1")
    with pytest.raises(ValueError, match=r"'w'.*model 'ft-2' \(3, 2\)"):
        fold(s1, base=base, model={**m2, "w": torch.ones(3, 2)}, name="ft-2")
    with pytest.raises(KeyError, match="'ft-2' lacks tensor 'b'"):
        fold(s1, base=base, model={"w": m2["w"]}, name="ft-2")
    with pytest.raises(ValueError, match="format"):
        state_from_tensors({}, {})


# -- end to end through mergeops.merge / merge_files -------------------------------------------


def test_merge_opcm_folds_one_run_at_a_time_and_persists_state(tmp_path) -> None:
    base, m1, m2, _ = _models()
    base = {**base, "n": torch.tensor([1])}
    state_path = tmp_path / "opcm-state.safetensors"
    first = mergeops.merge(
        "opcm", {"ft-1": m1 | {"n": torch.tensor([1])}}, base=base, state_path=state_path
    )
    assert torch.equal(first["w"], m1["w"]) and torch.equal(first["n"], torch.tensor([1]))
    assert load_opcm_state(state_path).order == ["ft-1"]
    second = mergeops.merge(
        "opcm", {"ft-2": m2 | {"n": torch.tensor([1])}}, base=base, state_path=state_path
    )
    expected = fold(
        fold(None, base=_models()[0], model=m1, name="ft-1"),
        base=_models()[0],
        model=m2,
        name="ft-2",
    )
    for key in ("w", "b"):
        assert torch.allclose(second[key], merged_model(expected, _models()[0])[key], atol=1e-6)
    state = load_opcm_state(state_path)
    assert state.order == ["ft-1", "ft-2"]
    assert state.lam == pytest.approx(expected.lam, rel=1e-6)
    with pytest.raises(MergeError, match="'ft-1' was already folded"):
        mergeops.merge(
            "opcm", {"ft-1": m1 | {"n": torch.tensor([1])}}, base=base, state_path=state_path
        )
    assert load_opcm_state(state_path).order == ["ft-1", "ft-2"]  # failed run changed nothing


def test_merge_files_opcm_several_models_in_one_run_equals_sequential(tmp_path) -> None:
    base, m1, m2, m3 = _models()
    result = mergeops.merge_files(
        "opcm",
        {"a": m1, "b": m2, "c": m3},
        base=base,
        out_dir=tmp_path / "out",
        state_path=tmp_path / "state.safetensors",
        progress=False,
    )
    sequential = None
    for name, model in [("a", m1), ("b", m2), ("c", m3)]:
        sequential = fold(sequential, base=base, model=model, name=name)
    assert sequential is not None
    merged = ShardedCheckpoint(result.out_dir)
    for key, tensor in merged_model(sequential, base).items():
        assert torch.allclose(merged.get(key), tensor, atol=1e-6)
    assert load_opcm_state(result.state_path).order == ["a", "b", "c"]


def test_merge_opcm_rejects_a_different_alpha_and_mismatched_state(tmp_path) -> None:
    base, m1, m2, _ = _models()
    state_path = tmp_path / "state.safetensors"
    mergeops.merge("opcm", {"ft-1": m1}, base=base, state_path=state_path)
    with pytest.raises(MergeError, match=r"alpha 0\.5, params ask 0\.7"):
        mergeops.merge("opcm", {"ft-2": m2}, base=base, state_path=state_path, alpha=0.7)
    with pytest.raises(MergeError, match="state has tensor 'b' that model 'ft-2' lacks"):
        mergeops.merge(
            "opcm", {"ft-2": {"w": m2["w"]}}, base={"w": base["w"]}, state_path=state_path
        )
