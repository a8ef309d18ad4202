"""A read-only Hugging Face Hub view of the registry: checkpoint ``ckreg/<id or name>`` as a model
repository whose files are the checkpoint's files.

``huggingface_hub`` (and through it ``transformers`` and ``peft``) needs: model info with a
commit ``sha`` and ``siblings``, a tree listing, and per file an ``ETag`` and ``X-Repo-Commit``
(https://huggingface.co/docs/huggingface_hub/package_reference/environment_variables#hfendpoint).
A checkpoint's files never change once it is ready, so its revision is a content hash: the sha1
of its sorted ``name sha256`` lines, 40 hex digits like a git commit. Every file is described as
a Git LFS object (``lfs.oid`` = its sha256, which clients use as the ETag and cache key).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from registry.errors import NotFound
from registry.models import Artifact, Checkpoint, CheckpointStatus
from registry.services.common import checkpoint_files

NAMESPACE = "ckreg"
DEFAULT_REVISION = "main"


class HubNotFound(NotFound):
    """Not found, with the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound)."""

    def __init__(self, message: str, *, hub_code: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.hub_code = hub_code
        self.commit = commit


@dataclass(frozen=True)
class HubRepo:
    """A ready checkpoint seen as a repository at one revision."""

    checkpoint: Checkpoint
    files: list[Artifact]
    sha: str

    @property
    def repo_id(self) -> str:
        return f"{NAMESPACE}/{self.checkpoint.name}"

    def file(self, filename: str) -> Artifact:
        """The file ``filename``; ``HubNotFound`` (EntryNotFound) listing the files there."""
        for artifact in self.files:
            if artifact.name == filename:
                return artifact
        raise HubNotFound(
            f"{self.repo_id} (checkpoint {self.checkpoint.id}) has no file '{filename}'; "
            f"files: {', '.join(a.name for a in self.files)}",
            hub_code="EntryNotFound",
            commit=self.sha,
        )


def revision_sha(files: list[Artifact]) -> str:
    """40 hex digits identifying exactly these file names and contents."""
    lines = "".join(f"{a.name} {a.sha256}\n" for a in sorted(files, key=lambda a: a.name))
    return hashlib.sha1(lines.encode(), usedforsecurity=False).hexdigest()


def lfs_pointer_oid(sha256: str, size: int) -> str:
    """The git blob id of the file's Git LFS pointer, as the Hub reports an LFS file's ``oid``."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    blob = f"blob {len(pointer)}\0{pointer}".encode()
    return hashlib.sha1(blob, usedforsecurity=False).hexdigest()


def find_repo(*, session: Session, namespace: str, name: str, revision: str) -> HubRepo:
    """The repo ``namespace/name`` at ``revision`` ("main" or a revision sha).

    ``name`` is a checkpoint id or name; a name held by several ready checkpoints means the
    newest at "main", and any of them by its revision sha.
    """
    candidates = _candidates(session, namespace, name)
    for checkpoint in candidates:
        files = checkpoint_files(session, checkpoint.id or 0)
        sha = revision_sha(files)
        if revision in (DEFAULT_REVISION, sha):
            return HubRepo(checkpoint=checkpoint, files=files, sha=sha)
    raise HubNotFound(
        f"{namespace}/{name} has no revision '{revision}' (use '{DEFAULT_REVISION}' or a sha "
        "from its model info)",
        hub_code="RevisionNotFound",
    )


def _candidates(session: Session, namespace: str, name: str) -> list[Checkpoint]:
    """Ready checkpoints the repo name can mean, newest first (at most one for an id)."""
    missing = HubNotFound(
        f"repository '{namespace}/{name}' not found: use '{NAMESPACE}/<checkpoint id or name>' "
        "of a ready checkpoint",
        hub_code="RepoNotFound",
    )
    if namespace != NAMESPACE:
        raise missing
    ready = select(Checkpoint).where(Checkpoint.status == CheckpointStatus.ready)
    if name.isdigit() and len(name) < 19:
        found = session.exec(ready.where(Checkpoint.id == int(name))).first()
        if found is not None:
            return [found]
    rows = list(
        session.exec(ready.where(Checkpoint.name == name).order_by(col(Checkpoint.id).desc()))
    )
    if not rows:
        raise missing
    return rows


def model_info(repo: HubRepo) -> dict[str, Any]:
    """The ``/api/models/{repo_id}`` body: id, sha, siblings (size, blobId, lfs sha256), card data."""
    checkpoint = repo.checkpoint
    return {
        "_id": str(checkpoint.id),
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": NAMESPACE,
        "sha": repo.sha,
        "lastModified": hub_time(checkpoint.created_at),
        "createdAt": hub_time(checkpoint.created_at),
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [str(checkpoint.kind), *checkpoint.tags],
        "library_name": "peft" if str(checkpoint.kind) == "adapter" else "transformers",
        "siblings": [_sibling(a) for a in repo.files],
        "usedStorage": sum(a.size for a in repo.files),
        "ckreg": {"checkpoint_id": checkpoint.id, "kind": str(checkpoint.kind)},
    }


def hub_time(moment: datetime) -> str:
    """``2024-05-01T12:00:00.000Z``: the one datetime format ``huggingface_hub`` parses."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def tree(repo: HubRepo, path: str = "") -> list[dict[str, Any]]:
    """The ``/tree`` listing: every file (they are all top-level) as an LFS file entry."""
    if path:
        raise HubNotFound(
            f"{repo.repo_id} has no folder '{path}' (checkpoint files are all top-level)",
            hub_code="EntryNotFound",
            commit=repo.sha,
        )
    return [
        {
            "type": "file",
            "oid": lfs_pointer_oid(a.sha256, a.size),
            "size": a.size,
            "path": a.name,
            "lfs": {"oid": a.sha256, "size": a.size, "pointerSize": _pointer_size(a)},
        }
        for a in repo.files
    ]


def _sibling(artifact: Artifact) -> dict[str, Any]:
    return {
        "rfilename": artifact.name,
        "size": artifact.size,
        "blobId": lfs_pointer_oid(artifact.sha256, artifact.size),
        "lfs": {
            "size": artifact.size,
            "sha256": artifact.sha256,
            "pointerSize": _pointer_size(artifact),
        },
    }


def _pointer_size(artifact: Artifact) -> int:
    return len(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{artifact.sha256}\nsize {artifact.size}\n"
    )
