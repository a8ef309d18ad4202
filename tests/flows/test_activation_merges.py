"""regmean through the flows: each input's ``gram`` artifact is found by itself; a missing one
fails the run naming the checkpoint; a gram of the wrong shape is refused at upload."""

import pytest
import torch
from safetensors.torch import save_file

import mergeops
from flows.merge_flow import merge_checkpoints
from registry.errors import RegistryError
from registry.models import ArtifactRole, MergeRunStatus
from registry.services import artifacts
from registry.services import merge_runs as run_service
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state
from tests.flows.test_merge_flow import _three, _weights


def _gram(env: FlowEnv, checkpoint_id: int, seed: int, *, width: int = 4) -> dict:
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(seed))
    grams = {"layers.0.weight": x.T @ x / 16}
    path = env.tmp / f"gram-{checkpoint_id}.safetensors"
    save_file(grams, str(path))
    with env.session() as session:
        artifacts.add_artifact(
            session=session, store=_store(), settings=env.settings,
            checkpoint_id=checkpoint_id, role=ArtifactRole.gram, content=path,
        )  # fmt: skip
    return grams


def _store():
    from flows.runtime import current_runtime

    return current_runtime().store


def test_regmean_merge_reads_each_inputs_gram_artifact(flow_env: FlowEnv) -> None:
    base, ft_a, ft_b = _three(flow_env)
    grams = [_gram(flow_env, ft_a, 1), _gram(flow_env, ft_b, 2)]
    output = merge_checkpoints(flow_env.queue_run("regmean", base, [ft_a, ft_b])[0])
    expected = mergeops.merge("regmean", [tiny_state(1), tiny_state(2)], grams=grams, device="cpu")
    merged = _weights(output)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)
    average = (tiny_state(1)["layers.0.weight"] + tiny_state(2)["layers.0.weight"]) / 2
    assert not torch.allclose(merged["layers.0.weight"], average, atol=1e-3)  # grams mattered


def test_regmean_without_a_gram_fails_naming_the_checkpoint(flow_env: FlowEnv) -> None:
    base, ft_a, ft_b = _three(flow_env)
    _gram(flow_env, ft_a, 1)
    run_id, _ = flow_env.queue_run("regmean", base, [ft_a, ft_b])
    with pytest.raises(Exception, match="gram"):
        merge_checkpoints(run_id)
    with flow_env.session() as session:
        run = run_service.get_merge_run(session=session, run_id=run_id)
        assert run.status == MergeRunStatus.failed
        assert "'gram' artifact" in (run.error or "") and "'ft-b'" in (run.error or "")


def test_a_gram_of_the_wrong_shape_is_refused(flow_env: FlowEnv) -> None:
    _, ft_a, _ = _three(flow_env)
    with pytest.raises(RegistryError, match=r"layers\.0\.weight.*\(8, 8\).*\(in, in\)"):
        _gram(flow_env, ft_a, 1, width=8)


def test_adamerging_learns_from_the_evaluators_unlabeled_objective(flow_env: FlowEnv) -> None:
    base, ft_a, ft_b = _three(flow_env)
    request = run_service.MergeRequest(
        method="adamerging",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in (ft_a, ft_b)],
        params={"granularity": "task", "steps": 20, "lr": 0.05},
        evaluator="ckreg-test-norm",  # its unlabeled objective is the squared norm
    )
    with flow_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    output = merge_checkpoints(run.id)
    with flow_env.session() as session:
        from registry.models import Checkpoint

        learnt = session.get(Checkpoint, output).meta["learnt_coefficients"]
    lam_a, lam_b = learnt["lambda"]
    assert learnt["inputs"] == [ft_a, ft_b] and (lam_a, lam_b) != (0.3, 0.3)
    assert 0 <= lam_a <= 1 and 0 <= lam_b <= 1
    merged = _weights(output)  # the stored λ are the ones the output was built with
    for key, theta0 in tiny_state(0).items():
        expected = (
            theta0 + lam_a * (tiny_state(1)[key] - theta0) + lam_b * (tiny_state(2)[key] - theta0)
        )
        torch.testing.assert_close(merged[key], expected, atol=1e-4, rtol=0)
