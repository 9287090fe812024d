"""Running a node and a peer inside one process, for tests and interoperability checks.

Why in the package: the node's own tests, the interop suite and a developer
at a Python prompt all need the same few things: a node on a free loopback
port with a throw-away storage folder, and a pynetdicom Storage SCP that
records what it receives (a C-MOVE destination).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

import dicom_nncodec

from . import config as C
from .node import Node


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def node_config(storage_path, **overrides) -> C.Config:
    """A configuration for a node on 127.0.0.1 (a free port) storing in ``storage_path``, compressing on
    the CPU.  ``overrides`` are laid over it like a YAML file (nested dicts)."""
    base = {"bind": "127.0.0.1", "port": 0,
            "storage": {"path": str(storage_path), "min_free_mb": 0},
            "compression": {"device": "cpu", "poll_seconds": 0.2},
            "limits": {"shutdown_grace_seconds": 10, "acse_timeout": 10, "dimse_timeout": 30,
                       "network_timeout": 30}}
    return C.load_dict(merged(base, overrides))


@contextlib.contextmanager
def running_node(storage_path, **overrides) -> Iterator[Node]:
    node = Node(node_config(storage_path, **overrides)).start()
    try:
        yield node
    finally:
        node.stop()


class StorageSCP:
    """A pynetdicom Storage SCP (e.g. a C-MOVE destination) that keeps what it receives.

    ``received`` holds (transfer syntax UID, dataset with file meta) in arrival order."""

    def __init__(self, ae_title: str = "DEST", syntaxes: Iterable | None = None):
        self.ae = AE(ae_title=ae_title)
        syntaxes = list(syntaxes) if syntaxes is not None else None
        for cx in AllStoragePresentationContexts:
            if syntaxes is None:
                self.ae.add_supported_context(cx.abstract_syntax)
            else:
                self.ae.add_supported_context(cx.abstract_syntax, syntaxes)
        self.received: list[tuple[str, Dataset]] = []
        self._lock = threading.Lock()
        self.server = None

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        dicom_nncodec.fix_transfer_syntax(ds)
        with self._lock:
            self.received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> "StorageSCP":
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- a pynetdicom peer acting as SCU -------------------------------------------------------------------

def send(port: int, datasets: Iterable[Dataset], calling_ae: str = "SCU", called_ae: str = "NNCODEC") -> list[int]:
    """C-STORE each dataset (in its own transfer syntax) on one association; the statuses."""
    datasets = list(datasets)
    ae = AE(ae_title=calling_ae)
    pairs = {}
    for ds in datasets:
        dicom_nncodec.fix_transfer_syntax(ds)
        pairs.setdefault(ds.SOPClassUID, set()).add(ds.file_meta.TransferSyntaxUID)
    for sop_class, syntaxes in pairs.items():
        for ts in syntaxes:
            ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    try:
        return [int(assoc.send_c_store(ds).get("Status", 0xFFFF)) for ds in datasets]
    finally:
        assoc.release()


def find(port: int, identifier: Dataset, model, calling_ae: str = "SCU") -> tuple[int, list[Dataset]]:
    """C-FIND: (final status, the pending responses' identifiers)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
    if not assoc.is_established:
        raise ConnectionError("association not established")
    out, final = [], None
    try:
        for status, ident in assoc.send_c_find(identifier, model):
            if status is not None and status.Status in (0xFF00, 0xFF01):
                out.append(ident)
            elif status is not None:
                final = int(status.Status)
    finally:
        assoc.release()
    return final, out


def get(port: int, identifier: Dataset, model, sop_classes: Iterable[str], syntaxes: Iterable,
        calling_ae: str = "SCU") -> tuple[Dataset, list[tuple[str, Dataset]]]:
    """C-GET accepting ``syntaxes`` for ``sop_classes``: (final status dataset, [(syntax, dataset)]).
    The final status carries the Failed SOP Instance UID List when the response had one."""
    from pynetdicom import build_role
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(model)
    sop_classes = list(sop_classes)
    for sc in sop_classes:
        ae.add_requested_context(sc, list(syntaxes))
    received: list[tuple[str, Dataset]] = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        dicom_nncodec.fix_transfer_syntax(ds)
        received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC",
                         ext_neg=[build_role(sc, scp_role=True) for sc in sop_classes],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise ConnectionError("association not established")
    final = None
    try:
        for status, ident in assoc.send_c_get(identifier, model):
            if status is not None and status.Status != 0xFF00:
                final = _with_failed_list(status, ident)
    finally:
        assoc.release()
    return final, received


def _with_failed_list(status: Dataset, identifier) -> Dataset:
    """The final status, with the Failed SOP Instance UID List of its identifier copied in."""
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        status.FailedSOPInstanceUIDList = identifier.FailedSOPInstanceUIDList
    return status


def failed_uids(status: Dataset) -> list[str]:
    """The Failed SOP Instance UID List of a final status as a list (pydicom collapses one value)."""
    v = status.get("FailedSOPInstanceUIDList", [])
    return [str(v)] if isinstance(v, str) else [str(x) for x in v]


def move(port: int, identifier: Dataset, destination: str, model, calling_ae: str = "SCU") -> Dataset:
    """C-MOVE to ``destination``; the final status dataset."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
    if not assoc.is_established:
        raise ConnectionError("association not established")
    final = None
    try:
        for status, ident in assoc.send_c_move(identifier, destination, model):
            if status is not None and status.Status != 0xFF00:
                final = _with_failed_list(status, ident)
    finally:
        assoc.release()
    return final
