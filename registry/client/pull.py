"""``ckreg pull`` / ``Client.pull``: download every file of a checkpoint into a folder that
``from_pretrained`` loads, in parallel, resumable and checked against the registry's sha256.

A file already in the folder with the right sha256 is kept. A ``<name>.partial`` file left by an
interrupted pull is continued with an HTTP ``Range`` request. Each file is hashed as it arrives
and moved into place only when its sha256 matches; a mismatch removes the partial file.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from registry.client.layouts import CHUNK, SAFE_NAME, sha256_file
from registry.client.transport import BaseClient, ClientError, checked_response

DEFAULT_WORKERS = 4
PARTIAL = ".partial"


class PullError(ClientError):
    """A pulled file does not match the registry's sha256, or the checkpoint cannot be pulled."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message, "pull_failed")


def resolve_checkpoint(client: BaseClient, ref: str | int) -> dict[str, Any]:
    """The checkpoint ``ref`` names: an id, else the newest ready checkpoint with that name."""
    text = str(ref)
    if text.isdigit():
        return client._json("GET", f"/checkpoints/{int(text)}")  # type: ignore[no-any-return]
    page = client._json("GET", "/checkpoints", params={"name": text, "status": "ready", "limit": 1})
    if not page["items"]:
        raise PullError(f"no ready checkpoint is named '{text}' (give its id or an exact name)")
    return page["items"][0]  # type: ignore[no-any-return]


def pull_checkpoint(
    client: BaseClient,
    ref: str | int,
    dest: Path | str,
    *,
    workers: int = DEFAULT_WORKERS,
    progress: bool = True,
) -> Path:
    """Download every file of checkpoint ``ref`` (id or name) into ``dest``; returns ``dest``."""
    checkpoint = resolve_checkpoint(client, ref)
    if checkpoint["status"] != "ready":
        raise PullError(
            f"checkpoint {checkpoint['id']} '{checkpoint['name']}' is {checkpoint['status']}, not ready"
        )
    files = checkpoint.get("files", [])
    for file in files:  # names come from the server; they still must not leave ``dest``
        if not SAFE_NAME.fullmatch(file["name"]) or ".." in file["name"]:
            raise PullError(
                f"checkpoint {checkpoint['id']}: refusing unsafe file name {file['name']!r}"
            )
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if not _already_there(folder / f["name"], f)]
    total = sum(f["size"] for f in todo)
    desc = f"pull {checkpoint['name']} ({len(todo)} of {len(files)} files)"
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        lock = threading.Lock()

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = [
                pool.submit(_fetch, client, checkpoint["id"], file, folder, advance)
                for file in todo
            ]
            for job in jobs:
                job.result()
    return folder


def _already_there(target: Path, file: dict[str, Any]) -> bool:
    return (
        target.is_file()
        and target.stat().st_size == file["size"]
        and sha256_file(target) == file["sha256"]
    )


def _fetch(
    client: BaseClient, checkpoint_id: int, file: dict[str, Any], folder: Path, advance: Any
) -> None:
    """Download one file into ``folder``, continuing its ``.partial``; check its sha256."""
    name, size = file["name"], int(file["size"])
    partial = folder / (name + PARTIAL)
    digest = hashlib.sha256()
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    if have:
        with partial.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        advance(have)
    if have < size or size == 0:
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"/checkpoints/{checkpoint_id}/files/{name}"
        with client._http.stream("GET", url, headers=headers) as response:
            checked_response(response)
            if have and response.status_code != 206:  # Range ignored: start over
                have, digest = 0, hashlib.sha256()
            with partial.open("ab" if have else "wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
    if digest.hexdigest() != file["sha256"]:
        partial.unlink(missing_ok=True)
        raise PullError(
            f"file '{name}' of checkpoint {checkpoint_id}: downloaded bytes hash to "
            f"{digest.hexdigest()}, the registry says {file['sha256']}; removed, pull again"
        )
    partial.replace(folder / name)
