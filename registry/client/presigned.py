"""Client side of presigned multipart uploads: parts go straight to S3, not through the server.

The server hands out one presigned ``UploadPart`` URL per part; each part is PUT with a plain
HTTP client that carries no registry token (the URL is the credential), its ``ETag`` collected,
and the server asked to complete, verify and attach the file. Any failure aborts the upload.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_THRESHOLD = 64 * 1024 * 1024
UNSUPPORTED = "presigned_unsupported"


def put_parts(plan: dict[str, Any], path: Path, *, progress: bool, timeout: float) -> list[dict]:
    """PUT each part of ``path`` to its presigned URL; returns ``[{part_number, etag}]``."""
    step = int(plan["part_size"])
    done: list[dict] = []
    bar = tqdm(
        total=path.stat().st_size,
        desc=f"upload {path.name}",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    with bar, httpx.Client(timeout=timeout) as s3, path.open("rb") as handle:
        for part in plan["parts"]:
            handle.seek((int(part["part_number"]) - 1) * step)
            data = handle.read(step)
            reply = s3.put(part["url"], content=data)
            if not reply.is_success:
                raise httpx.HTTPStatusError(
                    f"S3 refused part {part['part_number']} of '{path.name}': "
                    f"HTTP {reply.status_code} {reply.text[:200]}",
                    request=reply.request,
                    response=reply,
                )
            done.append({"part_number": part["part_number"], "etag": reply.headers["ETag"]})
            bar.update(len(data))
    return done


def upload_presigned(
    call_json: Callable[..., Any],
    http: httpx.Client,
    url: str,
    path: Path,
    *,
    name: str,
    sha256: str,
    progress: bool,
) -> dict[str, Any]:
    """Open the upload at ``url`` (``.../checkpoints/{id}/uploads``), PUT the parts, complete.

    ``call_json(method, url, **kwargs)`` is the registry client's checked JSON request; the
    upload is aborted (best effort) when anything fails after it was opened.
    """
    body = {"name": name, "size": path.stat().st_size, "sha256": sha256}
    plan = call_json("POST", url, json=body)
    try:
        timeout = http.timeout.read or 300.0
        parts = put_parts(plan, path, progress=progress, timeout=timeout)
        result: dict[str, Any] = call_json(
            "POST", f"{url}/{plan['upload_id']}/complete", json={"parts": parts}
        )
    except BaseException:
        http.request("DELETE", f"{url}/{plan['upload_id']}")
        raise
    return result
