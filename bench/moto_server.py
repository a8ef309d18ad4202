"""``moto_server`` with two thread-safety fixes, for the tests' and benchmarks' S3 endpoint.

    python -m bench.moto_server -H 127.0.0.1 -p PORT     # the same arguments as moto_server

moto 5.2 serves each request on its own thread but keeps an object's bytes in one file-like
buffer with one read position, and two paths touch it without the object's lock:

- ``FakeKey.etag`` (computed lazily, e.g. for a HEAD or a CopyObject's reply) seeks and reads
  the buffer unlocked. A CopyObject reading the same object at that moment can read ``b""``
  from the shared position and store an empty object; ckreg's ``touch`` (a copy onto itself)
  racing a HEAD from another writer did exactly that
  (``test_concurrent_puts_store_once[s3-multipart]`` read back ``b""``).
- ``FakeKey.dispose`` closes the buffer of an object as soon as a newer write replaces it,
  while a request that looked it up a moment earlier may still be reading it ("read of closed
  file", a 500).

Here the ETag is computed under the object's lock and a replaced object's buffer is left to
the garbage collector, which closes it once no request holds it. Everything else is moto as
installed: the same server, over HTTP.
"""

from __future__ import annotations

from typing import Any

from moto.s3.models import FakeKey
from moto.server import main as moto_main

_unlocked_etag = FakeKey.etag.fget


def _locked_etag(self: Any) -> str:
    with self.lock:
        return _unlocked_etag(self)  # type: ignore[misc,no-any-return]


def _dispose(self: Any, garbage: bool = False) -> None:
    self.disposed = True


def patch() -> None:
    """Apply both fixes to moto in this process."""
    FakeKey.etag = property(_locked_etag)  # type: ignore[assignment,method-assign]
    FakeKey.dispose = _dispose  # type: ignore[method-assign]


if __name__ == "__main__":
    patch()
    moto_main()
