"""Scale-out: tensor ranges on a Dask LocalCluster (2 workers) give byte-identical output."""

from __future__ import annotations

from pathlib import Path

import mergeops
from flows.pipelines import merge_checkpoints
from flows.runtime import current_runtime
from flows.split import key_ranges
from registry.services import merge_runs as run_service
from registry.services.common import checkpoint_files
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state


def test_key_ranges_cover_keys_in_order() -> None:
    keys = [f"t{i}" for i in range(7)]
    ranges = key_ranges(keys, 3)
    assert [len(r) for r in ranges] == [3, 2, 2]
    assert [k for r in ranges for k in r] == keys
    assert key_ranges(keys[:1], 4) == [["t0"]]


def test_dask_split_merge_is_byte_identical(flow_env: FlowEnv, tmp_path: Path) -> None:
    from dask.distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    base = flow_env.register("base", tiny_state(0), kind="base")
    a = flow_env.register("a", tiny_state(1), base_id=base, task="a")
    b = flow_env.register("b", tiny_state(2), base_id=base, task="b")
    request = run_service.MergeRequest(
        method="ties",
        base_id=base,
        params={"density": 0.5},
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in (a, b)],
    )
    with flow_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        split_flow = merge_checkpoints.with_options(
            task_runner=DaskTaskRunner(address=cluster.scheduler_address)
        )
        output_id = split_flow(run.id, tensor_ranges=2)

    # The single-process merge of the same inputs (the flow's cached checkpoint folders).
    reference = tmp_path / "reference"
    cache = flow_env.settings.work_dir / "cache" / "checkpoints"
    mergeops.merge_files(
        "ties",
        [str(cache / str(a)), str(cache / str(b))],
        model_names=["a", "b"],
        base=str(cache / str(base)),
        params={"density": 0.5},
        out_dir=reference,
        progress=False,
    )
    runtime = current_runtime()
    with flow_env.session() as session:
        stored = {f.name: f for f in checkpoint_files(session, output_id)}
    expected = sorted(p.name for p in reference.iterdir() if p.is_file())
    assert sorted(stored) == expected
    for name in expected:
        data = b"".join(runtime.store.iter_bytes(stored[name].blob_key))
        assert data == (reference / name).read_bytes(), name
