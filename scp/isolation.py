"""Containing what native decoders raise: one helper for every place where data from outside is decoded.

Why: a Rust extension built with PyO3 (pylibjpeg-rle, for one) turns a panic
into ``pyo3_runtime.PanicException``, which derives from ``BaseException``,
not ``Exception``.  ``except Exception`` lets it through, and it ends the
thread it runs in: an association thread (the peer gets no answer) or a
compression worker (the queue stops).  At each boundary where received or
stored data is decoded (ingest checks, the compressor, transcoding for
retrieval, storage commitment, fsck) the work runs inside :func:`contained`,
which turns such an exception into :class:`Panic`, an ordinary ``Exception``
that the boundary's own handling already refuses, records or reports.

``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` are never
contained: they mean "stop", not "this data is bad".
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

log = logging.getLogger("scp.isolation")

NEVER_CONTAINED = (KeyboardInterrupt, SystemExit, GeneratorExit)


class Panic(Exception):
    """A native decoder (or another extension) raised a ``BaseException`` that is not a request to stop."""

    def __init__(self, what: str, cause: BaseException):
        super().__init__(f"native code panicked while {what}: {type(cause).__name__}: {cause}")
        self.what, self.cause = what, cause


def is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``BaseException`` that ``except Exception`` misses and that is not a stop."""
    return not isinstance(exc, (Exception, *NEVER_CONTAINED))


@contextlib.contextmanager
def contained(what: str, into: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """Run the block; a panic inside it leaves it as :class:`Panic` (or as ``into(message)``), logged once.

    ``what`` completes "native code panicked while ...", e.g. "checking the received data set".
    Ordinary exceptions and the stops pass through unchanged."""
    try:
        yield
    except BaseException as exc:
        if not is_panic(exc):
            raise
        panic = Panic(what, exc)
        log.error("%s (contained)", panic)
        log.debug("panic", exc_info=True)
        if into is not None:
            raise into(str(panic)) from exc
        raise panic from exc
