"""Background compression: workers that take instances from the queue in the index.

Why in the background: a C-STORE is answered as soon as the instance is
durably stored and indexed; the learned codec (tenths of a second per slice
on a CPU) must never hold up a sending modality.  The queue lives in the
index, so a restart resumes it.

For each instance: decide by the rules, decode whatever arrived, encode with
the learned codec (frames batched, on the GPU when configured) or, for the
``jpegxl`` and ``htj2k`` actions, the standard codec (``smallest``: both the
learned codec and JPEG XL, keeping the smaller verified result), decode the
result again and compare (bit-exact for every lossless action, within N for max_error;
for natively encoded input the lossless check is on the stored bytes, so bits
above Bits Stored that the codec would drop are caught; for a ``ratio`` rule,
whose pixels have no error bound to compare against, every frame must decode
through the normal path, which checks its CRC, and reach a ratio within 10 %
of the one asked), then write the new file durably and switch the index to it
in one transaction.  Any failure keeps the original and records why.

A ``ratio`` rule is held to the lossy ceiling of the instance (see
``scp.rules``): the Modality and Body Part Examined of the stored file are
checked again before encoding, and a result with a frame above the ceiling
(the codec may exceed the ratio asked by up to 10 %) is discarded; in both
cases the instance is compressed losslessly instead, with a log line.  A
ratio the codec cannot reach for an image is a refusal like any unsupported
pixel data: the instance is kept as received, with the codec's reason.

A failure to write (a full disk, a read-only folder) is not the instance's
fault: it goes back to the queue and the worker waits (also while less than
``storage.min_free_mb`` is free) instead of marking it failed.

The same compressor runs inside a node and in ``dicom-nncodec worker``
processes (``scp.worker``) that share the node's index and storage folder.
Each thread claims a queue item under a lease in its own name
(``scp.owners``); the watchdog thread renews the leases of the jobs in hand
every third of ``compression.lease_seconds``, so a job is never coded by two
live workers, and the job of a worker that died (its leases no longer
renewed) is taken by another once its lease ran out.
"""
from __future__ import annotations

import copy
import logging
import threading
import time

from dataclasses import replace

import numpy as np
import pydicom.pixels
import pydicom.uid as U
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian

import dicom_nncodec
from dicom_nncodec import NNCodecLossless, NNCodecLossy, UnsupportedPixelData
from dicom_nncodec.dataset import compression_ratio, encoded_frames
from dicom_nncodec.pixels import PixelFormat
from dicom_nncodec.syntax import JPEGXLLossless

from . import checks, faults, isolation, owners, transcode
from . import rules as R
from .ceilings import ratio_text
from .config import Config
from .index import FAILED, KEPT, WATCHDOG, Index, Job, header_json
from .storage import Storage

log = logging.getLogger("scp.compressor")


class VerificationError(Exception):
    """The re-decoded result differs from the original beyond what the action allows."""


class AboveCeiling(Exception):
    """A frame of a ``ratio`` result is compressed more than the instance's lossy ceiling allows."""


# how far a frame's ratio may be from the ratio asked (the codec's promise)
RATIO_TOLERANCE = 0.10
# how often the watchdog looks for a worker thread that ended (seconds)
WATCHDOG_SECONDS = 1.0


def _frames_array(ds: Dataset) -> np.ndarray:
    arr = pydicom.pixels.pixel_array(ds, raw=True)
    return np.asarray(arr).astype(np.int64, copy=False)


