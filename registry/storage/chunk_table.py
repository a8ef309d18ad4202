"""The container of a chunked, compressed blob: independently decodable chunks, then a chunk
table, then a fixed-size footer — so any byte range of the original file is served by fetching
and decoding only the chunks it overlaps.

Layout: ``payload_0 … payload_{n-1} | table | footer``. The table holds one fixed-size record
per chunk (original start and length, payload offset and length, encoding, element dtype, and
the original byte offset of the base bytes a delta chunk was XORed with). The footer is
``MAGIC, version, table offset, table length, original size`` so the object describes itself;
the registry also keeps ``(table offset, table length)`` in the file row's codec params to read
the table in one request.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"CKZC"
VERSION = 1
_RECORD = struct.Struct("<QIQIBBQ")
_FOOTER = struct.Struct("<4sIQQQ")
FOOTER_SIZE = _FOOTER.size
NO_BASE = (1 << 64) - 1


class ChunkFormatError(ValueError):
    """A stored object whose chunk table or footer is malformed."""


class Encoding(IntEnum):
    """How one chunk's payload is encoded; the ``XOR_*`` ones are taken against base bytes."""

    RAW = 0
    ZSTD = 1
    ZIPNN = 2
    XOR_ZSTD = 3
    XOR_ZIPNN = 4

    @property
    def is_delta(self) -> bool:
        """Whether decoding needs the base's bytes."""
        return self in (Encoding.XOR_ZSTD, Encoding.XOR_ZIPNN)


# Element dtypes zipnn separates into byte groups (safetensors dtype -> code); 0 = plain bytes.
DTYPE_CODES = {"": 0, "BF16": 1, "F16": 2, "F32": 3}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Chunk:
    """One chunk: original bytes ``[start, start + length)`` stored at payload ``offset``."""

    start: int
    length: int
    offset: int
    stored: int
    encoding: Encoding
    dtype: str
    base_start: int | None = None

    @property
    def end(self) -> int:
        """One past the chunk's last original byte."""
        return self.start + self.length


class ChunkTable:
    """The chunks of one blob, in original order, with lookup by original byte range."""

    def __init__(self, chunks: Sequence[Chunk], size: int) -> None:
        self.chunks = list(chunks)
        self.size = size
        self._starts = [chunk.start for chunk in self.chunks]

    def overlapping(self, start: int, end: int) -> list[Chunk]:
        """The chunks that hold any byte of ``[start, end)``, in order."""
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, end)
        return self.chunks[first:last]

    @property
    def uses_base(self) -> bool:
        """Whether any chunk is a delta against the base."""
        return any(chunk.encoding.is_delta for chunk in self.chunks)


def encode_table(chunks: Sequence[Chunk]) -> bytes:
    """The table records of ``chunks``."""
    return b"".join(
        _RECORD.pack(
            c.start,
            c.length,
            c.offset,
            c.stored,
            int(c.encoding),
            DTYPE_CODES[c.dtype],
            NO_BASE if c.base_start is None else c.base_start,
        )
        for c in chunks
    )


def encode_footer(table_offset: int, table_length: int, size: int) -> bytes:
    """The fixed-size footer that closes the object."""
    return _FOOTER.pack(MAGIC, VERSION, table_offset, table_length, size)


def decode_footer(raw: bytes, *, where: str) -> tuple[int, int, int]:
    """``(table offset, table length, original size)`` from a footer."""
    if len(raw) != FOOTER_SIZE:
        raise ChunkFormatError(f"{where}: footer is {len(raw)} bytes, expected {FOOTER_SIZE}")
    magic, version, offset, length, size = _FOOTER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise ChunkFormatError(f"{where}: not a chunked blob (magic {magic!r}, version {version})")
    return offset, length, size


def decode_table(raw: bytes, *, size: int, where: str) -> ChunkTable:
    """Parse table records, checking that the chunks tile ``[0, size)`` in order."""
    if len(raw) % _RECORD.size:
        raise ChunkFormatError(f"{where}: table of {len(raw)} bytes is not whole records")
    chunks, position = [], 0
    for start, length, offset, stored, encoding, dtype, base in _RECORD.iter_unpack(raw):
        if start != position or length == 0 or dtype not in DTYPE_NAMES:
            raise ChunkFormatError(
                f"{where}: chunk at original byte {start} (length {length}, dtype code {dtype}) "
                f"does not continue the table at byte {position}"
            )
        try:
            kind = Encoding(encoding)
        except ValueError:
            raise ChunkFormatError(f"{where}: unknown chunk encoding {encoding}") from None
        base_start = None if base == NO_BASE else base
        chunks.append(Chunk(start, length, offset, stored, kind, DTYPE_NAMES[dtype], base_start))
        position += length
    if position != size:
        raise ChunkFormatError(f"{where}: chunks cover {position} bytes of a {size}-byte file")
    return ChunkTable(chunks, size)
