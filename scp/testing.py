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
