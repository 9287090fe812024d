"""Running a node and a peer inside one process, for tests and interoperability checks.

Why in the package: the node's own tests, the interop suite and a developer
at a Python prompt all need the same few things: a node on a free loopback
port with a throw-away storage folder, and a pynetdicom Storage SCP that
records what it receives (a C-MOVE destination).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable, Iterator

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

import dicom_nncodec

from . import config as C
from .node import Node


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# index.url of the nodes made here when a test gives none ("": SQLite in the storage folder); the
# tests' index_backend fixture sets it to a PostgreSQL database to run the same tests against that
DEFAULT_INDEX_URL = ""


def node_config(storage_path, **overrides) -> C.Config:
    """A configuration for a node on 127.0.0.1 (a free port) storing in ``storage_path``, compressing on
    the CPU.  ``overrides`` are laid over it like a YAML file (nested dicts)."""
    base = {"bind": "127.0.0.1", "port": 0, "index": {"url": DEFAULT_INDEX_URL},
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
        calling_ae: str = "SCU", raw: bool = False) -> tuple[Dataset, list[tuple[str, Dataset]]]:
    """C-GET accepting ``syntaxes`` for ``sop_classes``: (final status dataset, [(syntax, dataset)]).
    The final status carries the Failed SOP Instance UID List when the response had one.  With
    ``raw``, each received data set is given as the bytes that came on the wire, not decoded."""
    from pynetdicom import build_role
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(model)
    sop_classes = list(sop_classes)
    for sc in sop_classes:
        ae.add_requested_context(sc, list(syntaxes))
    received: list[tuple[str, Dataset]] = []

    def on_store(event):
        if raw:
            received.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
            return 0x0000
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


def send_raw(port: int, items: Iterable[tuple[str, str, str, bytes]], calling_ae: str = "SCU",
             called_ae: str = "NNCODEC", **associate_kwargs) -> list[int]:
    """C-STORE data sets given as encoded bytes, exactly as they are (damaged ones included):
    ``items`` holds (SOP Class UID, SOP Instance UID, transfer syntax UID, encoded data set); the
    request's Affected UIDs are the first two.  The statuses (None where the association died)."""
    items = list(items)
    ae = AE(ae_title=calling_ae)
    for sop_class, ts in dict.fromkeys((sc, ts) for sc, _, ts, _ in items):
        ae.add_requested_context(sop_class, [ts])
    folder = tempfile.mkdtemp(prefix="nncodec-raw-")
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True          # send the file's bytes without parsing them
    try:
        paths = []
        for i, (sop_class, sop_uid, ts, data) in enumerate(items):
            fm = FileMetaDataset()
            fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID, fm.TransferSyntaxUID = sop_class, sop_uid, ts
            path = os.path.join(folder, f"{i}.dcm")
            with open(path, "wb") as f:
                f.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(f, fm, enforce_standard=False)
                f.write(data)
            paths.append(path)
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, **associate_kwargs)
        if not assoc.is_established:
            raise ConnectionError("association not established")
        out: list[int | None] = []
        try:
            for path in paths:
                if not assoc.is_established:
                    out.append(None)
                    continue
                rsp = assoc.send_c_store(path)
                out.append(int(rsp.Status) if "Status" in rsp else None)
        finally:
            if assoc.is_established:
                assoc.release()
        return out
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
        shutil.rmtree(folder, ignore_errors=True)


