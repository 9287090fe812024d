"""Node benchmark: ingest, backlog compression and whole-study retrieval, beside Orthanc 1.10.

    python -m scp.nodebench [--study DIR] [--slices N] [--workers N] [--action A] [--json FILE]

Why a program and not a timed test: the figures depend on the machine and on
what else runs on it; what the issue asks for is the comparison with Orthanc
(Debian's 1.10) doing the same work on the same machine in the same run.

What it does, for this node and then for Orthanc, each started fresh on free
loopback ports with its own temporary storage:

* ingest: DCMTK ``dcmsend`` of the study folder (one association), timed from
  the command's start to its exit: instances/s and MB/s (10^6 bytes of files
  sent per second);
* for the node: the time until its compression queue is empty (read from its
  index, as ``dicom-nncodec status`` does), measured both after dcmsend ended
  and from dcmsend's start (compression starts with the first instance), and
  the bytes on disk against those received;
* retrieve: DCMTK ``getscu`` of the whole study (study-level C-GET with
  getscu's default proposals, i.e. uncompressed), timed the same way, into a
  temporary folder; every retrieved file must carry exactly the pixels of the
  original with its SOP Instance UID, and every original must come back.

Then two diagnostics for the node (not part of the comparison): the decode
time alone of its stored files in this process, and a getscu of the same study
from a second node that does not compress (``compression.workers: 0``, so it
sends the stored Explicit VR Little Endian bytes): together they show how much
of the retrieval time is the codec and how much the DICOM path.

The study is DIR (``--study``; every file in it is sent) or, by default, a
generated CT study: ``--slices`` 512x512 16-bit signed slices (HU; an abdomen
with fat, muscle, organs, contrast vessels, spine, bowel gas and a table,
blurred edges and correlated noise, padding outside the field of view), one
study, one series, CT Image Storage, Explicit VR Little Endian.

The node runs as ``dicom-nncodec serve`` on its defaults except the storage
path, the port, ``compression.workers`` and a peer entry for the getscu AE
title; its environment is this process's (so OMP_NUM_THREADS, when set, is
inherited; unset, the codec uses every core).  Orthanc gets a generated JSON
configuration: its defaults (files stored as received, SyncStorageArea on, no
plug-ins) plus storage folders, ports and a modality entry for the getscu AE
title with AllowGet.  Printed: a side-by-side table, the verdicts on the
issue's targets (ingest at least as fast as Orthanc; retrieval at most 2x
Orthanc's time), the load average and the exact commands; ``--json`` writes
the same.  Exit status 0 when every instance was stored, retrieved and
verified (whatever the verdicts), 1 otherwise.  Without Orthanc the node is
measured alone and the verdicts are "n/a".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

from .testing import free_port, wait_for_listener, wait_until

NODE_AE = "NNCODEC"
ORTHANC_AE = "ORTHANC"
SCU_AE = "BENCHSCU"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


# --- the tools ----------------------------------------------------------------------------------------------

def _is_dcmtk(path: str) -> bool:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (out.stdout + out.stderr).lower()


def find_dcmtk(name: str) -> str | None:
    """DCMTK's ``name``: pynetdicom installs Python apps of the same names (getscu, storescp, ...)
    that come earlier on PATH, so each candidate is asked for its version."""
    seen = set()
    for folder in ["/usr/bin"] + os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin"]:
        path = os.path.join(folder, name)
        if path in seen or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        seen.add(path)
        if _is_dcmtk(path):
            return path
    return None


def find_orthanc() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if os.access(p, os.X_OK)), None)


def orthanc_version(executable: str) -> str:
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30)
        first = (out.stdout + out.stderr).splitlines()[0].strip()      # "/usr/sbin/Orthanc 1.10.1"
        return "Orthanc " + first.split()[-1] if first.split() else "Orthanc (version unknown)"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "Orthanc (version unknown)"


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return [float("nan")] * 3


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6], (v[7] if len(v) > 7 else 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


class CPUMeter:
    """Where the CPU went during one timed phase: the server, the DCMTK client (this process's
    children that were waited for), this process, and everything else on the machine, which is
    what makes a figure from a shared machine slower than it would be on an idle one."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.t, self.server = time.perf_counter(), cpu_seconds(server_pid) if server_pid else 0.0
        self.busy, self.steal = _machine_ticks()
        o = os.times()
        self.children, self.me = o.children_user + o.children_system, o.user + o.system

    def read(self) -> dict:
        tick = os.sysconf("SC_CLK_TCK")
        busy, steal = _machine_ticks()
        o = os.times()
        wall = time.perf_counter() - self.t
        server = (cpu_seconds(self.pid) if self.pid else 0.0) - self.server
        client = o.children_user + o.children_system - self.children
        me = o.user + o.system - self.me
        machine = (busy - self.busy) / tick
        return {"wall_s": wall, "server_cpu_s": server, "client_cpu_s": client, "bench_cpu_s": me,
                "machine_busy_cpu_s": machine, "others_cpu_s": max(0.0, machine - server - client - me),
                "steal_s": (steal - self.steal) / tick, "cpus": os.cpu_count()}


