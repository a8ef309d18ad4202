"""Lineage edges (parent -> child with a role) and depth-limited graph walks via recursive CTEs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import func, literal
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from registry.errors import InvalidInput
from registry.models import (
    Checkpoint,
    Lineage,
    LineageCreate,
    LineageEdge,
    LineagePublic,
    LineageRole,
)
from registry.services.common import load_checkpoint

MAX_DEPTH = 50


def add_lineage_edges(*, session: Session, edges: Sequence[LineageCreate]) -> list[Lineage]:
    """Insert edges (existing identical edges are kept, not duplicated); returns the rows."""
    rows: list[Lineage] = []
    for edge in edges:
        if edge.parent_id == edge.child_id:
            raise InvalidInput(f"lineage edge from checkpoint {edge.parent_id} to itself")
        load_checkpoint(session, edge.parent_id)
        load_checkpoint(session, edge.child_id)
        query = select(Lineage).where(
            Lineage.parent_id == edge.parent_id,
            Lineage.child_id == edge.child_id,
            Lineage.role == edge.role,
        )
        row = session.exec(query).first()
        if row is None:
            row = Lineage(
                parent_id=edge.parent_id,
                child_id=edge.child_id,
                role=LineageRole(edge.role),
                merge_run_id=edge.merge_run_id,
            )
            session.add(row)
        rows.append(row)
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows


def _walk(
    session: Session, checkpoint_id: int, depth: int, direction: Literal["up", "down"]
) -> list[LineageEdge]:
    """Edges reachable from ``checkpoint_id`` within ``depth`` hops, each at its smallest depth."""
    edge = Lineage.__table__  # type: ignore[attr-defined]
    near, far = ("child_id", "parent_id") if direction == "up" else ("parent_id", "child_id")
    seed = sa_select(
        edge.c.parent_id, edge.c.child_id, edge.c.role, literal(1).label("depth")
    ).where(edge.c[near] == checkpoint_id)
    walk = seed.cte(name=f"lineage_{direction}", recursive=True)
    step = sa_select(
        edge.c.parent_id, edge.c.child_id, edge.c.role, (walk.c.depth + 1).label("depth")
    ).where(edge.c[near] == walk.c[far], walk.c.depth < depth)
    walk = walk.union(step)  # UNION, not ALL: diamonds in the DAG do not multiply rows
    query = (
        sa_select(
            walk.c.parent_id, walk.c.child_id, walk.c.role, func.min(walk.c.depth).label("depth")
        )
        .group_by(walk.c.parent_id, walk.c.child_id, walk.c.role)
        .order_by(func.min(walk.c.depth), walk.c.parent_id, walk.c.child_id)
    )
    return [
        LineageEdge(
            parent_id=row.parent_id,
            child_id=row.child_id,
            role=LineageRole(row.role),
            depth=row.depth,
        )
        for row in session.execute(query)
    ]


def get_lineage(*, session: Session, checkpoint_id: int, depth: int = 5) -> LineagePublic:
    """Ancestors and descendants of a checkpoint up to ``depth`` hops."""
    if not 1 <= depth <= MAX_DEPTH:
        raise InvalidInput(f"lineage depth must be 1..{MAX_DEPTH}, got {depth}")
    load_checkpoint(session, checkpoint_id)
    return LineagePublic(
        checkpoint_id=checkpoint_id,
        ancestors=_walk(session, checkpoint_id, depth, "up"),
        descendants=_walk(session, checkpoint_id, depth, "down"),
    )


def descendant_ids(*, session: Session, checkpoint_id: int, depth: int = MAX_DEPTH) -> set[int]:
    """Ids of every checkpoint downstream of ``checkpoint_id`` within ``depth`` hops."""
    return {edge.child_id for edge in _walk(session, checkpoint_id, depth, "down")}


def dependent_merged(*, session: Session, checkpoint_id: int) -> list[Checkpoint]:
    """Non-deleted merged checkpoints downstream of ``checkpoint_id`` (they block deletion)."""
    ids = descendant_ids(session=session, checkpoint_id=checkpoint_id)
    if not ids:
        return []
    query = (
        select(Checkpoint)
        .where(
            col(Checkpoint.id).in_(ids), Checkpoint.kind == "merged", Checkpoint.status != "deleted"
        )
        .order_by(col(Checkpoint.id))
    )
    return list(session.exec(query).all())
