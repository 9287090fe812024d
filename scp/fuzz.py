"""Hostile input at scale: seeded mutations of C-STORE requests sent to a real node, and what must hold after.

Why in the package: issue 14's promise (nothing a peer sends stalls the node, ends a thread, or is
acknowledged and then lost or returned changed) is about inputs nobody thought of.  The suite runs a
small seeded batch (``tests/test_node_fuzz.py``); operators and release checks run the same generator
longer::

    python -m scp.fuzz --count 10000 --seed 7              # in-process node; counts, RSS at start and end
    python -m scp.fuzz --count 2000 --seed 7 --kills 20    # node as a child process, SIGKILLed 20 times

Each input is a valid small image (explicit/implicit/deflated/big-endian/private syntax) changed in one
of these ways: header and geometry values, Pixel Data too short or too long, encapsulated data claiming
RLE, JPEG-LS, JPEG 2000 or the private syntaxes with random or truncated fragments, byte flips in the
encoded data set, overwritten length fields, group 0002 inside the data set, huge or badly encoded
text, hostile UIDs.  After the run: the node answers C-ECHO, no thread died (compression workers,
watchdog restarts), the compression queue drained, and every instance answered 0x0000 comes back
through C-GET in the syntax it was sent in: byte for byte when stored as received, with the same
elements and pixels when the node compressed it (:func:`returned_as_sent`).  With ``--kills`` the node
is also killed during ingest and compression and restarted, and ``fsck`` must find nothing wrong.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import random
import sys
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pydicom.uid as U
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelGet, \
    Verification

import dicom_nncodec

from . import encoding as E
from . import fsck, roundtrip
from .transcode import served

SC = str(SecondaryCaptureImageStorage)
GET = StudyRootQueryRetrieveInformationModelGet
MUTATIONS = ("none", "geometry", "pixel-length", "encapsulated", "byte-flips", "length-field", "group-0002",
             "text", "uid")
ENCAPSULATED = (U.RLELossless, U.JPEGLSLossless, U.JPEG2000Lossless, dicom_nncodec.NNCodecLossless,
                dicom_nncodec.NNCodecLossy)


@dataclass
class Case:
    n: int
    mutation: str
    transfer_syntax: str
    sop_class: str
    sop_uid: str             # the request's Affected SOP Instance UID
    data: bytes


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    refused: dict = field(default_factory=dict)        # status -> count
    unanswered: int = 0                                 # no C-STORE response within the DIMSE timeout
    unanswered_cases: list = field(default_factory=list)
    by_mutation: dict = field(default_factory=dict)     # mutation -> [accepted, refused]
    returned_exact: int = 0
    returned_equivalent: int = 0                         # compressed by the node: same elements and pixels
    returned_wrong: list = field(default_factory=list)   # (SOP Instance UID, why)

    def record(self, case: Case, status: int | None) -> None:
        self.sent += 1
        slot = self.by_mutation.setdefault(case.mutation, [0, 0])
        if status is None:
            self.unanswered += 1
            self.unanswered_cases.append(f"#{case.n} {case.mutation} {case.transfer_syntax}")
        elif status == 0:
            self.accepted += 1
            slot[0] += 1
        else:
            self.refused[status] = self.refused.get(status, 0) + 1
            slot[1] += 1


# --- inputs --------------------------------------------------------------------------------------------

def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120)}"


def base_image(rng: random.Random, study: str) -> Dataset:
    rows, cols = rng.randint(1, 20), rng.randint(1, 20)
    bits = rng.choice([8, 16])
    stored = 8 if bits == 8 else rng.choice([10, 12, 16])
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 2 ** stored, (rows, cols))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, _uid(rng)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, _uid(rng)
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SC, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
    ds.PatientID, ds.PatientName, ds.Modality = "FUZZ", "Fuzz^Input", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, 0
    data = pixels.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def _geometry(rng, ds):
    keyword = rng.choice(["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                          "PixelRepresentation", "NumberOfFrames", "PlanarConfiguration", "PhotometricInterpretation"])
    if keyword == "PhotometricInterpretation":
        ds.PhotometricInterpretation = rng.choice(["", "RGB", "YBR_FULL_422", "PALETTE COLOR", "MONOCHROME1\\RGB",
                                                   "X" * 16])
    elif keyword == "NumberOfFrames":
        ds.NumberOfFrames = rng.choice(["0", "-1", "2", "abc", "99999999999", "1\\2"])
    else:
        tag = tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, "US", rng.choice([0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 32, 64, 255, 65535, [1, 2]]))


def _encapsulated(rng, ds, frames_of_private: list[bytes]) -> str:
    ts = rng.choice(ENCAPSULATED)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    choice = rng.random()
    if choice < 0.4 or not frames_of_private:
        frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.choice([n, n, n + 1, 0]))]
    elif choice < 0.7:
        frame = rng.choice(frames_of_private)
        frames = [frame[:rng.randint(0, len(frame))]]
    else:
        frame = bytearray(rng.choice(frames_of_private))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        frames = [bytes(frame)]
    frames = [f + b"\x00" * (len(f) % 2) or b"\x00\x00" for f in frames]
    ds.PixelData = encapsulate(frames) if frames else b""
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ts


def _text(rng, ds) -> bool:
    """True when the data set must go implicit (a value too long for a 16-bit length)."""
    kind = rng.randrange(4)
    if kind == 0:
        ds.PatientName = "N" * rng.choice([65, 1000, 70000])
        return len(str(ds.PatientName)) > 65534
    if kind == 1:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds["StudyDescription"] = DataElement(0x00081030, "LO", rng.randbytes(rng.randint(1, 64)))
    elif kind == 2:
        ds.SpecificCharacterSet = rng.choice(["ISO 2022 IR 87", "NO SUCH CHARSET", "ISO_IR 100\\ISO_IR 192"])
        ds["InstitutionName"] = DataElement(0x00080080, "LO", b"\x1b$B" + rng.randbytes(20))
    else:
        ds["ImageComments"] = DataElement(0x00204000, "LT", "\u00e9\u4e2d" * rng.randint(1, 5000))
    return False


def _hostile_uid(rng) -> str:
    return rng.choice(["", " ", "../../etc/passwd", "1." * 40 + "1", "1.2.3\x00", "1.2.840.abc", "0" * 65,
                       "1.2.840.10008.1.2.1", "1..2", ".1.2"])


def make_case(rng: random.Random, n: int, studies: list[str], private_frames: list[bytes]) -> Case:
    """Input ``n``: a base image, encoded in a syntax, mutated in one way (a mutation that pydicom will not
    even build becomes the unmutated image, marked "unwritable"; the generator stays seeded)."""
    try:
        return _make_case(rng, n, studies, private_frames)
    except Exception:
        ds = base_image(random.Random(n), studies[0])
        return Case(n, "unwritable", str(U.ExplicitVRLittleEndian), SC, ds.SOPInstanceUID, served(ds, False, True))


def _make_case(rng: random.Random, n: int, studies: list[str], private_frames: list[bytes]) -> Case:
    ds = base_image(rng, rng.choice(studies))
    mutation = rng.choice(MUTATIONS)
    ts = rng.choices([U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian,
                      U.ExplicitVRBigEndian, dicom_nncodec.NNCodecLossless], [5, 2, 1, 1, 1])[0]
    request_uid = ds.SOPInstanceUID
    implicit_needed = False
    if ts == dicom_nncodec.NNCodecLossless and mutation not in ("encapsulated",):
        try:
            dicom_nncodec.compress(ds, device="cpu")
            private_frames.append(bytes(dicom_nncodec.dataset.encoded_frames(ds)[0]))
            del private_frames[:-8]
        except Exception:
            ts = U.ExplicitVRLittleEndian
    if mutation == "geometry":
        try:
            _geometry(rng, ds)
        except ValueError:         # (pydicom will not even hold this value: that input is the unmutated one)
            mutation = "none"
    elif mutation == "pixel-length" and ts != dicom_nncodec.NNCodecLossless:
        data = bytes(ds.PixelData)
        cut = rng.choice([-2, -1, 1, 2, 7, len(data)])
        ds.PixelData = data[:-cut] if cut > 0 and cut <= len(data) else data + rng.randbytes(-cut)
    elif mutation == "encapsulated":
        ts = _encapsulated(rng, ds, private_frames)
    elif mutation == "text":
        implicit_needed = _text(rng, ds)
    elif mutation == "uid":
        which = rng.randrange(3)
        bad = _hostile_uid(rng)
        if which == 0 and len(bad) <= 64:        # (pynetdicom will not encode a longer one in a command)
            request_uid = bad
        elif which == 1:
            ds.SOPInstanceUID = bad
        else:
            ds.StudyInstanceUID = bad
    if implicit_needed:
        ts = U.ImplicitVRLittleEndian
    ts = U.UID(str(ts))
    implicit = ts == U.ImplicitVRLittleEndian
    little = ts != U.ExplicitVRBigEndian
    if ts == U.ExplicitVRBigEndian and "PixelData" in ds and int(ds.get("BitsAllocated", 8) or 8) == 16 \
            and not ds["PixelData"].is_undefined_length:
        raw = bytes(ds.PixelData)
        ds.PixelData = E.swapped(raw[:len(raw) // 2 * 2], 2) + raw[len(raw) // 2 * 2:]
    try:
        data = served(ds, implicit, little)
    except Exception:              # a mutation pydicom cannot write: send the data set as it was
        mutation, data = "unwritable", served(base_image(random.Random(n), studies[0]), False, True)
        ts, implicit = U.ExplicitVRLittleEndian, False
    if mutation == "byte-flips":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        data = bytes(buf)
    elif mutation == "length-field":
        buf = bytearray(data)
        at = data.find(b"\xe0\x7f\x10\x00") if rng.random() < 0.3 else -1
        pos = at + (8 if not implicit and at >= 0 else 4) if at >= 0 else rng.randrange(max(1, len(buf) - 4))
        width = 4 if implicit or at >= 0 else rng.choice([2, 4])
        buf[pos:pos + width] = rng.randbytes(width)
        data = bytes(buf[:len(data)])
    elif mutation == "group-0002":
        data = b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" + data if not implicit else \
            b"\x02\x00\x10\x00\x14\x00\x00\x001.2.840.10008.1.2.1\x00" + data
    if ts == U.DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = c.compress(data) + c.flush()
        if mutation == "byte-flips" and rng.random() < 0.5:
            buf = bytearray(data)
            buf[rng.randrange(len(buf))] ^= 0xFF
            data = bytes(buf)
    return Case(n, mutation, str(ts), SC, request_uid, data)


def cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    studies = [_uid(rng) for _ in range(3)]
    private_frames: list[bytes] = []
    return [make_case(rng, n, studies, private_frames) for n in range(count)]


# --- sending and checking ---------------------------------------------------------------------------------

def send_all(port: int, batch: list[Case], tally: Tally, acked: dict, per_association: int = 40,
             dimse_timeout: float = 30, stop: threading.Event | None = None) -> None:
    """Send ``batch`` in associations of ``per_association``; record statuses; keep what was acknowledged."""
    from .testing import store_bytes
    for start in range(0, len(batch), per_association):
        if stop is not None and stop.is_set():
            return
        chunk = batch[start:start + per_association]

        def on_status(i, status, chunk=chunk):
            tally.record(chunk[i], status)
            if status == 0:
                acked[chunk[i].sop_uid] = chunk[i]
        try:
            store_bytes(port, [(c.sop_class, c.sop_uid, c.transfer_syntax, c.data) for c in chunk],
                        calling_ae="FUZZER", dimse_timeout=dimse_timeout, on_status=on_status)
        except Exception:
            if stop is not None:
                return              # (the node was killed)
            raise


def _inflated(ts: str, data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS) if ts == U.DeflatedExplicitVRLittleEndian else data


def returned_as_sent(case: Case, back_ts: str, back: bytes) -> str:
    """"exact", "equivalent" (same elements and pixels: the node compressed it, or converted a
    big-endian one to little endian), or why it differs."""
    sent, got = _inflated(case.transfer_syntax, case.data), _inflated(back_ts, back)
    if sent == got and back_ts == case.transfer_syntax:
        return "exact"
    ts, bts = U.UID(case.transfer_syntax), U.UID(back_ts)
    try:
        expected = E.parse(sent, ts == U.ImplicitVRLittleEndian, ts != U.ExplicitVRBigEndian)
        if ts == U.ExplicitVRBigEndian and bts != ts:
            expected = E.to_little_endian(expected)
        why = roundtrip.difference(expected, E.parse(got, bts == U.ImplicitVRLittleEndian,
                                                     bts != U.ExplicitVRBigEndian), top=True)
    except E.Malformed as exc:
        return f"unparseable: {exc}"
    if why:
        return why
    a, b = _pixels(case.transfer_syntax, sent), _pixels(back_ts, got)
    return "equivalent" if a is not None and b is not None and np.array_equal(a, b) else "pixels differ"


def _pixels(ts: str, data: bytes):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, "1.2.3"
    from pynetdicom.dsutils import encode_file_meta
    try:
        ds = dcmread(io.BytesIO(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + data))
        return ds.pixel_array
    except Exception:
        return None


def retrieve_and_compare(port: int, acked: dict, tally: Tally, calling_ae: str = "FUZZGET") -> None:
    """C-GET every acknowledged instance (by study, in the syntax it was sent in) and compare."""
    from .testing import get
    groups: dict[tuple, list[Case]] = {}
    for case in acked.values():
        study = _study_of(case)
        groups.setdefault((study, case.transfer_syntax), []).append(case)
    for (study, ts), items in sorted(groups.items()):
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study
        # (big endian also as Explicit VR Little Endian: once compressed, it is no longer produced)
        syntaxes = [dicom_nncodec.syntax.registered(ts) or U.UID(ts)] + \
            ([U.ExplicitVRLittleEndian] if ts == U.ExplicitVRBigEndian else [])
        try:
            final, back = get(port, ident, GET, [SC], syntaxes, calling_ae=calling_ae, raw=True)
        except ConnectionError as exc:
            tally.returned_wrong += [(c.sop_uid, f"#{c.n} {c.mutation}: C-GET proposing {ts}: {exc}") for c in items]
            continue
        got = {}
        for back_ts, data in back:
            try:
                got[_sop_uid_of(back_ts, data)] = (back_ts, data)
            except Exception:
                continue
        for case in items:
            if case.sop_uid not in got:
                tally.returned_wrong.append((case.sop_uid, f"#{case.n} {case.mutation} {ts} not returned (final status "
                                                           f"0x{int(final.Status) if final else -1:04X})"))
                continue
            verdict = returned_as_sent(case, *got[case.sop_uid])
            if verdict == "exact":
                tally.returned_exact += 1
            elif verdict == "equivalent":
                tally.returned_equivalent += 1
            else:
                tally.returned_wrong.append((case.sop_uid, f"{case.mutation}: {verdict}"))


def _study_of(case: Case) -> str:
    return str(_header(case.transfer_syntax, case.data).StudyInstanceUID)


def _sop_uid_of(ts: str, data: bytes) -> str:
    return str(_header(ts, data).SOPInstanceUID)


def _header(ts: str, data: bytes) -> Dataset:
    from pydicom.filereader import read_dataset
    ts = U.UID(ts)
    data = _inflated(ts, data)
    return read_dataset(io.BytesIO(data), ts == U.ImplicitVRLittleEndian, ts != U.ExplicitVRBigEndian,
                        stop_when=lambda tag, vr, length: tag > 0x0020000D)


def echo(port: int) -> bool:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().get("Status", -1)) == 0
    finally:
        assoc.release()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- the two runs ----------------------------------------------------------------------------------------

def run_in_process(storage: str, count: int, seed: int, workers: int = 1, drain_timeout: float = 600) -> dict:
    """A node in this process, ``count`` inputs; the figures (see :func:`main`)."""
    from .testing import running_node
    tally, acked = Tally(), {}
    rss_start = rss_mb()
    threads_before = {t.name for t in threading.enumerate()}
    started = time.monotonic()
    with running_node(storage, compression={"workers": workers}, peers=[
            {"ae_title": "FUZZGET", "host": "127.0.0.1", "port": 1}]) as node:
        send_all(node.port, cases(count, seed), tally, acked)
        drained = node.compressor.wait_idle(drain_timeout)
        alive = echo(node.port)
        retrieve_and_compare(node.port, acked, tally)
        workers_alive, restarts = node.compressor.alive, node.compressor.restarts
        commitments_alive = node.commitments._thread is not None and node.commitments._thread.is_alive()
        threads = sorted(t.name for t in threading.enumerate() if t.name not in threads_before)
        failures = node.index.stats()["by_state"]
    return {"sent": tally.sent, "accepted": tally.accepted, "refused": sum(tally.refused.values()),
            "refused_by_status": {f"0x{k:04X}": v for k, v in sorted(tally.refused.items())},
            "unanswered": tally.unanswered, "unanswered_cases": tally.unanswered_cases[:20],
            "returned_exact": tally.returned_exact,
            "returned_equivalent": tally.returned_equivalent, "returned_wrong": tally.returned_wrong,
            "echo_after": alive, "queue_drained": drained, "workers_alive": workers_alive, "workers": workers,
            "worker_restarts": restarts, "commitment_thread_alive": commitments_alive, "node_threads": threads,
            "states": failures, "by_mutation": tally.by_mutation, "rss_mb_start": round(rss_start, 1),
            "rss_mb_end": round(rss_mb(), 1), "seconds": round(time.monotonic() - started, 1)}


def run_with_kills(folder: str, count: int, seed: int, kills: int) -> dict:
    """The node as a child process, SIGKILLed ``kills`` times while inputs arrive and compress; then
    restarted once more: every acknowledged instance must come back and fsck find nothing wrong."""
    from .config import load
    from .index import Index
    from .testing import NodeProcess, free_port
    rng = random.Random(seed ^ 0x5EED)
    port = free_port()
    config_path = os.path.join(folder, "node.yaml")
    with open(config_path, "w") as f:
        f.write(f"bind: 127.0.0.1\nport: {port}\n"
                f"storage: {{path: {os.path.join(folder, 'store')}, min_free_mb: 0}}\n"
                "compression: {device: cpu, workers: 1, poll_seconds: 0.2, batch_size: 4}\n"
                "limits: {shutdown_grace_seconds: 5, acse_timeout: 10, dimse_timeout: 20, network_timeout: 20}\n"
                f"logging: {{file: {os.path.join(folder, 'node.log')}}}\n"
                "peers: [{ae_title: FUZZGET, host: 127.0.0.1, port: 1}]\n")
    cfg = load(config_path)
    inputs = cases(count, seed)
    per_round = max(1, len(inputs) // (kills + 1))
    tally, acked = Tally(), {}
    done, crash_findings = 0, []
    started = time.monotonic()
    for k in range(kills):
        node = NodeProcess(config_path, port).start()
        stop = threading.Event()
        batch = inputs[done:done + per_round]
        done += len(batch)
        sender = threading.Thread(target=send_all, args=(port, batch, tally, acked),
                                  kwargs={"dimse_timeout": 5, "stop": stop}, daemon=True)
        sender.start()
        time.sleep(rng.uniform(0.2, 2.0))            # during ingest, or compression of what arrived
        node.kill()
        stop.set()
        sender.join(60)
        out = io.StringIO()
        fsck.check(cfg, False, out)
        kinds = {line.split()[0] for line in out.getvalue().splitlines()[1:-1] if line.strip()}
        if not kinds <= {"orphan", "leftover", "queue"}:
            crash_findings.append(out.getvalue())
    node = NodeProcess(config_path, port).start()
    try:
        send_all(port, inputs[done:], tally, acked)
        idx = Index(f"sqlite:///{os.path.join(folder, 'store', 'index.sqlite')}")
        deadline = time.monotonic() + 600
        while idx.queue_length() and time.monotonic() < deadline:
            time.sleep(0.3)
        drained = idx.queue_length() == 0
        idx.dispose()
        alive = echo(port)
        retrieve_and_compare(port, acked, tally)
    finally:
        stopped = node.stop()
    out = io.StringIO()
    fsck.check(cfg, True, out)
    repaired = out.getvalue()
    out = io.StringIO()
    clean = fsck.check(cfg, False, out) == 0
    return {"sent": tally.sent, "accepted": tally.accepted, "refused": sum(tally.refused.values()),
            "unanswered (killed mid-request included)": tally.unanswered, "kills": kills,
            "returned_exact": tally.returned_exact, "returned_equivalent": tally.returned_equivalent,
            "returned_wrong": tally.returned_wrong, "echo_after": alive, "queue_drained": drained,
            "clean_stop": stopped == 0, "fsck_after_crashes_unexpected": crash_findings,
            "fsck_repair": repaired.strip().splitlines()[-1:], "fsck_clean": clean,
            "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scp.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="inputs to send (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generator (default 1)")
    p.add_argument("--kills", type=int, default=0, help="SIGKILL the node (a child process) this many times")
    p.add_argument("--workers", type=int, default=1, help="compression workers of the in-process node")
    p.add_argument("--storage", help="folder for the node's storage (default: a new temporary folder)")
    args = p.parse_args(argv)
    folder = args.storage or tempfile.mkdtemp(prefix="nncodec-fuzz-")
    os.makedirs(folder, exist_ok=True)
    # the node's log (refusals, failed sub-operations) goes to a file; the terminal gets the figures
    logging.basicConfig(level=logging.INFO, filename=os.path.join(folder, "fuzz.log"),
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    if args.kills:
        result = run_with_kills(folder, args.count, args.seed, args.kills)
        ok = (not result["returned_wrong"] and result["echo_after"] and result["queue_drained"]
              and result["fsck_clean"] and not result["fsck_after_crashes_unexpected"])
    else:
        result = run_in_process(os.path.join(folder, "store"), args.count, args.seed, args.workers)
        ok = (not result["returned_wrong"] and result["echo_after"] and result["queue_drained"]
              and result["workers_alive"] == args.workers and result["worker_restarts"] == 0
              and result["unanswered"] == 0)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"storage: {folder}")
    print("RESULT: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