def timed(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    """Run a peer's command line; (wall seconds from start to exit, the completed process)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    return time.perf_counter() - t, proc


def _tail(proc: subprocess.CompletedProcess, n: int = 2000) -> str:
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")[-n:]


def du(folder: str) -> int:
    """Bytes in the files under ``folder``."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


# --- the study -------------------------------------------------------------------------------------------------

def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (periodic, through the FFT; sigma in pixels)."""
    if sigma <= 0:
        return img
    h, w = img.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    return np.fft.irfft2(np.fft.rfft2(img) * transfer, s=img.shape)


def ct_slice(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """One axial abdomen slice in HU (int16), at relative height z in [0, 1] (0: lung bases)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1        # -1..1 across the 400 mm field of view
    y, x = np.meshgrid(c, c, indexing="ij")

    def ellipse(cx, cy, ax, ay, angle=0.0):
        ca, sa = np.cos(angle), np.sin(angle)
        u, v = (x - cx) * ca + (y - cy) * sa, -(x - cx) * sa + (y - cy) * ca
        return (u / ax) ** 2 + (v / ay) ** 2 <= 1

    img = np.full((size, size), -1000.0)
    breathe = 1 + 0.03 * np.sin(z * 7)
    img[ellipse(0, 0.05, 0.80 * breathe, 0.60, 0)] = -100            # subcutaneous fat
    img[ellipse(0, 0.05, 0.72 * breathe, 0.52, 0)] = 55              # muscle wall
    img[ellipse(0, 0.06, 0.66 * breathe, 0.46, 0)] = 20              # abdominal contents (fat/water mix)
    if z < 0.35:                                                     # lung bases
        s = (0.35 - z) / 0.35
        for side in (-1, 1):
            img[ellipse(side * 0.33, -0.05, 0.22 * s + 0.02, 0.30 * s + 0.02)] = -860
    liver = ellipse(-0.30, -0.02, 0.32 * (1.1 - z), 0.30 * (1.1 - z), 0.3) & (z < 0.75)
    img[liver] = 62
    spleen = ellipse(0.40, 0.02, 0.12, 0.16, -0.4) & (z < 0.5)
    img[spleen] = 48
    for side in (-1, 1):                                             # kidneys: cortex and medulla
        if 0.3 < z < 0.9:
            k = np.sin((z - 0.3) / 0.6 * np.pi)
            img[ellipse(side * 0.30, 0.24, 0.09 * k + 0.01, 0.13 * k + 0.01, side * 0.5)] = 150
            img[ellipse(side * 0.30, 0.24, 0.05 * k + 0.005, 0.08 * k + 0.005, side * 0.5)] = 35
    img[ellipse(0.04, 0.16, 0.045, 0.045)] = 210                     # aorta (contrast)
    img[ellipse(-0.08, 0.14, 0.05, 0.04)] = 160                      # inferior vena cava
    for i in range(6):                                               # liver vessels
        a = i * 1.1 + z * 3
        img[ellipse(-0.30 + 0.15 * np.cos(a), -0.02 + 0.12 * np.sin(a), 0.018, 0.018) & liver] = 140
    img[ellipse(0, 0.36, 0.10, 0.08)] = 700                          # vertebral body: cortex ...
    img[ellipse(0, 0.36, 0.085, 0.065)] = 240                        # ... and cancellous bone
    img[ellipse(0, 0.47, 0.03, 0.06)] = 650                          # spinous process
    img[ellipse(0, 0.44, 0.035, 0.03)] = 15                          # spinal canal
    for i in range(4):                                               # bowel gas
        if z > 0.4:
            img[ellipse(0.1 + 0.12 * np.cos(i * 2 + z * 5), -0.15 + 0.1 * np.sin(i * 3 + z * 4), 0.04, 0.03)] = -900
    img[(y > 0.72) & (y < 0.76) & (np.abs(x) < 0.85)] = 300          # table
    img = _blur(img, 0.8 * size / 512)                               # partial volume
    texture = _blur(rng.normal(0, 1, img.shape), 6 * size / 512)
    img += texture / (texture.std() or 1) * 6 * (img > -500)         # low-frequency tissue texture
    noise = _blur(rng.normal(0, 1, img.shape), 0.9 * size / 512)
    img += noise / (noise.std() or 1) * 14                           # correlated quantum noise
    img[x ** 2 + y ** 2 > 1] = -2000                                 # outside the reconstruction circle
    return np.clip(np.rint(img), -2000, 3071).astype(np.int16)


def make_ct_study(folder: str, slices: int, size: int = 512, seed: int = 0) -> list[str]:
    """A synthetic CT study of ``slices`` files in ``folder`` (one study, one series, Explicit VR LE)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = _dt.datetime.now()
    date, tm = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    spacing, thickness = 400.0 / size, 2.5
    paths = []
    for i in range(slices):
        z = i / max(1, slices - 1)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = tm
        ds.AccessionNumber, ds.Modality = "NODEBENCH", "CT"
        ds.Manufacturer = "dicom-nncodec scp.nodebench (synthetic)"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = "synthetic abdomen CT (scp.nodebench)", "axial 2.5 mm"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Synthetic", "NODEBENCH", "", "O"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP, ds.PatientPosition = "ABDOMEN", thickness, 120, "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 2, 1, i + 1
        ds.ImagePositionPatient = [-200 + spacing / 2, -200 + spacing / 2, -i * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.SliceLocation = -i * thickness
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.add_new(0x00280120, "SS", -2000)                           # Pixel Padding Value
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = ct_slice(size, z, rng).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        path = os.path.join(folder, f"CT{i + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Study:
    """The files sent, their pixels (the reference for every retrieved file) and their studies."""

    def __init__(self, folder: str, source: str):
        from pydicom import dcmread
        self.folder, self.source = folder, source
        self.pixels: dict[str, np.ndarray] = {}
        self.study_uids: list[str] = []
        self.file_bytes = self.pixel_bytes = 0
        shapes = set()
        for path in sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p)):
            try:
                ds = dcmread(path)
            except Exception:
                continue             # not DICOM: dcmsend skips it too
            if "PixelData" not in ds:
                continue
            uid = str(ds.SOPInstanceUID)
            if uid in self.pixels:
                raise ValueError(f"{path}: SOP Instance UID {uid} appears twice in the study folder")
            arr = ds.pixel_array                     # (also reads every file once: the page cache is warm)
            self.pixels[uid] = arr
            self.file_bytes += os.path.getsize(path)
            self.pixel_bytes += arr.nbytes
            shapes.add(f"{int(ds.Rows)}x{int(ds.Columns)} {int(ds.BitsAllocated)}-bit "
                       f"{'signed' if int(ds.PixelRepresentation) else 'unsigned'}")
            if str(ds.StudyInstanceUID) not in self.study_uids:
                self.study_uids.append(str(ds.StudyInstanceUID))
        if not self.pixels:
            raise ValueError(f"no DICOM images in {folder}")
        self.shapes = sorted(shapes)

    @property
    def instances(self) -> int:
        return len(self.pixels)

    def describe(self) -> dict:
        return {"source": self.source, "folder": self.folder, "instances": self.instances,
                "studies": len(self.study_uids), "images": self.shapes, "file_bytes": self.file_bytes,
                "pixel_bytes": self.pixel_bytes}

    def verify(self, folder: str) -> dict:
        """Compare every file in ``folder`` with the original of its SOP Instance UID."""
        import dicom_nncodec  # noqa: F401  (registers the private syntaxes, should one arrive)
        from pydicom import dcmread
        seen, mismatched, unknown, syntaxes = set(), [], [], {}
        files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
        for path in files:
            ds = dcmread(path)
            uid = str(ds.SOPInstanceUID)
            ts = ds.file_meta.TransferSyntaxUID
            syntaxes[ts.name] = syntaxes.get(ts.name, 0) + 1
            want = self.pixels.get(uid)
            if want is None:
                unknown.append(uid)
                continue
            got = ds.pixel_array
            if uid in seen or got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
                mismatched.append(uid)
            seen.add(uid)
        missing = sorted(set(self.pixels) - seen)
        return {"files": len(files), "equal": len(seen) - len(set(mismatched)), "mismatched": len(mismatched),
                "missing": len(missing), "unexpected": len(unknown), "transfer_syntaxes": syntaxes,
                "ok": not mismatched and not missing and not unknown and len(files) == self.instances}


# --- the systems ---------------------------------------------------------------------------------------------

class System:
    """A DICOM archive started for the benchmark: its AE title, port and the commands run against it."""
    label = ""
    ae_title = ""

    def __init__(self, workdir: str, dcmsend: str, getscu: str):
        self.workdir, self.dcmsend, self.getscu = workdir, dcmsend, getscu
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.commands: list[str] = []

    def send_command(self, folder: str) -> list[str]:
        return [self.dcmsend, "-aet", SCU_AE, "-aec", self.ae_title, "--scan-directories", "--recurse",
                "127.0.0.1", str(self.port), folder]

    def get_command(self, study_uid: str, out: str) -> list[str]:
        return [self.getscu, "-aet", SCU_AE, "-aec", self.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study_uid}", "-od", out, "127.0.0.1", str(self.port)]

    def record(self, cmd: list[str]) -> None:
        self.commands.append(shlex.join(cmd))

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc is not None else float("nan")

    def meter(self) -> CPUMeter:
        return CPUMeter(self.proc.pid if self.proc is not None else None)

    def stored_count(self) -> int:
        raise NotImplementedError

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)        # wait until the PID is gone before anything reuses the ports
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


class NodeSystem(System):
    label = "this node"
    ae_title = NODE_AE

    def __init__(self, workdir: str, dcmsend: str, getscu: str, workers: int, action: str = "lossless",
                 index_url: str = ""):
        super().__init__(workdir, dcmsend, getscu)
        self.storage = os.path.join(workdir, "storage")
        self.config_file = os.path.join(workdir, "node.yaml")
        self.log_file = os.path.join(workdir, "node.log")
        self.config = {"port": self.port, "storage": {"path": self.storage},
                       "compression": {"workers": workers, "rules": [{"action": action}]},
                       "peers": [{"name": "nodebench getscu", "ae_title": SCU_AE, "host": "127.0.0.1",
                                  "port": 11113, "allow": ["echo", "store", "find", "get", "move"]}]}
        if index_url:
            self.config["index"] = {"url": index_url}
        self._index = None

    def start(self) -> "NodeSystem":
        import yaml
        with open(self.config_file, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.config, f, sort_keys=False)
        cmd = [sys.executable, "-m", "dicom_nncodec.cli", "serve", "--config", self.config_file]
        self.record(cmd)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_file, "ab") as log:       # the node logs to stderr by default
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=log)

        wait_for_listener(self.proc, self.port, 180, self.log_tail)
        return self

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_file, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
        return ""

    @property
    def index(self):
        if self._index is None:
            from . import config as C
            from .index import Index
            self._index = Index(C.resolved_index_url(C.load(self.config_file)))
        return self._index

    def stored_count(self) -> int:
        return self.index.stats()["instances"]

    def queue_length(self) -> int:
        return self.index.queue_length()

    def compression_times(self) -> list[float]:
        """Seconds per compressed instance, from the node's log lines."""
        pattern = re.compile(r"compressed \S+ \([^)]*\) to \d+ bytes in ([\d.]+) s")
        with contextlib.suppress(OSError), open(self.log_file, encoding="utf-8", errors="replace") as f:
            return [float(m.group(1)) for m in pattern.finditer(f.read())]
        return []

    def stop(self) -> int | None:
        if self._index is not None:
            self._index.dispose()
            self._index = None
        return super().stop()


class OrthancSystem(System):
    label = "Orthanc"
    ae_title = ORTHANC_AE

    def __init__(self, workdir: str, dcmsend: str, getscu: str, executable: str):
        super().__init__(workdir, dcmsend, getscu)
        self.executable = executable
        self.http_port = free_port()
        self.storage = os.path.join(workdir, "storage")
        self.config_file = os.path.join(workdir, "orthanc.json")
        self.log_file = os.path.join(workdir, "orthanc.log")
        self.config = {
            "Name": "nodebench", "StorageDirectory": self.storage, "IndexDirectory": os.path.join(workdir, "index"),
            "DicomAet": ORTHANC_AE, "DicomPort": self.port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"benchscu": {"AET": SCU_AE, "Host": "127.0.0.1", "Port": 11113,
                                             "AllowEcho": True, "AllowStore": True, "AllowFind": True,
                                             "AllowGet": True, "AllowMove": True}},
        }

    def start(self) -> "OrthancSystem":
        with open(self.config_file, "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=1)
        cmd = [self.executable, self.config_file]
        self.record(cmd)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.rest("/system")
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            return False
        wait_until(up, 60, "Orthanc to answer")
        return self

    def rest(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_file, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
        return ""

    def stored_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])