def _native_bytes(ds: Dataset) -> bytes | None:
    """The stored pixel bytes in colour-by-pixel order, for natively encoded little-endian input."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed or not ts.is_little_endian:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, ba = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n = rows * cols * spp * frames * ba // 8
    data = bytes(ds.PixelData[:n])
    if spp > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        a = np.frombuffer(data, dtype=f"<u{ba // 8}").reshape(frames, spp, rows, cols)
        data = np.moveaxis(a, 1, -1).tobytes()
    return data


def frame_ratios(ds: Dataset) -> list[float]:
    """The compression ratio of each encoded frame of ``ds`` (uncompressed at Bits Allocated / encoded)."""
    fmt = PixelFormat.from_dataset(ds)
    return [compression_ratio(fmt, [frame]) for frame in encoded_frames(ds)]


# the standard syntax each standard lossless action stores in
STANDARD_TARGETS = {R.JPEGXL: JPEGXLLossless, R.HTJ2K: U.HTJ2KLossless}


def compress_verified(ds: Dataset, decision: R.Decision, device: str, batch_size: int) -> Dataset:
    """``ds`` compressed as ``decision`` says, proven to decode as required; the result (``ds`` itself,
    its little-endian copy for a big-endian source, or the new dataset a standard codec returns).  Every
    lossless action, learned or standard, is checked the same way: bit-exact against the stored pixels."""
    if decision.action == R.SMALLEST:
        return _smallest(ds, decision, device, batch_size)
    dicom_nncodec.fix_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise UnsupportedPixelData("no Pixel Data")
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        # the result is little endian: pydicom's writer would leave OW/OF/OL/OD values big-endian
        ds = transcode.little_endian(ds)
    surplus = checks.pixel_surplus(ds, ds.file_meta.TransferSyntaxUID)
    if surplus:          # coding the described pixels would drop the rest
        raise UnsupportedPixelData(checks.surplus_reason(surplus))
    reference = _frames_array(ds)
    reference_bytes = _native_bytes(ds) if decision.is_lossless else None
    ds = _encode(ds, decision, device, batch_size)
    check = transcode.decoded(copy.deepcopy(ds), device, batch_size)
    result = _frames_array(check)
    if result.shape != reference.shape:
        raise VerificationError(f"decoded shape {result.shape} differs from the original {reference.shape}")
    if decision.is_lossless:
        if not np.array_equal(result, reference):
            raise VerificationError("decoded pixels differ from the original")
        if reference_bytes is not None and bytes(check.PixelData[:len(reference_bytes)]) != reference_bytes:
            raise UnsupportedPixelData("the stored pixel data has bits set above Bits Stored, which lossless "
                                       "coding of the stored values would drop")
    elif decision.action == R.RATIO:
        ratios = frame_ratios(ds)
        asked = decision.ratio
        low, high = min(ratios), max(ratios)
        if low < asked * (1 - RATIO_TOLERANCE) - 1e-9 or high > asked * (1 + RATIO_TOLERANCE) + 1e-9:
            raise VerificationError(f"frame compression ratios {low:.2f}..{high:.2f}:1 are not within "
                                    f"{RATIO_TOLERANCE:.0%} of the {ratio_text(asked)} asked")
        if decision.ceiling is not None and high > decision.ceiling:
            raise AboveCeiling(f"a frame reached {high:.2f}:1, above the {ratio_text(decision.ceiling)} "
                               f"ceiling for this instance")
    else:
        worst = int(np.abs(result - reference).max(initial=0))
        if worst > decision.max_error:
            raise VerificationError(f"decoded pixels differ by up to {worst}, more than max_error "
                                    f"{decision.max_error}")
    return ds


def _encode(ds: Dataset, decision: R.Decision, device: str, batch_size: int) -> Dataset:
    """``ds`` coded as the action says (not yet verified)."""
    if decision.action == R.LOSSLESS:
        return dicom_nncodec.compress(ds, NNCodecLossless, device=device, batch_size=batch_size)
    if decision.action == R.RATIO:
        return dicom_nncodec.compress(ds, NNCodecLossy, ratio=decision.ratio, device=device, batch_size=batch_size)
    if decision.action == R.MAX_ERROR:
        return dicom_nncodec.compress(ds, NNCodecLossy, max_error=decision.max_error, device=device,
                                      batch_size=batch_size)
    target = STANDARD_TARGETS[decision.action]
    native = transcode.decoded(ds, device, batch_size)
    try:
        return transcode.encode_as(native, target, device, batch_size)
    except (ValueError, RuntimeError) as exc:      # pixel data the standard encoder does not take
        raise UnsupportedPixelData(f"{target.name}: {exc}") from None


def _smallest(ds: Dataset, decision: R.Decision, device: str, batch_size: int) -> Dataset:
    """The smaller of the learned codec's and JPEG XL's verified results: no instance is stored
    bigger than the standard would store it.  One that cannot code the image (or whose result
    fails its check, logged) leaves the other."""
    results, refusals = [], []
    for action in (R.LOSSLESS, R.JPEGXL):
        try:
            results.append(compress_verified(copy.deepcopy(ds), replace(decision, action=action), device,
                                             batch_size))
        except UnsupportedPixelData as exc:
            refusals.append(f"{action}: {exc}")
        except VerificationError as exc:
            log.warning("%s result of %s discarded: %s", action, ds.get("SOPInstanceUID", "?"), exc)
            refusals.append(f"{action}: {exc}")
    if not results:
        raise UnsupportedPixelData("; ".join(refusals))
    return min(results, key=lambda out: len(out.PixelData))


def stored_syntax_name(ds: Dataset) -> str:
    """The name of ``ds``'s transfer syntax as the state reason shows it."""
    ts = ds.file_meta.TransferSyntaxUID
    return {NNCodecLossless: "the learned codec (NNCodecLossless)"}.get(ts, transcode.syntax(ts).name)


