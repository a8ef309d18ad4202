"""merge_checkpoints / on_checkpoint_ready / sequential_merge under Prefect's test harness."""

from __future__ import annotations

import torch
from sqlmodel import select

from flows.pipelines import merge_checkpoints, on_checkpoint_ready
from flows.runtime import current_runtime
from registry.models import Checkpoint, Lineage, MergeRunStatus
from registry.services import merge_runs as run_service
from registry.services.tensors import checkpoint_tensor_source
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state


def _weights(checkpoint_id: int) -> dict[str, torch.Tensor]:
    runtime = current_runtime()
    with runtime.session() as session:
        source = checkpoint_tensor_source(
            session=session, store=runtime.store, checkpoint_id=checkpoint_id
        )
        return {k: source.get(k) for k in source.keys()}  # noqa: SIM118 - a TensorSource, not a dict


def _three(env: FlowEnv) -> tuple[int, int, int]:
    base = env.register("base", tiny_state(0), kind="base")
    ft_a = env.register("ft-a", tiny_state(1), base_id=base, task="a")
    ft_b = env.register("ft-b", tiny_state(2), base_id=base, task="b")
    return base, ft_a, ft_b


def test_merge_checkpoints_registers_merged_output_with_lineage(flow_env: FlowEnv) -> None:
    base, ft_a, ft_b = _three(flow_env)
    request = run_service.MergeRequest(
        method="task_arithmetic",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in (ft_a, ft_b)],
    )
    with flow_env.session() as session:
        run, launch = run_service.create_merge_run(session=session, request=request)
    assert launch
    output_id = merge_checkpoints(run.id)
    assert output_id is not None

    expected = {
        k: tiny_state(0)[k]
        + (tiny_state(1)[k] - tiny_state(0)[k])
        + (tiny_state(2)[k] - tiny_state(0)[k])
        for k in tiny_state(0)
    }
    merged = _weights(output_id)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)
    with flow_env.session() as session:
        run = run_service.get_merge_run(session=session, run_id=run.id)
        assert run.status == MergeRunStatus.succeeded
        assert run.output_checkpoint_id == output_id
        output = session.get(Checkpoint, output_id)
        assert output.kind == "merged" and output.status == "ready"
        edges = session.exec(select(Lineage).where(Lineage.child_id == output_id)).all()
        assert {(e.parent_id, e.role) for e in edges} == {
            (base, "base"),
            (ft_a, "input"),
            (ft_b, "input"),
        }
    # Running the same run again is a no-op returning the same output.
    assert merge_checkpoints(run.id) == output_id


def test_on_checkpoint_ready_runs_matching_policies(flow_env: FlowEnv) -> None:
    base, ft_a, _ = _three(flow_env)
    flow_env.policy(
        name="avg-newest",
        method="linear",
        selector={"base_id": base},
        trigger="on_register",
    )
    ft_a2 = flow_env.register("ft-a2", tiny_state(3), base_id=base, task="a")
    started = on_checkpoint_ready(ft_a2)
    assert len(started) == 1
    with flow_env.session() as session:
        run = run_service.get_merge_run(session=session, run_id=started[0])
        assert run.status == MergeRunStatus.succeeded, run.error
        inputs = [
            i.checkpoint_id for i in run_service.merge_run_inputs(session=session, run_id=run.id)
        ]
    # newest per task: ft-a2 replaces ft-a; ft-b stays
    assert ft_a not in inputs and ft_a2 in inputs and len(inputs) == 2
    merged = _weights(run.output_checkpoint_id)
    torch.testing.assert_close(
        merged["layers.0.bias"],
        (tiny_state(3)["layers.0.bias"] + tiny_state(2)["layers.0.bias"]) / 2,
    )
    # A merged checkpoint never re-triggers the policy, and the same checkpoint twice is idempotent.
    assert on_checkpoint_ready(run.output_checkpoint_id) == []
    assert on_checkpoint_ready(ft_a2) == []


