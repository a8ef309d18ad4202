"""``file://`` store specifics: URL forms, the path-traversal guard, zero-copy paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from registry.storage import BlobNotFound, UnsafeKeyError, open_store
from registry.storage.local import LocalObjectStore


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_store(f"file://{tmp_path / 'a'}")
    assert isinstance(absolute, LocalObjectStore) and absolute.root == tmp_path / "a"
    assert open_store(f"file://localhost{tmp_path / 'b'}").root == tmp_path / "b"  # type: ignore[attr-defined]
    monkeypatch.chdir(tmp_path)
    relative = open_store("file://.ckreg/store")
    assert relative.root == tmp_path / ".ckreg" / "store"  # type: ignore[attr-defined]
    assert relative.url == (tmp_path / ".ckreg" / "store").as_uri()
    with pytest.raises(ValueError, match="names no directory"):
        open_store("file://")


def test_local_path_is_the_read_only_blob(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    info = store.put_bytes(b"zero-copy")
    path = store.local_path(info.key)
    assert path == tmp_path / "store" / "blobs" / "sha256" / info.sha256
    assert path is not None and path.read_bytes() == b"zero-copy"
    assert not stat.S_IMODE(path.stat().st_mode) & 0o222
    assert os.listdir(tmp_path / "store" / "tmp") == []
    with pytest.raises(BlobNotFound):
        store.local_path("blobs/sha256/" + "0" * 64)


def test_symlink_escape_rejected(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (tmp_path / "store" / "link").symlink_to(outside)
    for call in (store.exists, store.delete, store.local_path, lambda k: store.read_range(k, 0, 1)):
        with pytest.raises(UnsafeKeyError, match="outside the store root"):
            call("link/secret")
    assert list(store.list("link/")) == []
    assert (outside / "secret").exists()


def test_directory_is_not_an_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    assert not store.exists("blobs/sha256")
    with pytest.raises(BlobNotFound):
        store.iter_bytes("blobs")
    with pytest.raises(UnsafeKeyError, match="directory"):
        store.delete("blobs/sha256")
