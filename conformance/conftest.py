"""Shared machinery of the conformance and interoperability suite.

What is here, and why:

* ``sent`` builds the mixed study folder the peers send (pydicom's bundled test files, re-identified
  with fresh UIDs and transcoded with pydicom/imagecodecs): uncompressed (explicit, implicit, from big
  endian), JPEG-LS, JPEG 2000, RLE and JPEG lossless, single- and multi-frame, CT/MR/OT/US, grey and
  colour, in two studies of two patients.  Nothing from outside the installed packages is used.
* ``node_factory`` starts the node under test: by default as a real program
  (``python -m dicom_nncodec.cli serve --config node.yaml``, the way it is deployed), or in-process
  through :mod:`scp.testing` when ``NNCODEC_INTEROP_NODE=inprocess``; both on free loopback ports with
  temporary storage, and both can wait for the compression queue to drain.
* ``dcmtk``, ``orthanc_factory`` and ``dciodvfy`` find the real peers.  A missing one skips the tests
  that need it, saying what to install.  DCMTK's tools are looked up by asking each candidate for its
  version, because pynetdicom installs Python apps of the same names (echoscu, findscu, getscu,
  movescu, storescp) that shadow DCMTK's on PATH.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import yaml
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless,
                         generate_uid)

import dicom_nncodec  # noqa: F401  (registers the private transfer syntaxes with pydicom)
from scp.nodebench import find_dcmtk
from scp.testing import free_port, wait_for_listener, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "apt-get install dcmtk orthanc orthanc-gdcm dicom3tools"
NODE_AE = "NNCODEC"
DCMTK_TOOLS = ("echoscu", "dcmsend", "storescu", "findscu", "getscu", "movescu", "storescp")


@pytest.fixture(autouse=True)
def _one_thread():
    """The codec on one thread, as a busy shared CI machine wants it."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


# --- the peers on this machine ------------------------------------------------------------------------

# find_dcmtk: DCMTK's tool, not pynetdicom's app of the same name (shared with the node benchmark)


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    """Paths of DCMTK's network tools; skips when any is missing."""
    found = {name: find_dcmtk(name) for name in DCMTK_TOOLS}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        pytest.skip(f"DCMTK not found ({', '.join(missing)} missing); install the peers: {INSTALL}")
    return found


@pytest.fixture(scope="session")
def dciodvfy():
    """A function: the Error lines dicom3tools' dciodvfy reports for a file (skips when it is missing)."""
    path = shutil.which("dciodvfy")
    if path is None:
        pytest.skip(f"dicom3tools' dciodvfy not found; install the peers: {INSTALL}")

    def errors(file: str) -> list[str]:
        out = subprocess.run([path, file], capture_output=True, text=True, timeout=120)
        return [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    return errors


def run(args: list[str], timeout: float = 120, check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a peer's command line; on failure the assertion shows the command and its output."""
    proc = subprocess.run([a if isinstance(a, bytes) else str(a) for a in args], capture_output=True, timeout=timeout, cwd=cwd, env=child_env())
    proc.text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(repr, args))} exited {proc.returncode}:\n{proc.text[-4000:]}")
    return proc


# --- the data the peers send ----------------------------------------------------------------------------

@dataclass
class Sent:
    path: str
    source: str            # pydicom test file it was made from
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    transfer_syntax: str
    frames: int


@dataclass
class SentSet:
    folder: str
    instances: list[Sent]
    studies: dict[str, dict]          # study label -> the study/patient attributes written
    _pixels: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def by_uid(self, sop_uid: str) -> Sent:
        return next(s for s in self.instances if s.sop_uid == sop_uid)

    def in_study(self, label: str) -> list[Sent]:
        return [s for s in self.instances if s.study_uid == self.studies[label]["StudyInstanceUID"]]

    def pixels(self, sop_uid: str) -> np.ndarray:
        """The pixels as sent, decoded by pydicom (cached)."""
        with self._lock:
            if sop_uid not in self._pixels:
                self._pixels[sop_uid] = dcmread(self.by_uid(sop_uid).path).pixel_array
            return self._pixels[sop_uid]

    def assert_same_pixels(self, files) -> None:
        """Every file decodes (pydicom) to exactly the pixels that were sent under its SOP Instance UID."""
        for f in files:
            ds = dcmread(f)
            dicom_nncodec.fix_transfer_syntax(ds)
            want = self.pixels(str(ds.SOPInstanceUID))
            got = ds.pixel_array
            assert got.shape == want.shape and got.dtype == want.dtype, f"{f}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
            assert np.array_equal(got, want), f"{f}: pixels differ from what was sent ({self.by_uid(ds.SOPInstanceUID).source})"


