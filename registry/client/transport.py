"""The HTTP plumbing of the ckreg client: connection, auth header, error mapping, streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import httpx
from tqdm import tqdm

from registry.client.layouts import CHUNK, iter_file
from registry.client.presigned import DEFAULT_THRESHOLD

API_PREFIX = "/api/v1"


class ClientError(Exception):
    """The server refused a request; carries the HTTP status, error code and the server's message."""

    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.message = message
        super().__init__(f"HTTP {status}" + (f" {error}" if error else "") + f": {message}")


class BaseClient:
    """One registry server's connection; use as a context manager or call ``close()``."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 300.0,
        *,
        presigned_threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        self.presigned_threshold = presigned_threshold
        self.last_upload_presigned: bool | None = None
        self._presigned_ok = True  # cleared once the server says its store cannot take them
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + API_PREFIX, headers=headers, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return checked_response(self._http.request(method, url, **kwargs)).json()

    def _upload(
        self,
        method: str,
        url: str,
        path: Path,
        headers: dict[str, str],
        *,
        progress: bool,
        **kwargs: Any,
    ) -> dict[str, Any]:
        headers = headers | {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(path.stat().st_size),
        }
        body = iter_file(path, progress=progress, desc=f"upload {path.name}")
        return self._json(method, url, content=body, headers=headers, **kwargs)

    def _download(self, url: str, name: str, dest: Path, progress: bool) -> Path:
        target = dest / name if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with self._http.stream("GET", url) as response:
            checked_response(response)
            total = int(response.headers.get("Content-Length", 0)) or None
            bar = tqdm(
                total=total,
                desc=f"download {name}",
                unit="B",
                unit_scale=True,
                disable=not progress,
            )
            with bar, partial.open("wb") as handle:
                for chunk in response.iter_bytes(CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))
        partial.replace(target)
        return target


def checked_response(response: httpx.Response) -> httpx.Response:
    """Raise ``ClientError`` with the server's ``{"detail": {"error", "message"}}`` for 4xx/5xx."""
    if response.is_success:
        return response
    response.read()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, dict):
        raise ClientError(
            response.status_code, str(detail.get("message", detail)), detail.get("error")
        )
    if isinstance(detail, list):  # FastAPI request validation: [{loc, msg, ...}]
        message = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
        raise ClientError(response.status_code, message, "validation_error")
    raise ClientError(response.status_code, str(detail) or response.reason_phrase)