# --- the measurements --------------------------------------------------------------------------------------

def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def ingest(system: System, study: Study, timeout: float) -> dict:
    cmd = system.send_command(study.folder)
    system.record(cmd)
    meter = system.meter()
    seconds, proc = timed(cmd, timeout)
    cpu = meter.read()
    stored = system.stored_count()
    out = {"seconds": seconds, "instances_per_s": _rate(study.instances, seconds),
           "mb_per_s": _rate(study.file_bytes / MB, seconds), "stored": stored, "exit_status": proc.returncode,
           "server_cpu_s": cpu["server_cpu_s"], "cpu": cpu, "ok": proc.returncode == 0 and stored == study.instances}
    if not out["ok"]:
        out["error"] = f"dcmsend exited {proc.returncode}, {stored} of {study.instances} stored:\n{_tail(proc)}"
    return out


def drain(node: NodeSystem, study: Study, ingest_started: float, ingest_ended: float,
          timeout: float) -> tuple[dict, dict]:
    """Wait for the compression queue to empty; the backlog figures."""
    meter = node.meter()
    wait_until(lambda: node.queue_length() == 0, timeout, "the compression queue to empty", 0.05)
    done = time.perf_counter()
    cpu = meter.read()
    st = node.index.stats()
    states = st["by_state"]
    per = node.compression_times()
    out = {"after_ingest_s": done - ingest_ended, "from_ingest_start_s": done - ingest_started,
           "instances_per_s": _rate(study.instances, done - ingest_started),
           "compressed": states.get("compressed", 0), "kept": states.get("kept", 0),
           "failed": states.get("failed", 0), "per_instance_s_mean": float(np.mean(per)) if per else None,
           "per_instance_s_sum": float(np.sum(per)) if per else None, "cpu_after_ingest": cpu}
    out["ok"] = out["compressed"] == study.instances
    rx, disk = st["received_bytes"], st["stored_bytes"]
    return out, {"received": int(rx), "on_disk_files": int(disk), "ratio": rx / disk if disk else None}


