"""The streaming engine through merge_files: shards, metadata, extras, passes, state,
whole-model methods and atomic failure."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mergeops
from mergeops.io import INDEX_NAME, SafetensorsFile, ShardedCheckpoint
from mergeops.methods import base as mb


def _write(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.fixture
def files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(4, 8, generator=gen) for i in range(3)}
    base["layer0.weight"] = base["layer0.weight"].to(torch.bfloat16)
    paths = {"base": _write(tmp_path / "base.safetensors", base)}
    for i in (1, 2):
        model = {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in base.items()
        }
        paths[f"ft{i}"] = _write(tmp_path / f"ft{i}.safetensors", model)
    return paths


@pytest.fixture
def registered():
    added: list[str] = []

    def add(cls):
        mb.register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        mb._REGISTRY.pop(name, None)


def test_merge_files_writes_shards_index_and_metadata(files, tmp_path):
    out = tmp_path / "merged"
    result = mergeops.merge_files(
        "ties",
        [files["ft1"], files["ft2"]],
        base=files["base"],
        out_dir=out,
        params={"density": 0.5},
        max_shard_size=150,
        progress=False,
        device="cpu",
    )
    assert result.tensor_count == 3 and len(result.files) == 3
    assert result.bytes_written > 0 and result.bytes_read > result.bytes_written
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(index["weight_map"]) == 3
    meta = SafetensorsFile(result.files[0]).file_metadata()
    assert meta["mergeops_method"] == "ties"
    assert json.loads(meta["mergeops_params"])["lambda"] == 1.0
    inputs = json.loads(meta["mergeops_inputs"])
    assert [i["name"] for i in inputs] == ["ft1", "ft2"]
    assert inputs[0]["params"]["density"] == 0.5
    merged = ShardedCheckpoint(out)
    assert merged.metadata("layer0.weight").dtype == torch.bfloat16
    in_memory = mergeops.merge(
        "ties", [files["ft1"], files["ft2"]], base=files["base"], density=0.5, device="cpu"
    )
    for key, tensor in in_memory.items():
        assert torch.equal(merged.get(key), tensor)


def test_nan_mid_stream_leaves_no_output(files, tmp_path):
    bad = SafetensorsFile(files["ft2"])
    tensors = {k: bad.get(k) for k in list(bad.keys())}
    tensors["layer2.weight"][0, 0] = float("nan")
    _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(mergeops.MergeError, match=r"'layer2\.weight' of model 'bad' contains NaN"):
        mergeops.merge_files(
            "linear",
            [files["ft1"], tmp_path / "bad.safetensors"],
            out_dir=tmp_path / "out",
            progress=False,
            device="cpu",
        )
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_first_pass_and_extra_streams(registered, files, tmp_path):
    class Norms(mb.StatsCollector):
        def __init__(self):
            self.total, self.sweeps = 0.0, 0

        def observe(self, inputs, ctx):
            self.total += float(sum(t.pow(2).sum() for t in inputs.task_vectors()))

        def next_pass(self):
            self.sweeps += 1
            return self.sweeps < 2  # ask for a second sweep to exercise it

        def result(self):
            return self.total / 2

    @registered
    class NormScaled(mb.StreamingMethod):
        name = "_test_norm_scaled"
        paper = "https://example.org"
        params_model = mb.MethodParams
        needs = frozenset({mb.Need.BASE})

        def stats_collector(self, ctx):
            return Norms()

        def merge_tensor(self, inputs, ctx):
            mask = (inputs.models[0] > inputs.base).to(torch.uint8)
            tv = inputs.task_vectors()[0] / ctx.stats
            return mb.TensorResult(
                inputs.base + tv,
                extras={"mask.ft1": {inputs.name: mask}, "task_vector": {inputs.name: tv}},
            )

    result = mergeops.merge_files(
        "_test_norm_scaled",
        [files["ft1"], files["ft2"]],
        base=files["base"],
        out_dir=tmp_path / "o",
        progress=False,
        device="cpu",
    )
    assert set(result.extra_outputs) == {"mask.ft1", "task_vector"}
    masks = ShardedCheckpoint(result.extra_outputs["mask.ft1"])
    assert masks.metadata("layer1.weight").dtype == torch.uint8
    assert (
        ShardedCheckpoint(result.extra_outputs["task_vector"]).metadata("layer0.weight").dtype
        == torch.float32
    )


def test_state_is_loaded_and_saved(registered, files, tmp_path):
    @registered
    class Counter(mb.StreamingMethod):
        name = "_test_counter"
        paper = "https://example.org"
        params_model = mb.MethodParams
        needs = frozenset({mb.Need.STATE})

        def new_state(self, ctx):
            return {"folds": 0}

        def load_state(self, path, ctx):
            return json.loads(path.read_text())

        def save_state(self, state, path):
            path.write_text(json.dumps(state))

        def merge_tensor(self, inputs, ctx):
            return mb.TensorResult(inputs.models[0] + ctx.state["folds"])

        def finish(self, ctx):
            ctx.state["folds"] += 1

    state = tmp_path / "state.json"
    for run in range(2):
        result = mergeops.merge_files(
            "_test_counter",
            [files["ft1"]],
            out_dir=tmp_path / f"o{run}",
            state_path=state,
            progress=False,
            device="cpu",
        )
        assert result.state_path == state
    assert json.loads(state.read_text()) == {"folds": 2}
    first, second = ShardedCheckpoint(tmp_path / "o0"), ShardedCheckpoint(tmp_path / "o1")
    assert torch.allclose(second.get("layer1.weight"), first.get("layer1.weight") + 1)


def test_whole_model_method_gets_sources(registered, files, tmp_path):
    class Obj:
        def loss(self, params):
            return sum(p.sum() for p in params.values())

    @registered
    class Pick(mb.WholeModelMethod):
        name = "_test_pick"
        paper = "https://example.org"
        params_model = mb.MethodParams
        needs = frozenset({mb.Need.OBJECTIVE})

        def merge_model(self, inputs, ctx):
            dicts = [mb.load_state_dict(s, ctx.device) for s in inputs.models]
            losses = [float(ctx.objective.loss(d)) for d in dicts]
            return mb.ModelResult(dicts[losses.index(min(losses))])

    with pytest.raises(mergeops.MergeError, match="needs an objective"):
        mergeops.merge("_test_pick", [files["ft1"]], device="cpu")
    out = mergeops.merge("_test_pick", [files["ft1"], files["ft2"]], objective=Obj(), device="cpu")
    assert out["layer0.weight"].dtype == torch.bfloat16


def test_registry_lookup_and_listing():
    assert {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "mwa",
        "fisher",
    } <= set(mergeops.available_methods())
    with pytest.raises(
        mergeops.MergeError, match=r"unknown merge method 'tiez'; available: .*ties"
    ):
        mergeops.get_method("tiez")


def test_seeded_determinism_across_runs(files):
    args = dict(base=files["base"], density=0.3, seed=11, device="cpu")
    one = mergeops.merge("dare_ties", [files["ft1"], files["ft2"]], **args)
    two = mergeops.merge("dare_ties", [files["ft1"], files["ft2"]], **args)
    assert all(torch.equal(one[k], two[k]) for k in one)
