"""Policy validation at creation, selection windows and the embedded cron scheduler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from flows import runtime as flow_runtime
from flows.scheduler import CronScheduler
from registry.db import upgrade_database
from registry.errors import InvalidInput
from registry.models import CheckpointCreate, MergePolicyCreate
from registry.services import policies as policy_service
from registry.services.completion import register_directory
from registry.settings import Settings
from tests.flows.fixtures_flows import save_state, tiny_state


@pytest.fixture
def db(database_url: str, tmp_path: Path):
    upgrade_database(database_url)
    settings = Settings(
        home=tmp_path / "home", database_url=database_url, task_vectors_on_complete=False
    )
    runtime = flow_runtime.configure(settings)
    yield runtime
    flow_runtime.reset()


def _register(runtime, tmp: Path, name: str, seed: int, **fields) -> int:
    with Session(runtime.engine, expire_on_commit=False) as session:
        return register_directory(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            data=CheckpointCreate(name=name, kind=fields.pop("kind", "finetune"), **fields),
            directory=save_state(tmp / name, tiny_state(seed)),
        ).id


def _create(runtime, **fields):
    with Session(runtime.engine, expire_on_commit=False) as session:
        return policy_service.create_policy(session=session, data=MergePolicyCreate(**fields))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "tiez"}, "unknown merge method 'tiez'; available: "),
        ({"method": "ties", "params": {"density": 7}}, "density"),
        ({"method": "ties", "params": {"desnity": 0.2}}, "unknown parameter 'desnity'"),
        ({"trigger": "cron", "cron": "every tuesday"}, "does not parse"),
        ({"trigger": "cron"}, "needs a 'cron' expression"),
        ({"selector": {}}, "needs a base model"),
        ({"selector": {"base_id": "BASE", "window": "last_k_of_run"}}, "needs 'run'"),
        (
            {"selector": {"base_id": "BASE", "window": "last_k_of_run", "run": "r", "k": 1}},
            "selects one model",
        ),
        ({"selector": {"base_id": 999999}}, "base_id 999999 is not a checkpoint"),
        ({"evaluator": "nope"}, "unknown evaluator 'nope'"),
        ({"method": "mwa", "selector": {"base_id": "BASE"}}, "set 'run'"),
    ],
)
def test_bad_policies_are_refused_with_reason(
    db, tmp_path: Path, fields: dict, message: str
) -> None:
    base = _register(db, tmp_path, "base", 0, kind="base")
    body = {"name": "p", "method": "ties", "selector": {"base_id": base}, "trigger": "on_register"}
    body.update(fields)
    if isinstance(body["selector"].get("base_id"), str):
        body["selector"] = {**body["selector"], "base_id": base}
    with pytest.raises(InvalidInput) as err:
        _create(db, **body)
    assert message in str(err.value)


def test_selection_windows(db, tmp_path: Path) -> None:
    base = _register(db, tmp_path, "base", 0, kind="base")
    a1 = _register(db, tmp_path, "a1", 1, base_id=base, task="a", run="r", step=10)
    b1 = _register(db, tmp_path, "b1", 2, base_id=base, task="b", run="r", step=20, tags=["x"])
    a2 = _register(db, tmp_path, "a2", 3, base_id=base, task="a", run="r", step=30, tags=["x"])
    with Session(db.engine) as session:

        def ids(selector: dict, folded=()) -> list[int]:
            parsed = policy_service.parse_selector(selector)
            return [
                c.id
                for c in policy_service.select_inputs(
                    session=session, selector=parsed, folded=folded
                )
            ]

        assert ids({"base_id": base}) == [b1, a2]
        assert ids({"base_id": base, "task": "a"}) == [a2]
        assert ids({"base_id": base, "tags": ["x"]}) == [b1, a2]
        assert ids({"base_id": base, "window": "last_k_of_run", "run": "r", "k": 2}) == [b1, a2]
        assert ids({"base_id": base, "window": "all_since_last_fold"}, folded=[a1]) == [b1, a2]


def test_cron_policies_fire_on_schedule(db, tmp_path: Path) -> None:
    base = _register(db, tmp_path, "base", 0, kind="base")
    policy = _create(
        db,
        name="nightly",
        method="linear",
        selector={"base_id": base},
        trigger="cron",
        cron="0 2 * * *",
    )
    fired: list[int] = []
    start = datetime(2030, 1, 1, 0, 0, tzinfo=UTC)
    scheduler = CronScheduler(db, fired.append, started=start)
    assert scheduler.tick(now=start + timedelta(hours=1)) == []
    assert scheduler.tick(now=start + timedelta(hours=2, minutes=1)) == [policy.id]
    assert scheduler.tick(now=start + timedelta(hours=3)) == []  # once per firing
    assert scheduler.tick(now=start + timedelta(days=1, hours=2, seconds=1)) == [policy.id]
    assert fired == [policy.id, policy.id]