def retrieve(system: System, study: Study, out_root: str, timeout: float) -> dict:
    out = os.path.join(out_root, f"retrieved-{system.ae_title.lower()}")
    os.makedirs(out, exist_ok=True)
    seconds, statuses, meter = 0.0, [], system.meter()
    for uid in study.study_uids:
        cmd = system.get_command(uid, out)
        system.record(cmd)
        s, proc = timed(cmd, timeout)
        seconds += s
        statuses.append(proc.returncode)
        if proc.returncode != 0:
            tail = _tail(proc)
    cpu = meter.read()
    check = study.verify(out)
    res = {"seconds": seconds, "instances_per_s": _rate(study.instances, seconds),
           "mb_per_s": _rate(study.pixel_bytes / MB, seconds), "exit_status": max(statuses),
           "server_cpu_s": cpu["server_cpu_s"], "cpu": cpu, "verified": check}
    res["ok"] = check["ok"] and max(statuses) == 0
    if max(statuses) != 0:
        res["error"] = f"getscu exited {max(statuses)}:\n{tail}"
    shutil.rmtree(out, ignore_errors=True)
    return res


def decode_only(storage: str) -> dict:
    """Decode time alone of the node's stored files, in this process (the codec's share of a retrieval)."""
    import torch
    from pydicom import dcmread

    import dicom_nncodec
    files = sorted(glob.glob(os.path.join(storage, "objects", "**", "*.dcm"), recursive=True))
    total, n, nbytes = 0.0, 0, 0
    for path in files:
        ds = dcmread(path)
        dicom_nncodec.fix_transfer_syntax(ds)
        if dicom_nncodec.syntax.registered(ds.file_meta.TransferSyntaxUID) is None:
            continue
        t = time.perf_counter()
        ds = dicom_nncodec.decompress(ds)
        total += time.perf_counter() - t
        n += 1
        nbytes += len(ds.PixelData)
    return {"instances": n, "seconds": total, "ms_per_instance": total / n * 1000 if n else None,
            "mb_per_s": _rate(nbytes / MB, total), "torch_threads": torch.get_num_threads()}