STUDIES = {
    "alpha": dict(PatientID="IOP-001", PatientName="Interop^Alpha", PatientBirthDate="19700101", PatientSex="F",
                  StudyDate="20240110", StudyTime="101500", AccessionNumber="ACC-A1", StudyID="A1",
                  StudyDescription="interop alpha", ReferringPhysicianName="Ref^Alpha"),
    "beta": dict(PatientID="IOP-002", PatientName="Interop^Beta", PatientBirthDate="19800202", PatientSex="M",
                 StudyDate="20240320", StudyTime="153000", AccessionNumber="ACC-B1", StudyID="B1",
                 StudyDescription="interop beta", ReferringPhysicianName="Ref^Beta"),
}

# (pydicom test file, how it is sent, study, series label, series number, instance number)
RECIPE = [
    ("CT_small.dcm", "as is (Explicit VR LE)", "alpha", "ct", 1, 1),
    ("CT_small.dcm", "JPEG lossless SV1", "alpha", "ct", 1, 2),
    ("MR_small.dcm", "JPEG-LS lossless", "alpha", "mr", 2, 1),
    ("MR_small.dcm", "JPEG 2000 lossless", "alpha", "mr", 2, 2),
    ("MR_small_RLE.dcm", "as is (RLE)", "alpha", "mr", 2, 3),
    ("MR_small_implicit.dcm", "as is (Implicit VR LE)", "alpha", "mr", 2, 4),
    ("emri_small.dcm", "as is (Explicit VR LE, 10 frames)", "beta", "emr", 1, 1),
    ("SC_rgb_rle_2frame.dcm", "as is (RLE, RGB, 2 frames)", "beta", "sc", 2, 1),
    ("SC_rgb_jpeg_gdcm.dcm", "as is (JPEG lossless SV1, RGB)", "beta", "sc", 2, 2),
    ("ExplVR_BigEnd.dcm", "Explicit VR LE from big endian (US, RGB, planar)", "beta", "us", 3, 1),
]


