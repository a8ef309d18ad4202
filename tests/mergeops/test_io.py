"""Readers (file, sharded folder, PEFT adapter, state dict) and the staged sharded writer."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeops.io import (
    INDEX_NAME,
    OutputError,
    PeftAdapter,
    SafetensorsFile,
    ShardedCheckpoint,
    ShardedWriter,
    SourceError,
    StateDictSource,
    open_source,
    parse_size,
    staged_output,
)
from mergeops.sources import TensorSource

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.ones(5, dtype=torch.bfloat16),
    "c.ids": torch.arange(3),
}


def test_safetensors_file_is_lazy_and_reports_meta(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, str(path), metadata={"k": "v"})
    source = SafetensorsFile(path)
    assert isinstance(source, TensorSource)
    assert source.name == "m"
    assert set(source.keys()) == set(TENSORS)
    assert source.metadata("b.bias") == (torch.bfloat16, (5,))
    assert torch.equal(source.get("a.weight"), TENSORS["a.weight"])
    assert source.file_metadata() == {"k": "v"}
    with pytest.raises(KeyError, match="'m' has no tensor 'zz'"):
        source.get("zz")


def test_sharded_writer_round_trip_with_index(tmp_path):
    with (
        staged_output(tmp_path / "out") as staging,
        ShardedWriter(staging, max_shard_size=60, metadata={"mergeops_method": "x"}) as writer,
    ):
        for name, tensor in TENSORS.items():
            writer.add(name, tensor)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(
        s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards
    )
    assert index["metadata"]["mergeops_method"] == "x"
    source = ShardedCheckpoint(out)
    for name, tensor in TENSORS.items():
        assert torch.equal(source.get(name), tensor)
    assert SafetensorsFile(out / shards[0]).file_metadata()["mergeops_method"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), staged_output(tmp_path / "out") as staging:
        ShardedWriter(staging, max_shard_size=10).add("a", torch.ones(100))
        raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_must_be_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"), staged_output(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_folder_of_plain_safetensors_files(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "part1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "part2.safetensors"))
    source = open_source(tmp_path)
    assert sorted(source.keys()) == ["a", "b"]
    assert torch.equal(source.get("b"), torch.zeros(2))


def test_index_may_not_point_outside_the_folder(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(SourceError, match="outside"):
        ShardedCheckpoint(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no checkpoint at"):
        open_source(tmp_path / "nope")


def _adapter(tmp_path, name="adapter"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    lora_a = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # (r, in)
    lora_b = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (out, r)
    save_file(
        {
            "base_model.model.layer.q.lora_A.weight": lora_a,
            "base_model.model.layer.q.lora_B.weight": lora_b,
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder, 2.0 * (lora_b @ lora_a)


def test_peft_adapter_factors_delta_and_full(tmp_path):
    folder, delta = _adapter(tmp_path)
    factors = open_source(folder)
    assert isinstance(factors, PeftAdapter)
    assert len(factors.keys()) == 2
    as_delta = PeftAdapter(folder, mode="delta")
    assert as_delta.keys() == ["layer.q.weight"]
    assert as_delta.metadata("layer.q.weight").shape == (2, 3)
    assert torch.allclose(as_delta.get("layer.q.weight"), delta)
    base = StateDictSource({"layer.q.weight": torch.ones(2, 3), "layer.k.weight": torch.ones(3)})
    full = PeftAdapter(folder, mode="full", base=base)
    assert torch.allclose(full.get("layer.q.weight"), 1 + delta)
    assert torch.equal(full.get("layer.k.weight"), torch.ones(3))
    with pytest.raises(SourceError, match="needs a base"):
        PeftAdapter(folder, mode="full")


@pytest.mark.parametrize(("text", "expected"), [(100, 100), ("2KB", 2000), ("1MiB", 1024**2)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(OutputError, match="cannot read size"):
        parse_size("lots")


def test_written_tensors_load_back_exactly(tmp_path):
    with staged_output(tmp_path / "o") as staging, ShardedWriter(staging) as writer:
        writer.add("x", TENSORS["b.bias"])
    loaded = load_file(tmp_path / "o" / "model-00001-of-00001.safetensors")
    assert loaded["x"].dtype == torch.bfloat16


def test_merging_adapters_as_full_weights(tmp_path):
    import mergeops

    first, delta = _adapter(tmp_path, "a1")
    second, _ = _adapter(tmp_path, "a2")
    base = {"layer.q.weight": torch.zeros(2, 3)}
    factors = mergeops.merge("linear", [first, second], device="cpu")
    assert set(factors) == {
        "base_model.model.layer.q.lora_A.weight",
        "base_model.model.layer.q.lora_B.weight",
    }
    full = mergeops.merge(
        "task_arithmetic", [first, second], base=base, lora="full", device="cpu", weight=0.5
    )
    assert torch.allclose(full["layer.q.weight"], delta)