def run_node(study: Study, work: str, dcmsend: str, getscu: str, workers: int, timeout: float,
             action: str = "lossless", index_url: str = "") -> dict:
    node = NodeSystem(os.path.join(work, "node"), dcmsend, getscu, workers, action, index_url)
    res: dict = {"label": node.label, "loadavg_at_start": loadavg(), "config": node.config}
    try:
        node.start()
        started = time.perf_counter()
        res["ingest"] = ingest(node, study, timeout)
        ended = time.perf_counter()
        if res["ingest"]["ok"] and workers > 0:
            res["compression"], res["bytes"] = drain(node, study, started, ended, timeout)
        if res["ingest"]["ok"]:
            res.setdefault("bytes", {}).update(storage_folder=du(node.storage))
            res["retrieve"] = retrieve(node, study, work, timeout)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["exit_status"] = node.stop()
        res["commands"] = node.commands
        res["log_tail"] = node.log_tail(1500) if "error" in res else ""
    return res


def run_orthanc(study: Study, work: str, dcmsend: str, getscu: str, executable: str, timeout: float) -> dict:
    o = OrthancSystem(os.path.join(work, "orthanc"), dcmsend, getscu, executable)
    res: dict = {"label": orthanc_version(executable), "loadavg_at_start": loadavg(), "config": o.config}
    try:
        o.start()
        res["ingest"] = ingest(o, study, timeout)
        if res["ingest"]["ok"]:
            res["bytes"] = {"received": study.file_bytes, "on_disk_files": du(o.storage),
                            "ratio": study.file_bytes / max(1, du(o.storage))}
            res["retrieve"] = retrieve(o, study, work, timeout)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["exit_status"] = o.stop()
        res["commands"] = o.commands
        res["log_tail"] = o.log_tail(1500) if "error" in res else ""
    return res