def _jpeg_lossless_sv1(ds) -> None:
    """JPEG Lossless SV1 (process 14, predictor 1) with libjpeg-turbo through imagecodecs."""
    import imagecodecs
    arr = ds.pixel_array
    bits = int(ds.BitsAllocated)
    data = arr.view(np.uint16 if bits == 16 else np.uint8)
    stream = imagecodecs.jpeg8_encode(data, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def build_sent(folder: str) -> SentSet:
    os.makedirs(folder, exist_ok=True)
    studies = {label: dict(attrs, StudyInstanceUID=generate_uid()) for label, attrs in STUDIES.items()}
    series: dict[str, str] = {}
    out = []
    for i, (source, how, study, ser, ser_no, inst_no) in enumerate(RECIPE):
        ds = dcmread(get_testdata_file(source))
        for k, v in studies[study].items():
            setattr(ds, k, v)
        ds.SeriesInstanceUID = series.setdefault(ser, generate_uid())
        ds.SeriesNumber, ds.InstanceNumber = ser_no, inst_no
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if how == "JPEG-LS lossless":
            ds.compress(JPEGLSLossless, generate_instance_uid=False)
        elif how == "JPEG 2000 lossless":
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        elif how == "JPEG lossless SV1":
            _jpeg_lossless_sv1(ds)
        path = os.path.join(folder, f"{i:02d}_{os.path.splitext(source)[0]}.dcm")
        if how.startswith("Explicit VR LE from big endian"):
            assert int(ds.BitsAllocated) == 8      # 8-bit samples: no byte swapping needed
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        ds = dcmread(path, stop_before_pixels=True)
        out.append(Sent(path, source, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                        str(ds.SeriesInstanceUID), str(ds.PatientID), str(ds.Modality),
                        str(ds.file_meta.TransferSyntaxUID), int(ds.get("NumberOfFrames", 1) or 1)))
    return SentSet(folder, out, studies)


@pytest.fixture(scope="session")
def sent(tmp_path_factory) -> SentSet:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_sent(str(tmp_path_factory.mktemp("sent")))


# --- the node under test ----------------------------------------------------------------------------------

def node_config(storage: str, port: int, peers: list[dict], log_file: str, **extra) -> dict:
    cfg = {
        "ae_title": NODE_AE, "bind": "127.0.0.1", "port": port,
        "storage": {"path": storage, "min_free_mb": 0},
        "compression": {"device": "cpu", "poll_seconds": 0.2},
        "peers": peers,
        "limits": {"shutdown_grace_seconds": 10, "acse_timeout": 15, "dimse_timeout": 60, "network_timeout": 60},
        "logging": {"file": log_file, "level": "INFO"},
    }
    for k, v in extra.items():
        cfg[k] = dict(cfg.get(k, {}), **v) if isinstance(v, dict) else v
    return cfg


class NodeUnderTest:
    """The node, started from a configuration mapping; the same interface in both modes."""

    def __init__(self, workdir: str, cfg: dict):
        self.workdir, self.cfg = workdir, cfg
        self.port = cfg["port"]
        self.storage = cfg["storage"]["path"]
        self.log_file = cfg["logging"]["file"]
        self.config_file = os.path.join(workdir, "node.yaml")
        with open(self.config_file, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f)
        from scp import config as C
        self.index_url = C.resolved_index_url(C.load(self.config_file))
        self._index = None

    # -- the index, read directly (works while the node runs, in either mode) --
    @property
    def index(self):
        if self._index is None:
            from scp.index import Index
            self._index = Index(self.index_url)
        return self._index

    def instances(self) -> dict:
        """sop_uid -> the index row (detached)."""
        from scp.index import Instance
        with self.index.session() as s:
            rows = s.query(Instance).all()
            s.expunge_all()
        return {r.sop_uid: r for r in rows}

    def stored_path(self, sop_uid: str) -> str:
        return os.path.join(self.storage, self.instances()[sop_uid].path)

    def wait_idle(self, timeout: float = 180) -> None:
        """Wait until the compression queue has drained (every queued instance compressed or kept)."""
        wait_until(lambda: self.index.queue_length() == 0, timeout, "the compression queue to drain", 0.2)

    def log(self) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def close_index(self) -> None:
        if self._index is not None:
            self._index.dispose()
            self._index = None


class ServedNode(NodeUnderTest):
    """``python -m dicom_nncodec.cli serve --config node.yaml`` in a child process."""

    def start(self) -> "ServedNode":
        self.out = open(os.path.join(self.workdir, "serve.out"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_nncodec.cli", "serve", "--config", self.config_file],
                                     cwd=self.workdir, env=child_env(), stdout=self.out, stderr=subprocess.STDOUT)
        wait_for_listener(self.proc, self.port, 120, self._output)
        return self

    def _output(self) -> str:
        with open(os.path.join(self.workdir, "serve.out"), encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:] + "\n" + self.log()[-4000:]

    def stop(self) -> None:
        self.close_index()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the node did not stop within 60 s of SIGTERM")
            assert rc == 0, f"the node exited with {rc} on SIGTERM:\n{self._output()}"
        self.out.close()


class InProcessNode(NodeUnderTest):
    """:class:`scp.node.Node` in this process (``NNCODEC_INTEROP_NODE=inprocess``)."""

    def start(self) -> "InProcessNode":
        from scp import config as C
        from scp.node import Node
        self.node = Node(C.load(self.config_file)).start()
        return self

    def wait_idle(self, timeout: float = 180) -> None:
        assert self.node.compressor.wait_idle(timeout), "the compression queue did not drain"

    def stop(self) -> None:
        self.close_index()
        self.node.stop()


@pytest.fixture(scope="module")
def node_factory(tmp_path_factory):
    """A function starting a node (``peers``: list of peer mappings; ``extra``: more configuration);
    every node started is stopped when the module is done."""
    started: list[NodeUnderTest] = []
    mode = os.environ.get("NNCODEC_INTEROP_NODE", "subprocess")
    if mode not in ("subprocess", "inprocess"):
        raise ValueError("NNCODEC_INTEROP_NODE must be subprocess or inprocess")

    def start(peers: list[dict], port: int | None = None, **extra) -> NodeUnderTest:
        work = str(tmp_path_factory.mktemp("node"))
        cfg = node_config(os.path.join(work, "storage"), port or free_port(), peers, os.path.join(work, "node.log"),
                          **extra)
        node = (ServedNode if mode == "subprocess" else InProcessNode)(work, cfg)
        node.start()
        started.append(node)
        return node

    yield start
    errors = []
    for node in reversed(started):
        try:
            node.stop()
        except Exception as exc:      # stop the others anyway
            errors.append(exc)
    if errors:
        raise errors[0]


# --- Orthanc ------------------------------------------------------------------------------------------------

class Orthanc:
    """An Orthanc 1.10 with its own storage, HTTP and DICOM ports, and a REST client (urllib)."""

    def __init__(self, workdir: str, aet: str, modalities: dict[str, dict]):
        self.workdir, self.aet = workdir, aet
        self.dicom_port, self.http_port = free_port(), free_port()
        plugins = sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancGdcm*.so*")
                         + glob.glob("/usr/lib/orthanc/libOrthancGdcm*.so*"))
        self.config = {
            "Name": aet, "StorageDirectory": os.path.join(workdir, "storage"),
            "IndexDirectory": os.path.join(workdir, "index"), "Plugins": plugins[:1],
            "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": self.dicom_port, "DicomCheckCalledAet": True,
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "WebDavEnabled": False, "SaveJobs": False, "SyncStorageArea": False,
            "StableAge": 1, "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 0,
            "DicomModalities": {name: {"AET": m["ae_title"], "Host": m["host"], "Port": m["port"]}
                                for name, m in modalities.items()},
        }
        self.config_file = os.path.join(workdir, "orthanc.json")
        self.log_file = os.path.join(workdir, "orthanc.log")

    def start(self, executable: str) -> "Orthanc":
        with open(self.config_file, "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=1)
        self.log = open(self.log_file, "wb")
        self.proc = subprocess.Popen([executable, self.config_file], cwd=self.workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                return self.get("/system")
            return None
        wait_until(up, 60, "Orthanc to answer on HTTP")
        return self

    def log_text(self) -> str:
        with open(self.log_file, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 180):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                content = r.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc {method} {path}: HTTP {exc.code} {exc.read()[:2000]!r}\n"
                                 f"{self.log_text()}") from None
        if r.headers.get_content_type() == "application/json":
            return json.loads(content)
        return content

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None, raw=None):
        return self.request("POST", path, body, raw)

    def delete(self, path):
        return self.request("DELETE", path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)       # Orthanc takes a second or two; wait until the PID is gone
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory):
    executable = shutil.which("Orthanc")
    if executable is None:
        pytest.skip(f"Orthanc not found; install the peers: {INSTALL}")
    started: list[Orthanc] = []

    def start(aet: str, modalities: dict[str, dict]) -> Orthanc:
        o = Orthanc(str(tmp_path_factory.mktemp("orthanc")), aet, modalities)
        o.start(executable)
        started.append(o)
        return o

    yield start
    for o in reversed(started):
        o.stop()


# --- small helpers used by several modules ----------------------------------------------------------------

def transfer_syntax_of(path: str) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def dicom_files(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))


@pytest.fixture(scope="session")
def helpers():
    """Plain functions for the test modules (conftest is not importable as a module)."""
    class H:
        pass
    h = H()
    h.free_port, h.run, h.wait_until = free_port, run, wait_until
    h.transfer_syntax_of, h.dicom_files = transfer_syntax_of, dicom_files
    h.NODE_AE, h.INSTALL = NODE_AE, INSTALL
    return h
