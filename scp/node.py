"""The node: configuration in, a running DICOM application entity out; start, stop, signals.

Why a class and a function: ``Node(config).start()`` / ``.stop()`` runs the
node inside another process (tests use a temporary folder and port 0), and
``serve()`` is the foreground program behind ``dicom-nncodec serve`` that
turns SIGINT/SIGTERM into a graceful stop: stop accepting associations, let
running ones and the compression in progress finish (up to
``limits.shutdown_grace_seconds``), then abort what is left; anything a
worker had claimed but not finished goes back to the queue at the next start.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from pynetdicom import AE, AllStoragePresentationContexts, _config
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, StorageCommitmentPushModel,
                                  Verification)

import dicom_nncodec

from . import config as C
from .commitment import Commitments
from .compressor import Compressor
from .handlers import Services, bindings
from .index import Index, IndexUnavailable
from .ingest import Ingest
from .retrieve import Retrieval
from .storage import Storage
from .transcode import get_syntaxes, storage_syntaxes
from .transport import server_context, start_listener

log = logging.getLogger("scp.node")

QR_MODELS = (PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
             PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
             StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove)


def check_device(device: str) -> None:
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise C.ConfigError("compression.device", "cuda was asked for, but no CUDA device is available")


def check_startup(cfg: C.Config) -> None:
    """What the configuration needs from this machine (a CUDA device, usable TLS files)."""
    check_device(cfg.device)
    if cfg.tls.port is not None:
        server_context(cfg.tls)


def build_ae(cfg: C.Config) -> AE:
    _config.LOG_REQUEST_IDENTIFIERS = False     # identifiers may hold patient data
    ae = AE(ae_title=cfg.ae_title)
    ae.implementation_class_uid = dicom_nncodec.IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = dicom_nncodec.IMPLEMENTATION_VERSION_NAME
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.max_pdu_size
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.require_called_aet = cfg.check_called_ae
    syntaxes = storage_syntaxes(cfg.retrieve_syntaxes)
    for cx in AllStoragePresentationContexts:
        # scp_role: a C-GET requestor may act as Storage SCP on this association
        ae.add_supported_context(cx.abstract_syntax, syntaxes, scp_role=True, scu_role=False)
    ae.add_supported_context(Verification)
    ae.add_supported_context(StorageCommitmentPushModel)
    for model in QR_MODELS:
        ae.add_supported_context(model)
    return ae


class Node:
    def __init__(self, cfg: C.Config):
        self.cfg = cfg
        self.storage = Storage(cfg.storage_path, fsync=cfg.fsync)
        self.index = Index(C.resolved_index_url(cfg))
        self.compressor = Compressor(cfg, self.index, self.storage)
        self.commitments = Commitments(cfg, self.index, self.storage)
        self.services = Services(cfg, self.index, Ingest(cfg, self.index, self.storage, self.compressor.wake),
                                 Retrieval(cfg, self.index, self.storage), get_syntaxes(cfg.retrieve_syntaxes),
                                 self.commitments)
        self.ae: AE | None = None
        self.server = None          # the plain listener (None with port: null)
        self.tls_server = None

    @property
    def port(self) -> int | None:
        """The plain port listened on (the real one when the configuration says 0)."""
        return self.server.server_address[1] if self.server else self.cfg.port

    @property
    def tls_port(self) -> int | None:
        return self.tls_server.server_address[1] if self.tls_server else self.cfg.tls.port

    def _servers(self) -> list:
        return [s for s in (self.server, self.tls_server) if s is not None]

    def start(self) -> "Node":
        check_startup(self.cfg)
        for warning in self.cfg.warnings:
            log.warning("configuration: %s", warning)
        self.storage.lock()                 # shared: fsck --repair waits until no node runs here
        try:
            self.storage.prepare()
            self.index.create()
            recovered = self.index.recover_queue()
            if recovered:
                log.info("%d interrupted compressions put back in the queue", recovered)
            self.compressor.start()
            self.commitments.start()
            self.ae = build_ae(self.cfg)
            if self.cfg.port is not None:
                self.server = start_listener(self.ae, self.cfg, self.cfg.port, bindings(self.services), tls=False)
            if self.cfg.tls.port is not None:
                self.tls_server = start_listener(self.ae, self.cfg, self.cfg.tls.port, bindings(self.services),
                                                 tls=True)
        except BaseException:
            for server in self._servers():
                server.shutdown()
            self.server = self.tls_server = None
            self.compressor.stop(0)
            self.commitments.stop(1)
            self.index.dispose()
            self.storage.unlock()
            raise
        ports = ", ".join(f"{name} {self.cfg.bind}:{port}" for name, port in (("plain", self.port), ("TLS", self.tls_port))
                          if port is not None)
        log.info("node %s listening on %s (storage %s, %d compression workers, device %s, queue %d)",
                 self.cfg.ae_title, ports, os.path.abspath(self.cfg.storage_path),
                 self.cfg.workers, self.cfg.device, self.index.queue_length())
        return self

    def stop(self, grace: float | None = None) -> None:
        grace = self.cfg.shutdown_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        servers = self._servers()
        if servers:
            self.server = self.tls_server = None
            running = [a for server in servers for a in server.active_associations]
            for server in servers:
                server.shutdown()      # no new associations from here on
            # one still negotiating (or a bare TCP probe, which pynetdicom only notices after
            # acse_timeout) has no work in flight: it is not waited for
            running = [a for a in running if a.is_established]
            for assoc in running:
                assoc.join(max(0.0, deadline - time.monotonic()))
            for assoc in running:
                if assoc.is_alive():
                    log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                    assoc.abort()
        if not self.compressor.stop(max(1.0, deadline - time.monotonic())):
            log.warning("compression still running at shutdown: it goes back to the queue at the next start")
        self.commitments.stop(max(1.0, deadline - time.monotonic()))
        self.index.dispose()
        self.storage.unlock()
        log.info("node %s stopped", self.cfg.ae_title)

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def setup_logging(cfg: C.Config):
    """Log as configured; returns a function that puts the previous logging set-up back."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
    handler: logging.Handler = logging.FileHandler(cfg.log_file) if cfg.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level)
    logging.getLogger("pynetdicom").setLevel(cfg.pynetdicom_log_level)

    def restore() -> None:
        handler.close()
        root.handlers[:], level, pnd_level = saved
        root.setLevel(level)
        logging.getLogger("pynetdicom").setLevel(pnd_level)
    return restore


def serve(config_path: str | None) -> int:
    """Run the node in the foreground until SIGINT/SIGTERM; 2 on a configuration error."""
    return run_foreground(config_path, Node, check_startup)


def run_foreground(config_path: str | None, make, check=None) -> int:
    """Load the configuration, ``make(cfg)`` a service with start() and stop(), run it until SIGINT or
    SIGTERM (``serve`` and ``dicom-nncodec worker``).  2 on a configuration error; 1 when it cannot
    start (a port in use, an index that cannot be reached)."""
    try:
        cfg = C.load(config_path)
        if check is not None:
            check(cfg)
    except C.ConfigError as exc:
        print(f"dicom-nncodec: configuration error: {exc}", file=sys.stderr)
        return 2
    restore_logging = setup_logging(cfg)
    try:
        try:
            service = make(cfg)
        except IndexUnavailable as exc:
            print(f"dicom-nncodec: cannot start: {exc}", file=sys.stderr)
            return 1
        return _run(service)
    finally:
        restore_logging()


def _run(node) -> int:
    try:
        node.start()
    except (OSError, IndexUnavailable) as exc:
        print(f"dicom-nncodec: cannot start: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
