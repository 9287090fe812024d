"""Crash points for the fault-injection tests: where a SIGKILL would hurt most.

Why in the product: a test that kills the node at a random moment rarely hits
the few instructions between writing a file and committing the index that
points to it.  Each such place calls :func:`point` with a name; with
``NNCODEC_CRASH_AT=name`` (or ``name:N`` for the N-th time) in the environment
the process kills itself there with SIGKILL, exactly as a power cut or the
OOM killer would stop it.  Without that variable (always, in production) a
point costs one comparison.
"""
from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "ingest.staged",       # the received data set is in tmp/, not yet renamed into objects/
    "ingest.renamed",      # the file is in objects/, the index does not know it yet
    "ingest.indexed",      # the index commit is done, the C-STORE response not yet sent
    "ingest.replaced",     # duplicates: replace; the index points to the new file, the old one is still there
    "compress.coded",      # a worker has coded and checked the result in memory, nothing is written yet
    "compress.written",    # the compressed file is in objects/, the index still points to the original
    "compress.switched",   # the index points to the compressed file, the original is still there
    "commit.recorded",     # a storage commitment request is in the index, the N-ACTION response not yet sent
)


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("NNCODEC_CRASH_AT", "")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"NNCODEC_CRASH_AT: unknown crash point {name!r} (known: {', '.join(POINTS)})")
    return name, int(count or 1)


_ARMED = _armed()
_hits = 0
_lock = threading.Lock()


def point(name: str) -> None:
    global _hits
    if _ARMED is None or name != _ARMED[0]:
        return
    with _lock:
        _hits += 1
        if _hits == _ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)