def achieved_ratio(ds: Dataset) -> float:
    """The compression ratio of the whole encoded instance (as Lossy Image Compression Ratio states it)."""
    return compression_ratio(PixelFormat.from_dataset(ds), encoded_frames(ds))


def _attribute(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


class Compressor:
    def __init__(self, cfg: Config, index: Index, storage: Storage):
        self.cfg, self.index, self.storage = cfg, index, storage
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._workers: dict[int, threading.Thread] = {}     # worker number -> its thread
        self._current: dict[int, Job] = {}                  # worker number -> the job it has claimed
        self._watchdog: threading.Thread | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._paused = False
        self.restarts = 0          # workers the watchdog replaced since start
        self.tag = owners.new_tag()        # this compressor's part of its threads' lease owner names
        self._renewed = 0.0

    def owner(self, i: int) -> str:
        """The lease owner name of worker thread ``i``."""
        return owners.name(self.tag, i)

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        owners.alive(self.tag, True)
        for i in range(self.cfg.workers):
            if i not in self._workers or not self._workers[i].is_alive():
                self._workers[i] = self._spawn(i)
        if self.cfg.workers and (self._watchdog is None or not self._watchdog.is_alive()):
            self._watchdog = threading.Thread(target=self._watch, name="nncodec-compress-watchdog", daemon=True)
            self._watchdog.start()

    def _spawn(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._loop, args=(i,), name=f"nncodec-compress-{i}", daemon=True)
        t.start()
        return t

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Let each worker finish the instance it is on, then stop.  True if all stopped in time;
        an instance left unfinished stays claimed and goes back to the queue at the next start."""
        self._stopping.set()
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._watchdog is not None:
            self._watchdog.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for t in self._workers.values():
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._workers = {i: t for i, t in self._workers.items() if t.is_alive()}
        if not self._workers:
            owners.alive(self.tag, False)     # (a claim still held is now recognised as left behind)
        return not self._workers

    @property
    def alive(self) -> int:
        """Worker threads running now."""
        return sum(t.is_alive() for t in self._workers.values())

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until no queued instance is due and no worker is busy (for tests and tools; instances
        a compression delay holds back do not count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._busy_lock:
                busy = self._busy
            if not busy and self.index.queue_length(due_only=True) == 0:
                return True
            time.sleep(0.05)
        return False

    # --- the watchdog -------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Replace a worker thread that ended while the compressor runs (whatever ended it), and renew the
        leases of the jobs in hand."""
        while not self._stopping.wait(WATCHDOG_SECONDS):
            for i, t in list(self._workers.items()):
                if t.is_alive() or self._stopping.is_set():
                    continue
                try:
                    self._replace(i, t)
                except Exception:      # never let the watchdog itself end
                    log.exception("compression watchdog error")
            if time.monotonic() - self._renewed >= self.cfg.lease_seconds / 3:
                self.renew()

    def renew(self) -> None:
        """Extend the leases of the jobs in hand; a lease found lost is logged (its result will be discarded)."""
        self._renewed = time.monotonic()
        jobs = list(self._current.values())
        try:
            held = self.index.renew(jobs, self.cfg.lease_seconds)
        except Exception as exc:       # the index is unreachable: try again at the next tick
            log.warning("cannot renew compression leases: %s", type(exc).__name__)
            return
        in_hand = list(self._current.values())
        for job in jobs:
            if job.queue_id not in held and any(j is job for j in in_hand):     # (not finished meanwhile)
                log.warning("the lease on %s ran out and another worker took it: this result will be discarded",
                            job.sop_uid)

    def _replace(self, i: int, dead: threading.Thread) -> None:
        job = self._current.pop(i, None)
        self._workers[i] = self._spawn(i)
        self.restarts += 1
        what = f"compression worker {dead.name} died" + (f" while on {job.sop_uid}" if job else "")
        log.error("%s; the watchdog started another", what)
        self.index.record_failure(WATCHDOG, job.sop_uid if job else "", f"{what}; restarted by the watchdog")
        if job is not None:        # (what ended the worker would end the next one too: not queued again)
            self._give_up(job, "the compression worker died while on it")

    def _give_up(self, job: Job, reason: str) -> None:
        """Record a claimed job as failed (original kept) so that the queue moves on."""
        log.warning("compression of %s failed, original kept: %s", job.sop_uid, reason)
        try:
            self.index.finish_unchanged(job, FAILED, reason)
        except Exception as exc:        # the index is unreachable: the job stays claimed until the next start
            log.error("compression of %s: the failure cannot be recorded (%s)", job.sop_uid, type(exc).__name__)

    # --- work ---------------------------------------------------------------------------------------

    def _loop(self, i: int) -> None:
        while not self._stopping.is_set():
            job = None
            with self._busy_lock:
                self._busy += 1
            try:
                job = self.index.claim(self.owner(i), self.cfg.lease_seconds) if self._room() else None
                if job is not None:
                    self._current[i] = job
                    with isolation.contained(f"compressing {job.sop_uid}"):
                        if not self.process(job):
                            job = None       # put back (cannot write now): wait before the next try
            except Exception as exc:
                if job is None:     # the index is unreachable or similar: log, wait, go on
                    log.exception("compression worker error")
                else:               # anything the job raised that process() did not handle: record it, move on
                    self._give_up(job, f"{type(exc).__name__}: {exc}")
                job = None
            finally:
                with self._busy_lock:
                    self._busy -= 1
            self._current.pop(i, None)      # (not reached when the thread ends: the watchdog sees the job)
            if job is None:
                self._wake.wait(self.cfg.poll_seconds)
                self._wake.clear()

    def _room(self) -> bool:
        """Whether there is room for a compressed copy beside the original (storage.min_free_mb)."""
        if self.cfg.min_free_mb and self.storage.free_mb() < self.cfg.min_free_mb:
            if not self._paused:
                log.warning("compression paused: less than %d MB free in the storage folder (storage.min_free_mb)",
                            self.cfg.min_free_mb)
            self._paused = True
            return False
        if self._paused:
            log.info("compression resumed")
        self._paused = False
        return True

    def process(self, job: Job) -> bool:
        """Compress one claimed instance; False when it was put back in the queue (nothing could be written)."""
        facts = R.Facts(job.modality, job.sop_class_uid, job.calling_ae, job.bits_stored, job.photometric,
                        job.received_transfer_syntax, job.body_part)
        decision = R.decide(self.cfg.rules, facts, self.cfg.lossy_ceilings)
        if decision.action == R.KEEP:
            self.index.finish_unchanged(job, KEPT, f"kept by rule: {decision.rule}")
            return True
        if decision.done_by(job.transfer_syntax):
            self.index.finish_unchanged(job, KEPT, f"already in {transcode.syntax(job.transfer_syntax).name}")
            return True
        started = time.monotonic()
        try:
            with isolation.contained(f"compressing {job.sop_uid}"):    # decoding what a peer sent
                ds = dcmread(self.storage.abspath(job.path))
                # the ceiling again, from the stored file's own attributes (the index holds the series')
                decision = R.cap(decision, self.cfg.lossy_ceilings, _attribute(ds, "Modality"),
                                 _attribute(ds, "BodyPartExamined"))
                try:
                    ds = compress_verified(ds, decision, self.cfg.device, self.cfg.batch_size)
                except AboveCeiling as exc:
                    decision = R.lossless_instead(decision, str(exc))
                    ds = dcmread(self.storage.abspath(job.path))
                    ds = compress_verified(ds, decision, self.cfg.device, self.cfg.batch_size)
        except UnsupportedPixelData as exc:     # also a ratio the codec cannot reach for this image
            at = f" at {ratio_text(decision.ratio)}" if decision.action == R.RATIO else ""
            self.index.finish_unchanged(job, KEPT, f"not supported by the codec{at}: {exc}")
            log.info("kept %s as received: not supported by the codec%s: %s", job.sop_uid, at, exc)
            return True
        except OSError as exc:         # the stored file cannot be read now (a disk error): not the instance's fault
            self.index.release(job)
            log.warning("compression of %s put back in the queue: %s", job.sop_uid, exc)
            return False
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.index.finish_unchanged(job, FAILED, reason)
            log.warning("compression of %s failed, original kept: %s", job.sop_uid, reason)
            return True
        faults.point("compress.coded")
        try:
            # dataset.save names this implementation in the file meta (and copes with big-endian sources)
            path, size = self.storage.write(lambda f: dicom_nncodec.dataset.save(ds, f))
        except OSError as exc:
            self.index.release(job)
            log.warning("compression of %s put back in the queue: cannot write the compressed file (%s)",
                        job.sop_uid, exc.strerror or exc)
            return False
        except Exception as exc:
            reason = f"cannot write the compressed file: {exc}"
            self.index.finish_unchanged(job, FAILED, reason)
            log.warning("compression of %s failed, original kept: %s", job.sop_uid, reason)
            return True
        faults.point("compress.written")
        new_uid = str(ds.SOPInstanceUID) if decision.lossy else None
        note = decision.note
        if decision.action == R.SMALLEST:
            note = f"smallest: {stored_syntax_name(ds)}, {size} bytes"
        elif decision.action == R.RATIO:
            note = (f"ratio {achieved_ratio(ds):.2f}:1 reached (rule {decision.rule!r} asks "
                    f"{ratio_text(decision.ratio)})")
        try:
            done, remove = self.index.finish_compressed(job, path, str(ds.file_meta.TransferSyntaxUID), size,
                                                        new_uid, header_json(ds) if new_uid else None, note)
        except BaseException:
            self.storage.remove(path)      # the index still points to the original
            raise
        faults.point("compress.switched")
        self.storage.remove(remove)
        if done:      # a warning when the rule's lossy action was not taken: its match meets instances it may not
            log.log(logging.WARNING if decision.note else logging.INFO,
                    "compressed %s (%s) to %d bytes in %.2f s%s%s", job.sop_uid, decision.action, size,
                    time.monotonic() - started, f", new SOP Instance UID {new_uid}" if new_uid else "",
                    f"; {note}" if note else "")
        else:
            log.info("compressed %s, but a newer copy arrived or another worker took the job over meanwhile: "
                     "result discarded", job.sop_uid)
        return True
