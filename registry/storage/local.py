"""The ``file://`` object store: blobs as read-only files under one root directory.

Layout: ``<root>/blobs/sha256/<hex>`` for content, ``<root>/tmp/`` for uploads in flight.
An upload is written to a temp file while hashing, then hard-linked into place: ``os.link``
fails when the target exists, so identical content is stored once and a reader never sees a
half-written blob. When the content is already there its mtime is refreshed instead (``touch``),
and ``delete_if_older`` moves a blob aside before it looks at its mtime, so a concurrent upload
either refreshed it first (the blob is put back) or finds it gone and links its own copy.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from registry.storage.base import (
    READ_CHUNK,
    TMP_PREFIX,
    BlobInfo,
    BlobNotFound,
    HashingCounter,
    ObjectInfo,
    ObjectStore,
    UnsafeKeyError,
    blob_key,
    iter_chunks,
    resolve_range,
    validate_key,
)

# Filesystems without hard links answer with one of these; we then fall back to rename.
_NO_LINK_ERRNOS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
_PUBLISH_TRIES = 3


def _refresh(path: Path) -> bool:
    """Set ``path``'s mtime to now; False when it does not exist (any more)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def root_from_file_url(url: str) -> Path:
    """The directory a ``file://`` URL names.

    ``file:///abs/path`` (or ``file://localhost/abs/path``) is absolute; ``file://rel/path``
    is taken relative to the current directory (so ``file://.ckreg/store`` works) and resolved
    once, when the store is opened.
    """
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ValueError(f"not a file:// URL: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"file store URL {url!r} must not carry a query or fragment")
    path = unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        if not path:
            raise ValueError(f"file store URL {url!r} names no directory")
        return Path(path).resolve()
    return (Path(unquote(parts.netloc)) / path.lstrip("/")).resolve()


class LocalObjectStore(ObjectStore):
    """Blobs as files under ``root``; every key is checked to stay inside it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / TMP_PREFIX).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        """The resolved path of ``key``; ``UnsafeKeyError`` if it would leave the root."""
        validate_key(key)
        resolved = self.root.joinpath(*key.split("/")).resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise UnsafeKeyError(f"object key {key!r} resolves outside the store root {self.root}")
        return resolved

    def put_stream(
        self,
        chunks: Iterable[bytes] | BinaryIO,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        counter = HashingCounter(expected_sha256=expected_sha256, expected_size=expected_size)
        tmp = self.root / TMP_PREFIX / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "xb") as out:
                for chunk in iter_chunks(chunks):
                    counter.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = counter.finish()
            os.chmod(tmp, 0o444)  # blobs are immutable; zero-copy readers rely on it
            key = blob_key(digest)
            created = self._publish(tmp, self._path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return BlobInfo(key=key, sha256=digest, size=counter.size, created=created)

    @staticmethod
    def _publish(tmp: Path, final: Path) -> bool:
        """Move ``tmp`` to ``final`` unless it exists (then touch it); True when this call created it."""
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_PUBLISH_TRIES):
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                if _refresh(final):
                    return False
                # garbage collection removed it between the two calls: link our copy
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                break
        # No hard links here: an atomic rename. Two racing writers may both report
        # created=True, but the bytes are identical and a reader never sees a torn file.
        if _refresh(final):
            return False
        os.replace(tmp, final)
        return True

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise BlobNotFound(key, self.url) from None
        if not path.is_file():
            raise BlobNotFound(key, self.url)
        return stat.st_size

    def iter_bytes(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        # Open eagerly so a missing key or bad range fails at the call, not at first next().
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFound(key, self.url) from None
        try:
            first, stop = resolve_range(key, start, end, os.fstat(handle.fileno()).st_size)
        except BaseException:
            handle.close()
            raise
        return self._read_file(handle, first, stop, chunk_size)

    @staticmethod
    def _read_file(handle: BinaryIO, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
        with handle:
            handle.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = handle.read(min(chunk_size, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, allow_empty=True, trailing_slash=True)
        directory = prefix if prefix.endswith("/") or not prefix else prefix.rpartition("/")[0]
        base = self.root.joinpath(*[p for p in directory.split("/") if p]).resolve()
        if not base.is_relative_to(self.root) or not base.is_dir():
            return iter(())
        found = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                key = filename if rel == "." else f"{rel}/{filename}"
                if key.startswith(prefix):
                    found.append(key)
        return iter(sorted(found))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            raise UnsafeKeyError(f"object key {key!r} names a directory in {self.url}")
        path.unlink(missing_ok=True)

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            path = self.root.joinpath(*key.split("/"))
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            yield ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def modified(self, key: str) -> datetime:
        path = self._path(key)
        try:
            return _mtime(path)
        except FileNotFoundError:
            raise BlobNotFound(key, self.url) from None

    def touch(self, key: str) -> None:
        if not _refresh(self._path(key)):
            raise BlobNotFound(key, self.url)

    def delete_if_older(self, key: str, *, cutoff: datetime) -> bool:
        """Move ``key`` aside (atomic), then delete it if its mtime is before ``cutoff``.

        A ``touch`` that came before the move shows in the moved file's mtime, and the blob is
        put back; one that comes after finds no file, so that upload links its own copy.
        """
        path = self._path(key)
        if path.is_dir():
            raise UnsafeKeyError(f"object key {key!r} names a directory in {self.url}")
        aside = self.root / TMP_PREFIX / f"gc-{uuid.uuid4().hex}.trash"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if _mtime(aside) < cutoff:
                return True
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # an upload stored the same bytes again meanwhile
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                if not path.exists():
                    os.replace(aside, path)
            return False
        finally:
            aside.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        """The blob's real file (read-only): callers may ``safe_open``/mmap it directly."""
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key, self.url)
        return path
