"""The stored files: durable writes under names that come from nowhere.

Why: an acknowledged C-STORE must survive a crash or a power cut, so every
file is written to a temporary name, fsynced, renamed into place and its
folder fsynced before anyone is told it exists.  Names are random
(``objects/ab/cd/<32 hex>.dcm``), so no received value (a UID, a patient
name) ever becomes part of a path, and a replaced or re-compressed instance
gets a new file that the index switches to in one transaction; the old file
is removed only after that commit.  The index stores paths relative to the
storage root, so the folder can be moved.

A received data set is first *staged* (written to tmp/ and checked there, so
no copy of it is held in memory) and only *committed* (fsynced and renamed
into objects/) once it passed its checks.  Whatever a crash leaves in tmp/ was
never acknowledged and is removed at the next start.  Several processes (nodes
and compression workers) may share one storage folder: a temporary name
carries the writing process's host and process id, and a start removes only
those of processes of its host that no longer run.  A running node or worker
holds a shared lock on ``node.lock``; ``fsck --repair`` takes it exclusively,
so it never rearranges files under a running one (on a network file system
as far as it supports ``flock``: NFS v4 does).
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import BinaryIO, Callable, Iterable

from . import owners

try:
    import fcntl
except ImportError:          # (not on Windows: no lock there)
    fcntl = None

log = logging.getLogger("scp.storage")

OBJECTS = "objects"
TEMP = "tmp"
LOCK = "node.lock"

Content = bytes | Iterable[bytes] | Callable[[BinaryIO], None]


class Locked(OSError):
    """Another process holds the storage folder's lock (a running node, or fsck --repair)."""


class Staged:
    """A file written to tmp/ but not yet part of the storage: :meth:`commit` or :meth:`discard` it."""

    def __init__(self, storage: "Storage", path: str, size: int):
        self.storage, self.path, self.size = storage, path, size

    def commit(self) -> str:
        """fsync, rename into objects/ under a new random name, fsync the folders; the relative path."""
        return self.storage._commit(self)

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Storage:
    def __init__(self, root: str, fsync: bool = True):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._lock_fd: int | None = None

    def lock(self, exclusive: bool = False) -> None:
        """Hold the storage lock until :meth:`unlock` (shared: nodes; exclusive: fsck --repair).
        Raises :class:`Locked` when it cannot be had at once."""
        if fcntl is None or self._lock_fd is not None:
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise Locked(f"{self.root} is in use by a running node or fsck --repair") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def prepare(self) -> None:
        """Create the folders and drop temporary files that processes of this host left behind when they
        stopped (those of running processes, and of other hosts, are left alone)."""
        os.makedirs(os.path.join(self.root, OBJECTS), exist_ok=True)
        tmp = os.path.join(self.root, TEMP)
        os.makedirs(tmp, exist_ok=True)
        for name in os.listdir(tmp):
            if not owners.gone(temp_owner(name)):
                continue
            try:
                os.unlink(os.path.join(tmp, name))
            except OSError:
                pass

    def abspath(self, rel: str) -> str:
        full = os.path.normpath(os.path.join(self.root, rel))
        if not full.startswith(self.root + os.sep):
            raise ValueError("stored path escapes the storage folder")
        return full

    def write(self, content: Content) -> tuple[str, int]:
        """Write a new file durably; returns (relative path, size).

        ``content`` is the bytes, a sequence of byte strings, or a function writing to a file object."""
        staged = self.stage(content)
        try:
            return staged.commit(), staged.size
        except BaseException:
            staged.discard()
            raise

    def stage(self, content: Content) -> Staged:
        """Write ``content`` to a new file in tmp/ (not yet durable, not yet in objects/)."""
        tmp = os.path.join(self.root, TEMP, f"{uuid.uuid4().hex}.{owners.name()}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as f:
                if callable(content):
                    content(f)
                elif isinstance(content, (bytes, bytearray, memoryview)):
                    f.write(content)
                else:
                    for part in content:
                        f.write(part)
                f.flush()
                size = f.tell()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return Staged(self, tmp, size)

    def _commit(self, staged: Staged) -> str:
        name = uuid.uuid4().hex
        rel = os.path.join(OBJECTS, name[:2], name[2:4], name + ".dcm")
        final = os.path.join(self.root, rel)
        if self.fsync:
            _fsync_file(staged.path)
        folder = os.path.dirname(final)
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        os.replace(staged.path, final)
        if self.fsync:
            _fsync_dir(folder)
            if created:
                _fsync_dir(os.path.dirname(folder))
                _fsync_dir(os.path.dirname(os.path.dirname(folder)))
        return rel

    def remove(self, rel: str | None) -> None:
        """Remove a file that the index no longer points to (missing is fine)."""
        if not rel:
            return
        try:
            os.unlink(self.abspath(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove superseded file %s: %s", rel, exc.strerror)

    def files(self, folder: str = OBJECTS) -> list[str]:
        """Every file under ``folder`` (objects/ by default), as paths relative to the storage root."""
        top = os.path.join(self.root, folder)
        return sorted(os.path.relpath(os.path.join(d, f), self.root) for d, _, fs in os.walk(top) for f in fs)

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20


def temp_owner(name: str) -> str:
    """The process (scp.owners.name) that wrote the temporary file ``name``; "" for an older name."""
    parts = name.split(".", 1)
    return parts[1][:-len(".part")] if len(parts) == 2 and parts[1].endswith(".part") else ""


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
