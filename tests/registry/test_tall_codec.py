"""The ``tall`` codec: a rebuilt member is ``θ0 + m ⊙ τ_MTL`` byte for byte, any range of it reads
the same as the whole file, and a blob whose params or refs do not fit is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from mergeops.ops.masks import pack_masks, tall_mask
from registry.storage import ObjectStore, open_store, tall_codec
from registry.storage.codecs import StoredBlob, iter_original, read_original
from registry.storage.tall_codec import ORIGINAL_SHA_KEY, RECONSTRUCTED_KEY, iter_tall, layout


def _states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(16, 8, generator=gen),
        "b.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.weight": torch.randn(5, 3, generator=gen),
        "steps": torch.tensor([4, 2], dtype=torch.int64),
    }
    members = []
    for _ in range(3):
        member = {k: v.clone() for k, v in base.items()}
        for key in ("a.weight", "b.bias", "c.weight"):
            noise = torch.randn(base[key].shape, generator=gen) * 0.1
            member[key] = (base[key].float() + noise).to(base[key].dtype)
        members.append(member)
    return base, members


def _put(store: ObjectStore, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> StoredBlob:
    info = store.put_stream([save(tensors, metadata=meta)])
    return StoredBlob(info.key, info.size)


def _family(
    store: ObjectStore, lam: float = 0.4
) -> tuple[StoredBlob, dict[str, torch.Tensor], dict[str, str]]:
    """A stored base, τ_MTL and member 0's mask, the member's ``tall`` blob, and the expected
    tensors computed in memory."""
    base, members = _states()
    floats = [k for k, v in base.items() if v.is_floating_point()]
    merged = {
        k: sum((m[k].float() - base[k].float() for m in members), torch.zeros(base[k].shape)).to(
            base[k].dtype
        )
        for k in floats
    }
    masks = {k: tall_mask(members[0][k].float() - base[k].float(), merged[k], lam) for k in floats}
    packed, mask_meta = pack_masks(masks)
    refs = {
        "base": _put(store, base, {"role": "base"}),
        "merged": _put(store, merged, {}),
        "mask": _put(store, packed, mask_meta),
    }
    tensors = [[k, {torch.float32: "F32", torch.bfloat16: "BF16"}.get(v.dtype, "I64"),
                list(v.shape)] for k, v in base.items()]  # fmt: skip
    metadata = {RECONSTRUCTED_KEY: "tall", ORIGINAL_SHA_KEY: "ab" * 32, "task": "t0"}
    found = layout(tensors, metadata)
    params = {"lambda": lam, "tensors": tensors, "metadata": metadata}
    blob = StoredBlob(refs["mask"].key, found.size, "tall", refs, params)
    expected = {
        k: (base[k].float() + masks[k].float() * merged[k].float()).to(base[k].dtype)
        if k in masks
        else base[k]
        for k in base
    }
    return blob, expected, metadata


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store(f"file://{tmp_path / 'store'}")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The file store and a bucket on the session's S3 endpoint (moto_server over HTTP)."""
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    return open_store(
        request.getfixturevalue("s3_store_url"),
        endpoint_url=request.getfixturevalue("s3_endpoint"),
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_rebuilt_file_is_base_plus_mask_times_merged_byte_for_byte(
    any_store: ObjectStore, tmp_path: Path
) -> None:
    store = any_store
    blob, expected, metadata = _family(store)
    data = b"".join(iter_tall(store, blob))
    assert len(data) == blob.size
    rebuilt = load(data)
    assert set(rebuilt) == set(expected)
    for key, tensor in expected.items():
        assert rebuilt[key].dtype == tensor.dtype, key
        assert _raw(rebuilt[key]) == _raw(tensor), key
    path = tmp_path / "rebuilt.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_same_params_give_the_same_bytes(store: ObjectStore) -> None:
    blob, _, _ = _family(store)
    assert b"".join(iter_tall(store, blob)) == b"".join(iter_tall(store, blob, chunk_size=5))


@pytest.mark.parametrize("block", [tall_codec.ROW_BLOCK_BYTES, 7, 40])
def test_ranges_across_header_tensor_and_row_boundaries(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Every range equals the same slice of the whole file, also when rows are rebuilt a few
    at a time (masks of 3-entry rows start mid-byte)."""
    blob, _, _ = _family(store)
    whole = b"".join(iter_tall(store, blob))
    monkeypatch.setattr(tall_codec, "ROW_BLOCK_BYTES", block)
    found = layout(blob.params["tensors"], blob.params["metadata"])
    cuts = {0, 1, 7, 8, len(found.header) - 1, len(found.header), blob.size - 1, blob.size}
    for span in found.spans:
        cuts |= {span.start - 1, span.start, span.start + 1, span.end - 1, span.end}
    cuts = sorted(c for c in cuts if 0 <= c <= blob.size)
    for start in cuts:
        for end in cuts:
            if end < start:
                continue
            got = b"".join(iter_tall(store, blob, start=start, end=end, chunk_size=3))
            assert got == whole[start:end], (start, end)


def test_codecs_read_path_serves_tall_blobs(any_store: ObjectStore) -> None:
    store = any_store
    blob, _, _ = _family(store)
    whole = b"".join(iter_tall(store, blob))
    assert b"".join(iter_original(store, blob)) == whole
    assert read_original(store, blob, 10, 50) == whole[10:60]
    found = layout(blob.params["tensors"], blob.params["metadata"])
    for span in found.spans:  # a range across each tensor boundary, rows rebuilt a few at a time
        got = b"".join(iter_original(store, blob, start=span.start - 3, end=span.start + 5))
        assert got == whole[span.start - 3 : span.start + 5]


def test_blob_whose_size_or_refs_do_not_fit_is_refused(store: ObjectStore) -> None:
    blob, _, _ = _family(store)
    wrong_size = StoredBlob(blob.key, blob.size + 8, blob.codec, blob.refs, blob.params)
    with pytest.raises(ValueError, match="describe"):
        b"".join(iter_tall(store, wrong_size))
    no_mask = {k: v for k, v in blob.refs.items() if k != "mask"}
    with pytest.raises(ValueError, match="lacks codec refs"):
        b"".join(iter_tall(store, StoredBlob(blob.key, blob.size, "tall", no_mask, blob.params)))
    with pytest.raises(ValueError, match="outside"):
        b"".join(iter_tall(store, blob, start=0, end=blob.size + 1))
