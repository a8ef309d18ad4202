"""S3 multipart uploads for ``S3ObjectStore``: one upload's parts, and a bounded part pipeline.

``PartPipeline`` keeps at most ``in_flight`` ``UploadPart`` requests running on worker threads
while the caller goes on reading (and hashing, via ``PartReader``) the stream into recycled
buffers, so a write holds at most ``in_flight + 1`` part buffers: those in flight plus the one
being filled. Chunks are copied once, straight into a part buffer.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any

from botocore.exceptions import ClientError

from registry.storage.base import HashingCounter, StorageError

MAX_PARTS = 10_000


def error_code(exc: ClientError) -> str:
    """The S3 error code of a botocore ``ClientError`` ('' when the reply has none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


class MultipartUpload:
    """One multipart upload; part numbers are handed out in order by ``next_number``.

    ``put_part`` may run on several threads at once; ``complete`` lists the parts in order.
    """

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.parts: list[dict[str, Any]] = []
        self.finished = False
        self._numbers = 0
        self._lock = threading.Lock()

    def next_number(self) -> int:
        """The number of the next part (1-based); fails past S3's limit of parts."""
        if self._numbers >= MAX_PARTS:
            raise StorageError(
                f"upload to '{self.key}' needs more than {MAX_PARTS} parts; raise part_size"
            )
        self._numbers += 1
        return self._numbers

    def _record(self, number: int, etag: str) -> None:
        with self._lock:
            self.parts.append({"ETag": etag, "PartNumber": number})

    def put_part(self, number: int, data: bytes | bytearray) -> None:
        """Upload part ``number`` (thread-safe)."""
        reply = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
        )
        self._record(number, reply["ETag"])

    def add(self, data: bytes | bytearray) -> None:
        """Upload ``data`` as the next part, in this thread."""
        self.put_part(self.next_number(), data)

    def add_copy(self, source_key: str, first: int, last: int) -> None:
        """Copy bytes ``first..last`` (inclusive) of ``source_key`` as the next part."""
        number = self.next_number()
        reply = self.client.upload_part_copy(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            CopySource={"Bucket": self.bucket, "Key": source_key},
            CopySourceRange=f"bytes={first}-{last}",
        )
        self._record(number, reply["CopyPartResult"]["ETag"])

    def complete(self, *, if_absent: bool) -> bool:
        """Finish the upload; False (and aborted) when ``if_absent`` and the key already exists."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        parts = sorted(self.parts, key=lambda part: int(part["PartNumber"]))
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
                **extra,
            )
        except ClientError as exc:
            if error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            self.abort()
            return False
        self.finished = True
        return True

    def abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        # Best effort: a bucket lifecycle rule reaps whatever an abort could not.
        with contextlib.suppress(ClientError):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )


class PartReader:
    """Copies a stream of chunks into part buffers, hashing each chunk as it arrives."""

    def __init__(self, chunks: Iterator[bytes], counter: HashingCounter) -> None:
        self._chunks = chunks
        self._counter = counter
        self._pending = memoryview(b"")  # the unread rest of the current chunk

    def _pull(self) -> bool:
        """Fetch (and hash) the next chunk when none is pending; False at the end of the stream."""
        if self._pending:
            return True
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._counter.update(chunk)
        self._pending = memoryview(chunk)  # slices of a view copy nothing
        return True

    def fill(self, buffer: bytearray, size: int) -> bytearray:
        """Write up to ``size`` stream bytes into ``buffer`` (reused or empty), trimmed to them."""
        filled = 0
        while filled < size and self._pull():
            step = min(len(self._pending), size - filled)
            buffer[filled : filled + step] = self._pending[:step]
            self._pending = self._pending[step:]
            filled += step
        del buffer[filled:]  # a no-op for a full part
        return buffer

    def at_end(self) -> bool:
        """True once the stream has no more bytes (reads ahead one chunk to know)."""
        return not self._pull()


class PartPipeline:
    """Uploads the parts of ``upload`` on ``in_flight`` worker threads, recycling part buffers.

    The caller fills buffers from ``take_buffer`` (besides its own first one) and hands them to
    ``submit``; a buffer comes back for reuse once its part is uploaded, so at most
    ``in_flight + 1`` buffers exist. Failures of earlier parts are re-raised by ``take_buffer``,
    ``submit`` and ``drain``. Leaving the ``with`` block cancels parts not yet started and waits
    for the running ones, so the caller can abort the upload safely afterwards.
    """

    def __init__(self, upload: MultipartUpload, *, in_flight: int, part_size: int) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.upload = upload
        self.in_flight = in_flight
        self.part_size = part_size
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._created = 0
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="s3-part")
        self._running: list[Future[None]] = []

    def take_buffer(self) -> bytearray:
        """A part buffer to fill: a returned one, a new one, or the next to come back."""
        self._raise_failures()
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            if self._created < self.in_flight:
                self._created += 1
                return bytearray(self.part_size)
            buffer = self._free.get()  # workers return buffers even when their part fails
        self._raise_failures()
        return buffer

    def submit(self, buffer: bytearray) -> None:
        """Upload ``buffer`` as the next part; it must not be touched until it comes back."""
        number = self.upload.next_number()
        self._raise_failures()
        self._running.append(self._pool.submit(self._upload, number, buffer))

    def _upload(self, number: int, buffer: bytearray) -> None:
        try:
            self.upload.put_part(number, buffer)
        finally:
            self._free.put(buffer)

    def drain(self) -> None:
        """Wait until every submitted part is uploaded; re-raises the first failure."""
        wait(self._running)
        self._raise_failures()

    def _raise_failures(self) -> None:
        running = []
        for future in self._running:
            if future.done():
                future.result()  # re-raises the part's failure in the caller's thread
            else:
                running.append(future)
        self._running = running

    def __enter__(self) -> PartPipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