def run_diagnostics(study: Study, work: str, dcmsend: str, getscu: str, timeout: float) -> dict:
    """The codec's share of the node's retrieval time: decode alone, and a node that does not compress."""
    out: dict = {}
    storage = os.path.join(work, "node", "storage")
    try:
        out["decode_only"] = decode_only(storage)
    except Exception as exc:
        out["decode_only"] = {"error": f"{type(exc).__name__}: {exc}"}
    plain = run_node(study, os.path.join(work, "plain"), dcmsend, getscu, 0, timeout)
    out["uncompressed_node"] = {k: plain.get(k) for k in ("ingest", "retrieve", "error", "commands", "exit_status")}
    return out


def _ok(res: dict | None, node: bool) -> bool:
    if res is None:
        return True
    parts = [res.get("ingest"), res.get("retrieve")] + ([res.get("compression")] if node else [])
    return "error" not in res and all(p is not None and p.get("ok") for p in parts)


def verdicts(node: dict, orthanc: dict | None, device: str = "cpu") -> dict:
    def figure(res, *keys):
        cur = res
        for k in keys:
            cur = (cur or {}).get(k)
        return cur

    def measured(res, phase, key):          # a figure counts only when its phase ran clean
        return figure(res, phase, key) if figure(res, phase, "ok") else None

    out = {}
    ni, oi = measured(node, "ingest", "instances_per_s"), measured(orthanc, "ingest", "instances_per_s")
    nr, orr = measured(node, "retrieve", "seconds"), measured(orthanc, "retrieve", "seconds")
    ingest_rule = "ingest (dcmsend) instances/s of the node >= Orthanc's"
    retrieve_rule = "study retrieval (getscu) time of the node <= 2 x Orthanc's"
    if device != "cpu":
        retrieve_rule += f" (the target is for the CPU; the codec ran on {device})"
    if ni and oi:
        out["ingest"] = {"rule": ingest_rule, "node_over_orthanc": ni / oi, "verdict": "PASS" if ni >= oi else "FAIL"}
    else:
        out["ingest"] = {"rule": ingest_rule, "node_over_orthanc": None, "verdict": "n/a"}
    if nr and orr:
        out["retrieve"] = {"rule": retrieve_rule, "node_over_orthanc": nr / orr,
                           "verdict": "PASS" if nr <= 2 * orr else "FAIL"}
    else:
        out["retrieve"] = {"rule": retrieve_rule, "node_over_orthanc": None, "verdict": "n/a"}
    return out


# --- the report ---------------------------------------------------------------------------------------------

def _f(v, fmt: str, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, fmt) + unit


def _cpu(c: dict | None) -> str:
    """Server and other processes' CPU seconds in a phase ("others": neither the server, the DCMTK
    client nor this program: what else ran on the machine meanwhile)."""
    if not c:
        return "-"
    return f"{c['server_cpu_s']:.2f} / {c['others_cpu_s']:.2f} s"