def exchange(assoc, primitive, context_id: int):
    """Send one DIMSE request primitive exactly as built (however malformed) on an established requestor
    association and wait up to the association's DIMSE timeout for the next message: the response
    primitive (of whatever type came back), or None when nothing came."""
    assoc._reactor_checkpoint.clear()           # (as pynetdicom's send_* do: the reactor must not take the answer)
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(primitive, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        return rsp
    finally:
        assoc._reactor_checkpoint.set()


def store_bytes(port: int, items, calling_ae: str = "SCU", dimse_timeout: float = 30,
                on_status=None) -> list[int | None]:
    """C-STORE data sets given as (SOP Class UID, SOP Instance UID, transfer syntax UID, encoded bytes)
    on one association, each exactly as given: the request's Affected UIDs are the first two, the bytes
    go on the wire unparsed (``send_raw`` goes through a file, whose File Meta reader would take leading
    group 0002 elements of the data set for its own).  The statuses, None where no C-STORE response came
    (the rest are None once the association is gone).  ``on_status(i, status)`` is called as each comes."""
    from pynetdicom.dimse_primitives import C_STORE
    from io import BytesIO
    items = list(items)
    ae = AE(ae_title=calling_ae)
    ae.dimse_timeout = dimse_timeout
    for sop_class, ts in dict.fromkeys((sc, ts) for sc, _, ts, _ in items):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
    if not assoc.is_established:
        raise ConnectionError("association not established")
    out: list[int | None] = []
    try:
        for n, (sop_class, sop_uid, ts, data) in enumerate(items):
            status = None
            if assoc.is_established:
                cx = next((c.context_id for c in assoc.accepted_contexts
                           if c.abstract_syntax == sop_class and c.transfer_syntax[0] == ts), None)
                if cx is not None:
                    req = C_STORE()
                    req.MessageID, req.Priority = n % 65535 + 1, 2
                    req.AffectedSOPClassUID = sop_class
                    req._affected_sop_instance_uid = UID(sop_uid)       # (not validated: as given)
                    req.DataSet = BytesIO(data)
                    try:
                        rsp = exchange(assoc, req, cx)
                    except Exception:
                        rsp = None
                    if isinstance(rsp, C_STORE) and rsp.Status is not None:
                        status = int(rsp.Status)
            out.append(status)
            if on_status is not None:
                on_status(n, status)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` encoded as a C-STORE would carry it (little endian; explicit VR unless ``implicit``)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


# --- certificates for TLS tests -------------------------------------------------------------------------

def make_certificates(folder) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by it, and a
    client certificate from another CA, made with the ``openssl`` command (RuntimeError without it).
    Returns the PEM paths by name: ca, server.crt, server.key, client.crt, client.key, rogue.crt, rogue.key."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)   # noqa: E731

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test {ca}",
            "-keyout", p(f"{ca}.key"), "-out", p(f"{ca}.crt"))
    ext = p("san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", p(f"{name}.key"),
            "-out", p(f"{name}.csr"))
        run("x509", "-req", "-in", p(f"{name}.csr"), "-CA", p(f"{ca}.crt"), "-CAkey", p(f"{ca}.key"),
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", p(f"{name}.crt"))
    return {"ca": p("ca.crt"), **{f"{n}.{k}": p(f"{n}.{k}") for n in ("server", "client", "rogue")
                                  for k in ("crt", "key")}}


def client_tls(certs: dict[str, str], client: str | None = "client", minimum: str = "1.2"):
    """``associate(tls_args=...)`` for a test client trusting the test CA, presenting ``client``'s certificate."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if minimum == "1.3" else ssl.TLSVersion.TLSv1_2
    if client:
        ctx.load_cert_chain(certs[f"{client}.crt"], certs[f"{client}.key"])
    return ctx, "127.0.0.1"


# --- the node as a separate program (fault injection) ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_listener(proc: subprocess.Popen, port: int, timeout: float, output) -> None:
    """Wait until the child ``proc`` accepts TCP connections on ``port``; if it exits first, raise
    RuntimeError with ``output()`` (its log) in the message."""
    def listening():
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}:\n{output()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        return False
    wait_until(listening, timeout, "the node to listen")


class NodeProcess:
    """``python -m dicom_nncodec.cli serve --config FILE`` as a child process, for tests that kill it.

    ``crash_at`` arms a crash point of :mod:`scp.faults` (the process SIGKILLs itself there)."""

    def __init__(self, config_path, port: int, crash_at: str | None = None):
        self.config_path, self.port, self.crash_at = str(config_path), port, crash_at
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "NodeProcess":
        self._spawn("serve")
        try:
            wait_for_listener(self.proc, self.port, timeout, self.output)
        except TimeoutError:
            self.kill()
            raise RuntimeError("the node did not start listening") from None
        return self

    def _spawn(self, command: str, *args: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        env.pop("NNCODEC_CRASH_AT", None)
        if self.crash_at:
            env["NNCODEC_CRASH_AT"] = self.crash_at
        self.stderr_path = self.config_path + ".stderr"
        with open(self.stderr_path, "ab") as err:      # (a pipe nobody reads could fill up and block the node)
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_nncodec.cli", command, "--config",
                                          self.config_path, *args], env=env, stdout=subprocess.DEVNULL, stderr=err)

    def output(self) -> str:
        """The end of what the process wrote to standard error (its log, unless logging.file is set)."""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-2000:]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, as after a power cut of the process."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM: a graceful stop."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


class WorkerProcess(NodeProcess):
    """``python -m dicom_nncodec.cli worker --config FILE`` as a child process (``crash_at`` as for a node)."""

    def __init__(self, config_path, crash_at: str | None = None, threads: int | None = None):
        super().__init__(config_path, 0, crash_at)
        self.threads = threads

    def start(self, timeout: float = 120) -> "WorkerProcess":
        """Start it and wait until its compression threads run (its log says so)."""
        self._spawn("worker", *(["--threads", str(self.threads)] if self.threads else []))

        def started():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n{self.output()}")
            return "compression worker" in self.output()
        try:
            wait_until(started, timeout, "the worker to start")
        except TimeoutError:
            self.kill()
            raise
        return self


# --- storage commitment, as a sender asks for it -----------------------------------------------------------

class CommitmentSCU:
    """A sender asking for storage commitment: on one association (``ask``), with the report received on
    it or, via :meth:`listen`, on an association the node opens to this SCU's own port."""

    def __init__(self, ae_title: str = "SCU"):
        from pynetdicom.sop_class import StorageCommitmentPushModel
        self.ae_title = ae_title
        self.reports: list[tuple[int, Dataset, str]] = []     # (event type, event information, how it came)
        self._got = threading.Event()
        self.server = None
        self.ae = AE(ae_title=ae_title)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)

    def _on_report(self, event, how: str):
        self.reports.append((int(event.request.EventTypeID), event.event_information, how))
        self._got.set()
        return 0x0000, None

    def listen(self) -> int:
        """Accept reports on a port of its own (the node's peer entry for this AE); the port."""
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, self._on_report, ["a new association"])])
        return self.server.server_address[1]

    def ask(self, port: int, refs: list[tuple[str, str]], transaction_uid: str | None = None,
            wait: float = 30.0, keep_open: bool = True, **kwargs) -> tuple[int, str]:
        """N-ACTION for ``refs``; waits (association open when ``keep_open``) up to ``wait`` seconds for a
        report.  (N-ACTION status, Transaction UID)."""
        from pydicom.uid import generate_uid
        from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        transaction_uid = transaction_uid or generate_uid()
        info = Dataset()
        info.TransactionUID = transaction_uid
        info.ReferencedSOPSequence = []
        for sop_class, sop_uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
            info.ReferencedSOPSequence.append(item)
        self._got.clear()
        assoc = self.ae.associate("127.0.0.1", port, ae_title="NNCODEC", evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, self._on_report, ["the same association"])], **kwargs)
        if not assoc.is_established:
            raise ConnectionError("association not established")
        try:
            status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
            code = int(status.get("Status", 0xFFFF))
            if keep_open and code == 0:
                self._got.wait(wait)
        finally:
            if assoc.is_established:
                assoc.release()
        return code, transaction_uid

    def wait(self, timeout: float = 30.0) -> bool:
        return self._got.wait(timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
