"""Task vectors tau = theta - theta_0 (stored with per-tensor norms) and cosine similarity ranking."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from registry.errors import InvalidInput
from registry.services import checkpoint_tensor_source, compute_task_vector, similar_checkpoints
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, Env, st_bytes, tiny_state


def _shifted(
    base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    return {k: base[k] + factor * delta[k] for k in base}


def test_task_vector_on_complete(api: Api) -> None:
    theta0 = tiny_state(0)
    theta = tiny_state(1)
    base = api.register({"model.safetensors": st_bytes(theta0)}, name="base")
    ft = api.register(
        {"model.safetensors": st_bytes(theta)}, name="ft", kind="finetune", base_id=base["id"]
    )
    artifacts = api.client.get(f"/api/v1/checkpoints/{ft['id']}/artifacts").json()
    assert [a["role"] for a in artifacts] == ["task_vector"] and artifacts[0]["tensors"] == 4
    norms = artifacts[0]["metadata"]["norms"]
    content = api.client.get(
        f"/api/v1/checkpoints/{ft['id']}/artifacts/{artifacts[0]['id']}/content"
    ).content
    tau = load(content)
    for key in theta:
        assert torch.allclose(tau[key], theta[key] - theta0[key])
        assert norms[key] == pytest.approx(
            float(torch.linalg.vector_norm(theta[key] - theta0[key])), rel=1e-5
        )
    with api.env.session() as session:
        source = checkpoint_tensor_source(
            session=session, store=api.env.store, checkpoint_id=ft["id"], role="task_vector"
        )
        assert torch.allclose(
            source.get("layers.0.bias"), theta["layers.0.bias"] - theta0["layers.0.bias"]
        )
        with pytest.raises(InvalidInput, match="has no base"):
            compute_task_vector(
                session=session,
                store=api.env.store,
                settings=api.env.settings,
                checkpoint_id=base["id"],
            )


def test_similar_ranks_by_cosine(api: Api) -> None:
    theta0 = tiny_state(0)
    delta = tiny_state(7)
    other = tiny_state(8)
    base = api.register({"model.safetensors": st_bytes(theta0)}, name="base")
    query = api.register(
        {"model.safetensors": st_bytes(_shifted(theta0, delta, 0.1))},
        name="q",
        kind="finetune",
        base_id=base["id"],
        task="a",
    )
    same = api.register(
        {"model.safetensors": st_bytes(_shifted(theta0, delta, 0.3))},
        name="same",
        kind="finetune",
        base_id=base["id"],
        task="a",
    )
    opposite = api.register(
        {"model.safetensors": st_bytes(_shifted(theta0, delta, -0.2))},
        name="opp",
        kind="finetune",
        base_id=base["id"],
        task="b",
    )
    unrelated = api.register(
        {"model.safetensors": st_bytes(_shifted(theta0, other, 0.1))},
        name="unrel",
        kind="finetune",
        base_id=base["id"],
        task="c",
    )
    ranked = api.client.get(
        f"/api/v1/checkpoints/{query['id']}/similar", params={"limit": 10}
    ).json()
    assert [r["checkpoint_id"] for r in ranked] == [same["id"], unrelated["id"], opposite["id"]]
    assert ranked[0]["cosine"] == pytest.approx(1.0, abs=1e-4) and ranked[0]["task"] == "a"
    assert ranked[-1]["cosine"] == pytest.approx(-1.0, abs=1e-4)
    assert abs(ranked[1]["cosine"]) < 0.9
    assert (
        len(
            api.client.get(f"/api/v1/checkpoints/{query['id']}/similar", params={"limit": 1}).json()
        )
        == 1
    )


def test_task_vector_on_request(env: Env) -> None:
    from registry.models import CheckpointCreate
    from registry.services import register_directory

    settings = env.settings.model_copy(update={"task_vectors_on_complete": False})
    with env.session() as session:
        paths = env.settings.home / "b", env.settings.home / "f"
        for path, seed in zip(paths, (0, 1), strict=True):
            path.mkdir(parents=True)
            (path / "model.safetensors").write_bytes(
                st_bytes(tiny_state(seed, dtype=torch.bfloat16))
            )
        base = register_directory(
            session=session,
            store=env.store,
            settings=settings,
            data=CheckpointCreate(name="b", kind="base"),
            directory=paths[0],
        )
        ft = register_directory(
            session=session,
            store=env.store,
            settings=settings,
            data=CheckpointCreate(name="f", kind="finetune", base_id=base.id),
            directory=paths[1],
        )
        assert env.artifact_rows(ft.id) and all(
            a.role == "weights" for a in env.artifact_rows(ft.id)
        )
        artifact = compute_task_vector(
            session=session, store=env.store, settings=settings, checkpoint_id=ft.id or 0
        )
        assert artifact.tensor_index["layers.0.weight"]["dtype"] == "BF16"
        assert (
            similar_checkpoints(
                session=session, store=env.store, settings=settings, checkpoint_id=ft.id or 0
            )
            == []
        )
