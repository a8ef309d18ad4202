"""From a file row to the stored blob(s) its bytes are read from (see ``registry.storage.codecs``).

A row stored raw is one blob. A row stored with a codec names the other blobs it decodes
against by sha256: ``codec_base_sha256`` (the ``base`` of a delta codec) and, for codecs that
need more, ``meta["codec_refs"]`` (ref name -> sha256); ``meta["codec_params"]`` holds the codec's
parameters. Refs resolve to any file row with that sha256, so every reader and the garbage
collector see the same dependency graph.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from registry.errors import NotFound
from registry.models import Artifact
from registry.storage.codecs import StoredBlob


def codec_refs(artifact: Artifact) -> dict[str, str]:
    """Ref name -> sha256 of every blob ``artifact``'s codec decodes against."""
    refs: dict[str, str] = dict((artifact.meta or {}).get("codec_refs") or {})
    if artifact.codec_base_sha256:
        refs["base"] = artifact.codec_base_sha256
    return refs


def _row_with_sha(session: Session, sha256: str) -> Artifact:
    row = session.exec(select(Artifact).where(Artifact.sha256 == sha256).limit(1)).first()
    if row is None:
        raise NotFound(f"no stored blob with sha256 {sha256} (needed to decode a file)")
    return row


def stored_blob(session: Session, artifact: Artifact, *, _depth: int = 0) -> StoredBlob:
    """The ``StoredBlob`` that serves ``artifact``'s original bytes."""
    if artifact.codec == "raw":
        return StoredBlob(artifact.blob_key, artifact.size)
    if _depth > 8:
        raise NotFound(f"codec refs of file '{artifact.name}' nest deeper than 8 levels")
    refs = {
        name: stored_blob(session, _row_with_sha(session, sha), _depth=_depth + 1)
        for name, sha in codec_refs(artifact).items()
    }
    params: dict[str, Any] = dict((artifact.meta or {}).get("codec_params") or {})
    return StoredBlob(artifact.blob_key, artifact.size, artifact.codec, refs, params)
