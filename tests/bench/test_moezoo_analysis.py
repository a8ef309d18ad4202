"""bench.moezoo's analysis: why a halving kept less than 90 %, read from its expert groups."""

from __future__ import annotations

from bench.moezoo.run import why


def test_why_names_lost_routing_and_groups_that_mix_tasks() -> None:
    # 4 distinct experts -> 2 with top-2 routing; expert e serves TASKS[e % 4]
    row = {"experts_after": 2, "groups": {0: [[0, 2], [3, 1]], 1: [[1], [3, 0, 2]]}}
    text = why(row)
    assert "every token uses every expert" in text
    assert "layer 0: 2 of 2 merged experts mix tasks (reverse+shift; copy+sort)" in text
    assert "layer 1: 1 of 2 merged experts mix tasks" in text and "for reverse, shift, copy" in text


def test_twin_groups_are_not_blamed() -> None:
    # 8 experts (two per task, seed-major) -> 4 twin pairs
    row = {"experts_after": 4, "groups": {0: [[0, 4], [1, 5], [2, 6], [7, 3]]}}
    assert why(row) == "groups keep tasks apart"
    groups = {0: [[1], [3], [5], [7, 0, 2, 4, 6]]}
    paper = {"model": "mc_smoe 8->4", "experts_after": 4, "groups": groups}
    assert "both experts of copy, sort lead a group" in why(paper)
