"""A test evaluator that parks the first merge inside the GPU slot (``ckreg-test-slot-holder``).

adamerging asks the evaluator for its unlabeled objective inside the merge's GPU concurrency
slot. The first call (no marker file yet at ``$SLOT_HOLDER_MARKER``) writes the marker and
sleeps, so a test can kill the flow while it holds the slot; later calls return the squared
norm of the parameters at once, so the next attempt completes the merge.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MARKER_VAR = "SLOT_HOLDER_MARKER"
ENTRY_POINT = "ckreg-test-slot-holder = tests.flows.slot_holder:SlotHolder"


class _SquaredNorm:
    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum((t.float() ** 2).sum() for t in params.values())  # type: ignore[return-value]


class SlotHolder:
    name = "ckreg-test-slot-holder"

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        flat = torch.cat([t.float().reshape(-1) for t in state_dict.values()])
        return {"l2_norm": float(flat.norm())}

    def objective(self) -> Any:
        raise NotImplementedError("the slot holder has only an unlabeled objective")

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.ones_like(v) for k, v in state_dict.items()}

    def unlabeled_objective(self) -> Any:
        marker = Path(os.environ[MARKER_VAR])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(600)  # killed here, holding the slot
        return _SquaredNorm()


def install(root: Path) -> Path:
    """Declare the evaluator's entry point in a tiny distribution under ``root``; returns the
    folder to put on ``sys.path`` / ``PYTHONPATH``."""
    dist = root / "ckreg_slot_holder-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ckreg-slot-holder\nVersion: 0.0.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[ckreg.evaluators]\n{ENTRY_POINT}\n")
    return root
