"""The engine's sink for a merge into a folder (``engine.merge_to_dir``): the merged model
into one ``ShardedWriter`` (it takes whole tensors, and slices of declared ones: a
``mergeops.slice_io.RowSink``), each extra output stream into a sub-folder of its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mergeops.io.streamed import TensorSpec
from mergeops.io.writer import ShardedWriter, check_stream_name


class DirSink:
    """The merged model into one sharded writer (slices of chunked tensors written in place
    by its background thread, when the layout is declared), each extra stream into a
    sub-folder of its own (buffered writer)."""

    def __init__(
        self,
        staging: Path,
        max_shard_size: int | str,
        metadata: dict[str, str],
        layout: list[TensorSpec] | None,
    ) -> None:
        self.staging, self.max_shard_size, self.metadata = staging, max_shard_size, metadata
        main = ShardedWriter(staging, max_shard_size=max_shard_size, metadata=metadata,
                             layout=layout, background=layout is not None)  # fmt: skip
        self.writers: dict[str | None, ShardedWriter] = {None: main}
        self.takes_rows = layout is not None

    def __call__(self, name: str, stream: str | None, tensor: torch.Tensor) -> None:
        if stream not in self.writers:
            folder = self.staging / check_stream_name(str(stream))
            self.writers[stream] = ShardedWriter(
                folder, max_shard_size=self.max_shard_size, metadata=self.metadata
            )
        self.writers[stream].add(name, tensor)

    def write_rows(
        self,
        name: str,
        byte_offset: int,
        data: torch.Tensor,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.writers[None].write_rows(name, byte_offset, data, release)

    def rows_done(self, name: str) -> None:
        self.writers[None].rows_done(name)
