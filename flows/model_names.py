"""Names the merge engine gets for a run's inputs: unique even when two Trainer runs both
saved ``checkpoint-30`` (mergeops refuses two models with one name)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from registry.models import Checkpoint


def unique_model_names(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """Checkpoint names, duplicates qualified: ``<run>/<name>`` when that tells them apart,
    else ``<name>#<id>``; names already unique are kept as they are."""
    counts = Counter(c.name for c in checkpoints)
    by_run = Counter(f"{c.run}/{c.name}" for c in checkpoints if counts[c.name] > 1 and c.run)
    names = []
    for checkpoint in checkpoints:
        qualified = f"{checkpoint.run}/{checkpoint.name}"
        if counts[checkpoint.name] == 1:
            names.append(checkpoint.name)
        elif checkpoint.run and by_run[qualified] == 1:
            names.append(qualified)
        else:
            names.append(f"{checkpoint.name}#{checkpoint.id}")
    return names
