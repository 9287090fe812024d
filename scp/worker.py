"""``dicom-nncodec worker``: the node's background compression as a process of its own.

Why: the learned codec is the expensive part of the node, and a GPU machine
codes many times faster than the machines that receive.  A worker runs only
the compressor (the node's own :class:`scp.compressor.Compressor`: the same
rules, verification and index transaction), on the machine of your choice,
against the index and storage folder it shares with one or more nodes
(PostgreSQL and a network file system when it is another machine).  Nodes may
then run with ``compression.workers: 0``, storing and answering only.  Jobs
are claimed under leases (``compression.lease_seconds``), so any number of
workers and nodes share the queue without coding one instance twice, and the
job of a worker that dies is taken again once its lease ran out.

It reads the node's configuration file: ``index.url``, ``storage.path``,
``storage.min_free_mb``, ``compression.*`` and ``logging.*`` are used,
``compression.workers`` (or ``--threads``) is its number of threads; the
network keys are ignored.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from . import config as C
from .compressor import Compressor
from .index import Index
from .node import check_device, run_foreground
from .storage import Storage

log = logging.getLogger("scp.worker")


class Worker:
    """``Worker(cfg).start()`` ... ``.stop()``: compression threads on a shared index and storage folder."""

    def __init__(self, cfg: C.Config):
        if cfg.workers < 1:
            raise C.ConfigError("compression.workers", "is 0: a worker needs at least one thread "
                                                       "(set it, or give --threads N)")
        self.cfg = cfg
        self.storage = Storage(cfg.storage_path, fsync=cfg.fsync)
        self.index = Index(C.resolved_index_url(cfg))
        self.compressor = Compressor(cfg, self.index, self.storage)

    def start(self) -> "Worker":
        check_device(self.cfg.device)
        if not os.path.isdir(self.storage.root):
            raise OSError(f"storage folder {self.storage.root} does not exist (start a node on it first, "
                          f"or mount the shared folder)")
        self.storage.lock()                 # shared, like a node: fsck --repair waits until no worker runs
        try:
            self.storage.prepare()
            self.index.create()
            recovered = self.index.recover_queue()
            if recovered:
                log.info("%d compressions interrupted on this host put back in the queue", recovered)
            self.compressor.start()
        except BaseException:
            self.compressor.stop(0)
            self.index.dispose()
            self.storage.unlock()
            raise
        log.info("compression worker %s started: %d threads, device %s, index %s, storage %s, queue %d",
                 self.compressor.owner("*"), self.cfg.workers, self.cfg.device, self.index.shown_url,
                 self.storage.root, self.index.queue_length())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Let each thread finish the instance it is on (up to ``limits.shutdown_grace_seconds``)."""
        grace = self.cfg.shutdown_grace_seconds if grace is None else grace
        if not self.compressor.stop(max(1.0, grace)):
            log.warning("compression still running at shutdown: its lease runs out and another worker takes it")
        self.index.dispose()
        self.storage.unlock()
        log.info("compression worker stopped")

    def __enter__(self) -> "Worker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(config_path: str | None, threads: int | None = None) -> int:
    """Run a worker in the foreground until SIGINT/SIGTERM (exit status as for ``serve``)."""
    def make(cfg: C.Config) -> Worker:
        if threads is not None:
            cfg = dataclasses.replace(cfg, workers=threads)
        return Worker(cfg)

    def check(cfg: C.Config) -> None:
        if threads is not None and threads < 1:
            raise C.ConfigError("--threads", "must be at least 1")
        if threads is None and cfg.workers < 1:
            raise C.ConfigError("compression.workers", "is 0: a worker needs at least one thread "
                                                       "(set it, or give --threads N)")
        check_device(cfg.device)
    return run_foreground(config_path, make, check)
