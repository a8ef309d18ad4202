"""Merge input names given to mergeops are unique: duplicates qualified by run, else by id."""

from __future__ import annotations

from flows.model_names import unique_model_names
from registry.models import Checkpoint


def checkpoint(id_: int, name: str, run: str | None = None) -> Checkpoint:
    return Checkpoint(id=id_, name=name, run=run, kind="finetune")


def test_duplicates_qualified_by_run_then_id() -> None:
    names = unique_model_names(
        [
            checkpoint(1, "checkpoint-30", "ra"),
            checkpoint(2, "checkpoint-30", "rb"),
            checkpoint(3, "math"),
            checkpoint(4, "checkpoint-60", "ra"),
            checkpoint(5, "checkpoint-60", "ra"),
            checkpoint(6, "checkpoint-60"),
        ]
    )
    assert names == [
        "ra/checkpoint-30",
        "rb/checkpoint-30",
        "math",
        "checkpoint-60#4",
        "checkpoint-60#5",
        "checkpoint-60#6",
    ]
    assert len(set(names)) == len(names)