def table(report: dict) -> str:
    node, orth = report["node"], report.get("orthanc")
    st, m = report["study"], report["machine"]
    g = lambda res, *keys: _get(res, keys)   # noqa: E731
    col2 = orth["label"] if orth else "Orthanc (not run)"
    lines = [f"node benchmark: {st['source']}: {st['instances']} instances in {st['studies']} "
             f"stud{'y' if st['studies'] == 1 else 'ies'}, {', '.join(st['images'])}, "
             f"{st['file_bytes'] / MB:.1f} MB in files ({st['pixel_bytes'] / MB:.1f} MB of pixels)",
             f"machine: {m['cpus']} CPUs, load average {' '.join(f'{x:.2f}' for x in m['loadavg_start'])} at the "
             f"start, {' '.join(f'{x:.2f}' for x in m['loadavg_end'])} at the end; OMP_NUM_THREADS "
             f"{m['omp_num_threads'] or 'unset'}; node: {node['config']['compression']['workers']} compression "
             f"worker(s), rule action {node['config']['compression']['rules'][0]['action']}, codec device "
             f"{m['codec_device']}, index {m.get('index', 'SQLite')}", ""]
    rows = [
        ("ingest, dcmsend", lambda r: _f(g(r, "ingest", "seconds"), ".2f", " s")),
        ("  instances/s", lambda r: _f(g(r, "ingest", "instances_per_s"), ".1f")),
        ("  MB/s (files)", lambda r: _f(g(r, "ingest", "mb_per_s"), ".1f")),
        ("  CPU: server / others", lambda r: _cpu(g(r, "ingest", "cpu"))),
        ("backlog compressed, after ingest", lambda r: _f(g(r, "compression", "after_ingest_s"), ".2f", " s")
         if "compression" in r else "n/a (kept as received)"),
        ("  from ingest start", lambda r: _f(g(r, "compression", "from_ingest_start_s"), ".2f", " s")
         if "compression" in r else ""),
        ("  per instance (node log, mean)", lambda r: _f(g(r, "compression", "per_instance_s_mean"), ".2f", " s")
         if "compression" in r else ""),
        ("  CPU after ingest: node / others", lambda r: _cpu(g(r, "compression", "cpu_after_ingest"))
         if "compression" in r else ""),
        ("  compressed / kept / failed", lambda r: (f"{g(r, 'compression', 'compressed')} / "
                                                    f"{g(r, 'compression', 'kept')} / {g(r, 'compression', 'failed')}")
         if "compression" in r else ""),
        ("bytes received", lambda r: _f(g(r, "bytes", "received") and g(r, "bytes", "received") / MB, ".2f", " MB")),
        ("bytes on disk (stored files)", lambda r: _f(g(r, "bytes", "on_disk_files")
                                                      and g(r, "bytes", "on_disk_files") / MB, ".2f", " MB")),
        ("  received / on disk", lambda r: _f(g(r, "bytes", "ratio"), ".2f", ":1")),
        ("retrieve study, getscu", lambda r: _f(g(r, "retrieve", "seconds"), ".2f", " s")),
        ("  instances/s", lambda r: _f(g(r, "retrieve", "instances_per_s"), ".1f")),
        ("  MB/s (pixels)", lambda r: _f(g(r, "retrieve", "mb_per_s"), ".1f")),
        ("  CPU: server / others", lambda r: _cpu(g(r, "retrieve", "cpu"))),
        ("  pixels equal to the originals", lambda r: (f"{g(r, 'retrieve', 'verified', 'equal')}/{st['instances']}"
                                                       if g(r, "retrieve", "verified") else "-")),
        ("  transfer syntax received", lambda r: ", ".join(g(r, "retrieve", "verified", "transfer_syntaxes") or {})
         or "-"),
    ]
    w0, w1 = 34, 26
    lines.append(f"{'':{w0}}{'this node':{w1}}{col2}")
    for name, fn in rows:
        a = fn(node) if node else "-"
        b = fn(orth) if orth else "-"
        lines.append(f"{name:{w0}}{a:{w1}}{b}".rstrip())
    for res in (node, orth):
        if res and res.get("error"):
            lines.append(f"ERROR ({res['label']}): {res['error']}")
    d = report.get("diagnostics")
    if d:
        do, un = d.get("decode_only") or {}, d.get("uncompressed_node") or {}
        lines += ["", "diagnostics (the node's retrieval time, taken apart):"]
        if do.get("instances"):
            lines.append(f"  decoding alone the {do['instances']} stored files in this process: {do['seconds']:.2f} s "
                         f"({do['ms_per_instance']:.0f} ms each, {do['mb_per_s']:.1f} MB/s, "
                         f"{do['torch_threads']} torch threads)")
        elif do.get("error"):
            lines.append(f"  decode alone: {do['error']}")
        r = un.get("retrieve") or {}
        if r.get("seconds") is not None:
            lines.append(f"  getscu from a node that does not compress (workers 0, stored Explicit VR LE sent as it "
                         f"is): {r['seconds']:.2f} s, pixels equal {r['verified']['equal']}/{st['instances']}; "
                         f"its dcmsend ingest {_f(g(un, 'ingest', 'instances_per_s'), '.1f')} instances/s")
        elif un.get("error"):
            lines.append(f"  uncompressed node: {un['error']}")
    lines += ["", "targets:"]
    for key in ("ingest", "retrieve"):
        v = report["targets"][key]
        ratio = v["node_over_orthanc"]
        what = (f"node/Orthanc instances/s = {ratio:.2f}" if key == "ingest" else f"node/Orthanc time = {ratio:.2f}") \
            if ratio is not None else "Orthanc not measured"
        lines.append(f"  {v['verdict']:4}  {v['rule']} ({what})")
    lines += ["", "commands:"]
    for res in (node, orth):
        if res:
            lines.append(f"  {res['label']}:")
            lines += [f"    {c}" for c in res["commands"]]
    if d and (d.get("uncompressed_node") or {}).get("commands"):
        lines.append("  diagnostic node (compression.workers 0):")
        lines += [f"    {c}" for c in d["uncompressed_node"]["commands"]]
    lines.append(f"  node configuration: {json.dumps(node['config'])}")
    if orth:
        lines.append(f"  Orthanc configuration: {json.dumps(orth['config'])}")
    lines.append(f"result: {'every instance stored, retrieved and verified' if report['ok'] else 'FAILED (see above)'}")
    return "\n".join(lines) + "\n"