def test_sequential_merge_resumes_from_merge_state(flow_env: FlowEnv, tmp_path) -> None:
    import mergeops
    from flows.pipelines import sequential_merge

    base, ft_a, ft_b = _three(flow_env)
    policy = flow_env.policy(
        name="continual",
        method="opcm",
        selector={"base_id": base, "window": "all_since_last_fold"},
        trigger="cron",
        cron="0 * * * *",
    )
    first = sequential_merge(policy)
    assert first is not None
    assert sequential_merge(policy) is None  # nothing arrived since the last fold
    ft_c = flow_env.register("ft-c", tiny_state(4), base_id=base, task="c")
    second = sequential_merge(policy)
    with flow_env.session() as session:
        runs, _ = run_service.list_merge_runs(session=session, policy_id=policy)
        folds = [
            [i.checkpoint_id for i in run_service.merge_run_inputs(session=session, run_id=r.id)]
            for r in reversed(runs)
        ]
        assert folds == [[ft_a, ft_b], [ft_c]]  # arrival order recorded
        edges = session.exec(select(Lineage).where(Lineage.child_id == second)).all()
        assert (first, "state") in {(e.parent_id, e.role) for e in edges}
    # Folding in two runs equals folding all three at once.
    folder = tmp_path / "ref"
    paths = []
    for name, seed in (("a", 1), ("b", 2), ("c", 4)):
        from tests.flows.fixtures_flows import save_state

        paths.append(str(save_state(folder / name, tiny_state(seed)) / "model.safetensors"))
    base_path = str(save_state(folder / "base", tiny_state(0)) / "model.safetensors")
    mergeops.merge_files(
        "opcm",
        paths,
        out_dir=folder / "out",
        base=base_path,
        model_names=["a", "b", "c"],
        state_path=folder / "state.safetensors",
        progress=False,
    )
    from mergeops.io import open_source

    source = open_source(folder / "out")
    reference = {k: source.get(k) for k in source.keys()}  # noqa: SIM118 - a TensorSource, not a dict
    merged = _weights(second)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value)


def test_fisher_merge_estimates_fisher_with_the_evaluator(flow_env: FlowEnv) -> None:
    from flows.pipelines import sequential_merge

    base, ft_a, ft_b = _three(flow_env)
    policy = flow_env.policy(
        name="fisher-manual",
        method="fisher",
        selector={"base_id": base},
        trigger="manual",
        evaluator="ckreg-test-norm",  # its Fisher estimate is all ones: fisher = plain average
    )
    output = sequential_merge(policy)
    merged = _weights(output)
    for key, value in tiny_state(1).items():
        torch.testing.assert_close(merged[key], (value + tiny_state(2)[key]) / 2)
    from registry.models import Artifact

    with flow_env.session() as session:
        roles = session.exec(select(Artifact.checkpoint_id).where(Artifact.role == "fisher")).all()
        assert sorted(roles) == sorted([ft_a, ft_b])


def test_merge_is_logged_to_mlflow(flow_env: FlowEnv, mlflow_server) -> None:
    import dataclasses

    from mlflow.tracking import MlflowClient

    from flows import runtime as flow_runtime

    settings = flow_env.settings.model_copy(update={"mlflow_tracking_uri": mlflow_server.url})
    flow_runtime.configure(settings)
    _, ft_a, ft_b = _three(dataclasses.replace(flow_env, settings=settings))
    request = run_service.MergeRequest(
        method="linear", inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in (ft_a, ft_b)]
    )
    with flow_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    merge_checkpoints(run.id)
    with flow_env.session() as session:
        mlflow_run_id = run_service.get_merge_run(session=session, run_id=run.id).mlflow_run_id
    assert mlflow_run_id
    logged = MlflowClient(tracking_uri=mlflow_server.url).get_run(mlflow_run_id)
    assert logged.data.params.get("method") == "linear" or "linear" in str(logged.data)
