"""Names for the processes that share one storage folder and one index, and whether one still runs.

Why: several nodes and compression workers, on one machine or several, leave
traces of what they are doing: a claimed queue item (its lease owner) and a
half-written file in tmp/.  When one of them dies, what it left must be taken
back, but only then.  A name says which host, process and (for a
compression thread) which compressor it belongs to.  On the same host a
process that no longer exists is certainly gone; what a process of another
host left is never judged here (a lease runs out instead, and fsck reports
old temporary files).
"""
from __future__ import annotations

import os
import socket
import threading
import uuid

_live: set[str] = set()          # compressor tags of this process that are running
_lock = threading.Lock()


def host() -> str:
    return socket.gethostname()


def new_tag() -> str:
    """A tag for one compressor of this process (a node or worker stopped and started again in one
    process gets a new one, so what the stopped one claimed is recognised as left behind)."""
    return uuid.uuid4().hex[:8]


def name(tag: str = "", thread: int | str = "") -> str:
    """``host:pid`` and, for a compression thread, ``:tag-thread``."""
    base = f"{host()}:{os.getpid()}"
    return f"{base}:{tag}-{thread}" if tag else base


def alive(tag: str, running: bool) -> None:
    """Record whether the compressor ``tag`` of this process runs."""
    with _lock:
        (_live.add if running else _live.discard)(tag)


def gone(owner: str) -> bool:
    """Whether ``owner`` (a :func:`name`) was on this host and no longer runs.  An empty owner (a claim
    made before names existed, or by a tool) is gone; one of another host is not judged (False)."""
    if not owner:
        return True
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != host() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        if len(parts) < 3:
            return False
        with _lock:
            return parts[2].partition("-")[0] not in _live
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:      # exists, run by another user
        return False
    return False
