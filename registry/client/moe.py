"""Register an MoE built by ``ckreg moe build`` with lineage to every expert it was built from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def register_moe(
    path: Path,
    *,
    base_id: int | None,
    expert_ids: Sequence[int],
    name: str | None = None,
    url: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload the MoE folder ``path`` as a merged checkpoint; the registry links each expert id
    (``metadata["moe_experts"]``) and the base (``metadata["moe_base"]``) as lineage parents and
    refuses ids it does not know."""
    from registry.client.cli import _client

    with _client(url, token) as client:
        return client.register(
            path,
            name=name or Path(path).name,
            kind="merged",
            # not base_id: the registry checks a base's tensors against its children's, and an
            # MoE's differ from its dense base's; the lineage edge comes from "moe_base"
            metadata={
                "moe_experts": list(expert_ids),
                **({"moe_base": base_id} if base_id is not None else {}),
                "built_by": "ckreg moe build",
            },
            progress=False,
        )


def register_compressed(
    path: Path,
    *,
    source_id: int,
    metrics: dict[str, float],
    name: str | None = None,
    url: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload an MoE with merged experts as a merged checkpoint, child (lineage ``input``) of
    ``source_id``, with ``metrics`` (experts before/after, bytes saved)."""
    from registry.client.cli import _client

    with _client(url, token) as client:
        return client.register(
            path,
            name=name or Path(path).name,
            kind="merged",
            metadata={"moe_compressed_from": source_id, "built_by": "ckreg moe compress"},
            metrics=metrics,
            progress=False,
        )