def _get(res, keys):
    cur = res
    for k in keys:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(k)
    return cur


def _codec_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def benchmark(study_dir: str | None, slices: int, workers: int, size: int = 512, orthanc: bool = True,
              diagnostics: bool = True, timeout: float = 3600, action: str = "lossless", index_url: str = "",
              index_label: str = "SQLite") -> dict:
    """Run everything; the report (see :func:`table`).  RuntimeError when DCMTK is missing."""
    dcmsend, getscu = find_dcmtk("dcmsend"), find_dcmtk("getscu")
    if not dcmsend or not getscu:
        raise RuntimeError("DCMTK's dcmsend and getscu are needed (apt-get install dcmtk)")
    executable = find_orthanc() if orthanc else None
    work = tempfile.mkdtemp(prefix="nncodec-nodebench-")
    try:
        if study_dir:
            study = Study(os.path.abspath(study_dir), os.path.abspath(study_dir))
        else:
            folder = os.path.join(work, "study")
            make_ct_study(folder, slices, size)
            study = Study(folder, f"synthetic CT ({slices} slices)")
        report: dict = {"benchmark": "scp.nodebench", "date": _dt.datetime.now().isoformat(timespec="seconds"),
                        "study": study.describe(),
                        "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg(),
                                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                                    "codec_device": _codec_device(), "dcmsend": dcmsend, "getscu": getscu,
                                    "orthanc": executable, "index": index_label}}
        report["node"] = run_node(study, work, dcmsend, getscu, workers, timeout, action, index_url)
        report["orthanc"] = run_orthanc(study, work, dcmsend, getscu, executable, timeout) if executable else None
        if executable is None:
            report["orthanc_missing"] = "Orthanc not found (apt-get install orthanc)" if orthanc else "not asked for"
        if diagnostics and _ok(report["node"], True):
            report["diagnostics"] = run_diagnostics(study, work, dcmsend, getscu, timeout)
        report["machine"]["loadavg_end"] = loadavg()
        report["targets"] = verdicts(report["node"], report["orthanc"], report["machine"]["codec_device"])
        report["ok"] = _ok(report["node"], True) and _ok(report["orthanc"], False)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scp.nodebench", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", help="folder of DICOM files to send (default: a generated CT study)")
    p.add_argument("--slices", type=int, default=40, help="slices of the generated study (default 40)")
    p.add_argument("--size", type=int, default=512, help="rows and columns of the generated slices (default 512)")
    p.add_argument("--workers", type=int, default=1, help="the node's compression.workers (default 1)")
    p.add_argument("--action", default="lossless", choices=("lossless", "jpegxl", "htj2k", "smallest"),
                   help="the node's compression rule action (default lossless: the learned codec)")
    p.add_argument("--no-orthanc", action="store_true", help="measure the node alone")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the decode-only and uncompressed-node runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each step")
    p.add_argument("--index", default="sqlite",
                   help="the node's index: sqlite (default), postgresql (a throwaway local server) or a URL")
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args(argv)
    from .pgcluster import for_bench

    def terminated(signum, _frame):
        raise SystemExit(128 + signum)       # so that the servers are stopped and the folders removed
    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:                       # not the main thread: leave signals alone
        previous = None
    try:
        with for_bench(a.index) as (url, label):
            report = benchmark(a.study, a.slices, a.workers, a.size, not a.no_orthanc, not a.no_diagnostics,
                               a.timeout, a.action, url, label)
    except (RuntimeError, ValueError) as exc:       # (Unavailable is a RuntimeError)
        print(f"nodebench: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(table(report), end="")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
