"""Hand-checkable MC-SMoE / Sub-MoE tensor math on tiny experts."""

from __future__ import annotations

import torch

from mergeops.ops import moe as ops


def _expert(seed: int, inner: int = 5, hidden: int = 4) -> ops.Expert:
    g = torch.Generator().manual_seed(seed)
    return {
        "gate": torch.randn(inner, hidden, generator=g),
        "up": torch.randn(inner, hidden, generator=g),
        "down": torch.randn(hidden, inner, generator=g),
    }


def test_routing_frequency_counts_top_k_choices() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, 2.0, 3.0, -1.0], [3.0, 0.0, 2.0, 1.0]])
    torch.testing.assert_close(ops.routing_frequency(logits, 2), torch.tensor([2, 2, 2, 0]) / 3)


def test_group_by_dominant_joins_most_similar_leader() -> None:
    frequency = torch.tensor([0.5, 0.1, 0.3, 0.1])
    similarity = torch.eye(4)
    similarity[1, 2] = similarity[2, 1] = 0.9
    similarity[3, 0] = similarity[0, 3] = 0.8
    assert ops.group_by_dominant(frequency, similarity, 2) == [[0, 3], [2, 1]]


def test_group_balanced_makes_equal_groups() -> None:
    frequency = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    similarity = torch.eye(6)
    for a, b in [(0, 2), (0, 3), (1, 4), (1, 5), (0, 4)]:
        similarity[a, b] = similarity[b, a] = 0.9
    assert ops.group_balanced(frequency, similarity, 2) == [[0, 2, 3], [1, 4, 5]]


def test_alignment_undoes_a_permutation_and_keeps_the_function() -> None:
    reference = _expert(0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = {
        "gate": reference["gate"][perm],
        "up": reference["up"][perm],
        "down": reference["down"][:, perm],
    }
    aligned = ops.align_to(reference, shuffled)
    for p in ops.PROJECTIONS:
        torch.testing.assert_close(aligned[p], reference[p])
    x = torch.randn(3, 4)
    act = torch.nn.functional.silu
    torch.testing.assert_close(
        ops.expert_output(shuffled, x, act), ops.expert_output(reference, x, act)
    )


def test_weighted_merge_by_frequency() -> None:
    a, b = _expert(1), _expert(2)
    merged = ops.weighted_merge([a, b], torch.tensor([0.3, 0.1]))
    torch.testing.assert_close(merged["up"], 0.75 * a["up"] + 0.25 * b["up"])


def test_sub_moe_full_rank_is_the_frequency_average_and_low_rank_is_rank_r() -> None:
    a, b = _expert(1), _expert(2)
    frequency = torch.tensor([0.6, 0.2])
    full = ops.sub_moe_merge([a, b], frequency, rank=None)
    torch.testing.assert_close(full["gate"], 0.75 * a["gate"] + 0.25 * b["gate"], atol=1e-5, rtol=0)
    low = ops.shared_basis_merge([a["gate"], b["gate"]], frequency, rank=2)
    assert torch.linalg.matrix_rank(low) == 2


def test_low_rank_plus_sparse_keeps_the_largest_residuals() -> None:
    weight = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    torch.testing.assert_close(
        ops.low_rank_plus_sparse(weight, 1, 0.0), torch.diag(torch.tensor([4.0, 0, 0]))
    )
    torch.testing.assert_close(
        ops.low_rank_plus_sparse(weight, 1, 1 / 9), torch.diag(torch.tensor([4.0, 2, 0]))
    )


def test_farthest_leaders_and_centered_similarity_find_twins() -> None:
    """Four experts = a shared part + one of two task deltas: the twins pair up only once the
    shared part is removed, and leaders are taken from different twin pairs."""
    shared = torch.full((6,), 5.0)
    a, b = torch.tensor([1.0, -1, 0, 0, 0, 0]), torch.tensor([0, 0, 1.0, -1, 0, 0])
    outputs = torch.stack([shared + a, shared + b, shared + a * 1.1, shared + b * 0.9])
    similarity = ops.centered_cosine_matrix(outputs)
    assert ops.cosine_matrix(outputs).min() > 0.9  # plain cosine: everything looks alike
    frequency = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert ops.farthest_leaders(frequency, similarity, 2) == [0, 1]
    assert ops.group_balanced(frequency, similarity, 2) == [[0, 2], [1, 3]]


def test_diverse_leaders_keep_twins_apart_where_the_most_used_do_not() -> None:
    """Twins 0/2 are used most: the paper's rule makes both leaders and merges 1 with 3's
    unlike twin; farthest-point leaders on centred similarity pair the twins."""
    shared = torch.full((6,), 5.0)
    a, b = torch.tensor([1.0, -1, 0, 0, 0, 0]), torch.tensor([0, 0, 1.0, -1, 0, 0])
    logits = torch.stack([shared + a, shared + b, shared + a * 1.1, shared + b * 0.9])
    frequency = torch.tensor([0.4, 0.1, 0.4, 0.1])
    assert ops.group_by_dominant(frequency, ops.cosine_matrix(logits), 2)[0][0] == 0
    assert [g[0] for g in ops.group_by_dominant(frequency, ops.cosine_matrix(logits), 2)] == [0, 2]
    similarity = ops.centered_cosine_matrix(logits)
    leaders = ops.farthest_leaders(frequency, similarity, 2)
    assert ops.group_around(leaders, similarity) == [[0, 2], [1, 3]]
