"""Lineage: edges, depth-limited ancestors/descendants via recursive CTEs, fast at 10k checkpoints."""

from __future__ import annotations

import itertools
import time

import pytest
from sqlalchemy import insert
from sqlmodel import col, select

from registry.errors import InvalidInput, NotFound
from registry.models import Checkpoint, CheckpointCreate, Lineage, LineageCreate
from registry.services import add_lineage_edges, create_checkpoint, get_lineage
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, Env


def _chain(env: Env, n: int) -> list[int]:
    with env.session() as session:
        ids = [
            create_checkpoint(
                session=session, data=CheckpointCreate(name=f"c{i}", kind="merged")
            ).id
            or 0
            for i in range(n)
        ]
        add_lineage_edges(
            session=session,
            edges=[
                LineageCreate(parent_id=a, child_id=b, role="input")
                for a, b in itertools.pairwise(ids)
            ],
        )
    return ids


def test_depth_limited_walks(env: Env) -> None:
    ids = _chain(env, 8)
    with env.session() as session:
        # a diamond: c0 -> c3 directly as well, and a mask edge
        add_lineage_edges(
            session=session, edges=[LineageCreate(parent_id=ids[0], child_id=ids[3], role="mask")]
        )
        again = add_lineage_edges(
            session=session, edges=[LineageCreate(parent_id=ids[0], child_id=ids[3], role="mask")]
        )
        assert len(again) == 1, "an identical edge is not duplicated"
        lineage = get_lineage(session=session, checkpoint_id=ids[4], depth=2)
        assert [(e.parent_id, e.child_id, e.depth) for e in lineage.ancestors] == [
            (ids[3], ids[4], 1),
            (ids[0], ids[3], 2),
            (ids[2], ids[3], 2),
        ]
        assert [(e.parent_id, e.child_id, e.depth) for e in lineage.descendants] == [
            (ids[4], ids[5], 1),
            (ids[5], ids[6], 2),
        ]
        full = get_lineage(session=session, checkpoint_id=ids[7], depth=50)
        assert (
            len(full.ancestors) == 8
            and min(e.depth for e in full.ancestors if e.parent_id == ids[0]) == 5
        )
        with pytest.raises(InvalidInput, match="depth"):
            get_lineage(session=session, checkpoint_id=ids[0], depth=0)
        with pytest.raises(NotFound):
            add_lineage_edges(
                session=session,
                edges=[LineageCreate(parent_id=ids[0], child_id=999_999, role="input")],
            )


def test_lineage_endpoint(api: Api) -> None:
    ids = _chain(api.env, 3)
    body = api.client.get(f"/api/v1/checkpoints/{ids[1]}/lineage", params={"depth": 5}).json()
    assert body["checkpoint_id"] == ids[1]
    assert body["ancestors"] == [
        {"parent_id": ids[0], "child_id": ids[1], "role": "input", "depth": 1}
    ]
    assert body["descendants"] == [
        {"parent_id": ids[1], "child_id": ids[2], "role": "input", "depth": 1}
    ]
    assert (
        api.client.get(f"/api/v1/checkpoints/{ids[1]}/lineage", params={"depth": 99}).status_code
        == 422
    )


def test_five_levels_stay_fast_with_10k_checkpoints(env: Env) -> None:
    n = 10_000
    with env.session() as session:
        session.execute(
            insert(Checkpoint),
            [
                {
                    "name": f"m{i}",
                    "kind": "merged",
                    "tags": [],
                    "meta": {},
                    "status": "ready",
                    "total_bytes": 0,
                }
                for i in range(n)
            ],
        )
        session.commit()
        first = session.exec(select(Checkpoint.id).order_by(col(Checkpoint.id))).first()
        ids = list(range(first, first + n))
        # each checkpoint i has parents 2i+1 and 2i+2 (a binary tree of merges), plus a long chain
        edges = [
            {"parent_id": ids[c], "child_id": ids[i], "role": "input"}
            for i in range(n)
            for c in (2 * i + 1, 2 * i + 2)
            if c < n
        ]
        edges += [
            {"parent_id": ids[i], "child_id": ids[i + 1], "role": "state"} for i in range(n - 1)
        ]
        session.execute(insert(Lineage), edges)
        session.commit()
        start = time.perf_counter()
        lineage = get_lineage(session=session, checkpoint_id=ids[0], depth=5)
        elapsed = time.perf_counter() - start
    assert len({e.parent_id for e in lineage.ancestors if e.role == "input"}) == 2 + 4 + 8 + 16 + 32
    assert max(e.depth for e in lineage.ancestors) == 5
    assert elapsed < 1.0, f"lineage took {elapsed:.2f}s"
