"""The stored files: durable writes under names that come from nowhere.

Why: an acknowledged C-STORE must survive a crash or a power cut, so every
file is written to a temporary name, fsynced, renamed into place and its
folder fsynced before anyone is told it exists.  Names are random
(``objects/ab/cd/<32 hex>.dcm``), so no received value (a UID, a patient
name) ever becomes part of a path, and a replaced or re-compressed instance
gets a new file that the index switches to in one transaction; the old file
is removed only after that commit.  The index stores paths relative to the
storage root, so the folder can be moved.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import BinaryIO, Callable

log = logging.getLogger("scp.storage")

OBJECTS = "objects"
TEMP = "tmp"


class Storage:
    def __init__(self, root: str, fsync: bool = True):
        self.root = os.path.abspath(root)
        self.fsync = fsync

    def prepare(self) -> None:
        """Create the folders and drop temporary files a crash left behind."""
        os.makedirs(os.path.join(self.root, OBJECTS), exist_ok=True)
        tmp = os.path.join(self.root, TEMP)
        os.makedirs(tmp, exist_ok=True)
        for name in os.listdir(tmp):
            try:
                os.unlink(os.path.join(tmp, name))
            except OSError:
                pass

    def abspath(self, rel: str) -> str:
        full = os.path.normpath(os.path.join(self.root, rel))
        if not full.startswith(self.root + os.sep):
            raise ValueError("stored path escapes the storage folder")
        return full

    def write(self, content: bytes | Callable[[BinaryIO], None]) -> tuple[str, int]:
        """Write a new file durably; returns (relative path, size).

        ``content`` is the bytes, or a function writing them to a file object."""
        name = uuid.uuid4().hex
        tmp = os.path.join(self.root, TEMP, name + ".part")
        rel = os.path.join(OBJECTS, name[:2], name[2:4], name + ".dcm")
        final = os.path.join(self.root, rel)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as f:
                if callable(content):
                    content(f)
                else:
                    f.write(content)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                size = f.tell()
            folder = os.path.dirname(final)
            created = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(folder)
                if created:
                    _fsync_dir(os.path.dirname(folder))
                    _fsync_dir(os.path.dirname(os.path.dirname(folder)))
        except BaseException:
            for p in (tmp,):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        return rel, size

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

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
