"""Readers and writers: lazy tensor sources in, staged sharded safetensors out."""

from mergeops.io.layouts import open_source
from mergeops.io.peft import PeftAdapter
from mergeops.io.readers import (
    INDEX_NAME,
    SafetensorsFile,
    ShardedCheckpoint,
    SourceError,
    StateDictSource,
)
from mergeops.io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    OutputError,
    ShardedWriter,
    parse_size,
    staged_output,
    write_safetensors,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_NAME",
    "OutputError",
    "PeftAdapter",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "ShardedWriter",
    "SourceError",
    "StateDictSource",
    "open_source",
    "parse_size",
    "staged_output",
    "write_safetensors",
]
