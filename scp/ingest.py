"""Receiving one instance (the Storage SCP service): check, write durably, index, queue.

Why this order: the sender is told Success only after the file is on disk
(fsynced, atomically renamed) and the index transaction that makes it
findable (and queues its compression, due at once or after the deciding
rule's ``after`` delay) has committed.  The dataset is stored
exactly as it arrived on the wire, behind File Meta Information written by
this implementation.  It is staged in tmp/ first and checked there
(:mod:`scp.checks`: UIDs, SOP class, pixel data against its description,
private frames' checksums) so that nothing refused ever reaches objects/ and
no second copy of a large data set is held in memory.  There it is also read
and encoded again as retrieval would send it (:mod:`scp.roundtrip`): what
would not come back as it was sent is refused, not acknowledged.  Pixels are
decoded here only for the private syntaxes, which are stored and served as
received: a frame that does not decode to its CRC is refused.  Native Pixel Data with more bytes than its description is
stored and kept exactly as received (state ``kept``, never compressed or
transcoded), so that the surplus is returned as it came.  A failure to write (a full disk, a read-only or unwritable
folder, an index that cannot commit) is answered A700: the sender may retry,
and what was stored before is untouched.
"""
from __future__ import annotations

import errno
import logging
import zlib
from dataclasses import dataclass

import pydicom.uid as U
from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import encode_file_meta

import dicom_nncodec

from . import checks, faults, isolation, roundtrip
from . import rules as R
from .checks import CANNOT_UNDERSTAND, DUPLICATE, OUT_OF_RESOURCES, SUCCESS, StoreRefused
from .config import Config
from .index import COMPRESSED, KEPT, NOT_IMAGE, PENDING, Index, facts_from_dataset
from .storage import Storage

log = logging.getLogger("scp.ingest")


@dataclass
class Received:
    """One C-STORE request as the handler hands it over."""
    dataset: bytes | memoryview   # the encoded dataset exactly as received
    transfer_syntax: str      # of the presentation context
    sop_class_uid: str        # Affected SOP Class UID of the request
    sop_instance_uid: str     # Affected SOP Instance UID of the request
    calling_ae: str
    context_class: str | None = None   # the presentation context's abstract syntax
    oversized: bool = False   # the data set went past limits.max_instance_mb and was cut


def file_meta(rx: Received) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = rx.sop_class_uid
    fm.MediaStorageSOPInstanceUID = rx.sop_instance_uid
    fm.TransferSyntaxUID = dicom_nncodec.syntax.registered(rx.transfer_syntax) or rx.transfer_syntax
    fm.ImplementationClassUID = dicom_nncodec.IMPLEMENTATION_CLASS_UID
    fm.ImplementationVersionName = dicom_nncodec.IMPLEMENTATION_VERSION_NAME
    if rx.calling_ae:
        fm.SourceApplicationEntityTitle = rx.calling_ae
    return fm


def _inflated_size(data, limit: int) -> int:
    """Bytes a deflated data set inflates to, counting stops past ``limit`` (pydicom inflates it all
    into memory: a small message must not become gigabytes).  Damaged data counts as 0: parsing
    refuses it next."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    view, total = memoryview(data), 0
    try:
        for pos in range(0, len(view), 65536):
            chunk = bytes(view[pos:pos + 65536])
            while chunk and not d.eof and total <= limit:
                out = d.decompress(chunk, 65536)
                total += len(out)
                if not out and d.unconsumed_tail == chunk:
                    return total            # no progress: damaged; parsing decides
                chunk = d.unconsumed_tail
            if d.eof or total > limit:
                break
    except zlib.error:
        return 0
    return total


class Ingest:
    def __init__(self, cfg: Config, index: Index, storage: Storage, on_queued=lambda: None):
        self.cfg, self.index, self.storage, self.on_queued = cfg, index, storage, on_queued

    def store(self, rx: Received) -> int:
        """Store one instance; returns the C-STORE status.  Refusals and failures are logged by UID."""
        try:
            # (a native decoder's panic while the data set is checked is a refusal like any other damage)
            with isolation.contained("checking the received data set",
                                     into=lambda why: StoreRefused(CANNOT_UNDERSTAND, why)):
                return self._store(rx)
        except StoreRefused as exc:
            log.warning("C-STORE of %s from %s refused (0x%04X): %s", _shown(rx.sop_instance_uid), rx.calling_ae,
                        exc.status, exc)
            if exc.status != DUPLICATE:
                self.index.record_failure("store", _shown(rx.sop_instance_uid), str(exc))
            return exc.status
        except Exception as exc:
            reason = _os_reason(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            log.error("C-STORE of %s from %s failed (0xA700, the sender may retry): %s", _shown(rx.sop_instance_uid),
                      rx.calling_ae, reason)
            self.index.record_failure("store", _shown(rx.sop_instance_uid), reason)
            return OUT_OF_RESOURCES

    def _store(self, rx: Received) -> int:
        checks.check_request(rx.sop_class_uid, rx.sop_instance_uid, rx.context_class)
        limit = self.cfg.max_instance_mb * 2**20
        if rx.oversized or len(rx.dataset) > limit:
            raise StoreRefused(OUT_OF_RESOURCES, f"the data set is larger than limits.max_instance_mb "
                                                 f"({self.cfg.max_instance_mb} MB)")
        sop_uid = rx.sop_instance_uid.strip()
        if self.cfg.duplicates != "replace" and self.index.existing(sop_uid) is not None:
            return self._duplicate(sop_uid, rx)
        if self.cfg.min_free_mb and self.storage.free_mb() - len(rx.dataset) / 2**20 < self.cfg.min_free_mb:
            raise StoreRefused(OUT_OF_RESOURCES, f"less than {self.cfg.min_free_mb} MB would be left free in the "
                                                 "storage folder (storage.min_free_mb)")
        meta = file_meta(rx)
        if meta.TransferSyntaxUID == U.DeflatedExplicitVRLittleEndian and _inflated_size(rx.dataset, limit) > limit:
            raise StoreRefused(OUT_OF_RESOURCES, "the deflated data set inflates to more than limits.max_instance_mb")
        staged = self.storage.stage((b"\x00" * 128, b"DICM", encode_file_meta(meta), rx.dataset))
        try:
            ds = checks.read_header(staged.path, meta.TransferSyntaxUID == U.DeflatedExplicitVRLittleEndian)
            checks.check_identity(ds, rx.sop_class_uid, sop_uid)
            checks.check_pixel_data(ds, meta.TransferSyntaxUID, self.cfg.max_pixels)
            surplus = checks.pixel_surplus(ds, meta.TransferSyntaxUID)
            try:
                facts = facts_from_dataset(ds, meta.TransferSyntaxUID)
            except Exception as exc:
                raise StoreRefused(CANNOT_UNDERSTAND, f"attributes cannot be read: {type(exc).__name__}: {exc}") \
                    from None
            # what is acknowledged must come back: as retrieval reads and encodes it, and decodable
            roundtrip.check(staged.path, meta.TransferSyntaxUID, rx.dataset)
            if "PixelData" in ds and dicom_nncodec.syntax.registered(meta.TransferSyntaxUID) is not None:
                self._decode_private(ds)
            faults.point("ingest.staged")
            path = staged.commit()
        except BaseException:
            staged.discard()
            raise
        faults.point("ingest.renamed")
        policy = self.cfg.duplicates
        reason = ""
        if not facts.is_image:
            state = NOT_IMAGE
        elif meta.TransferSyntaxUID == dicom_nncodec.NNCodecLossless:
            state = COMPRESSED
        elif surplus:
            state, reason = KEPT, checks.surplus_reason(surplus)
            log.warning("%s from %s: %s", sop_uid, rx.calling_ae, reason)
        else:
            state = PENDING
        try:
            result = self.index.add(facts, path, staged.size, rx.calling_ae, policy, state, reason,
                                    self._delay(facts, rx.calling_ae) if state == PENDING else 0.0)
        except BaseException:
            self.storage.remove(path)
            raise
        faults.point("ingest.indexed")
        if result.outcome in ("kept_existing", "rejected"):      # a copy arrived on another association meanwhile
            self.storage.remove(path)
            return self._duplicate(sop_uid, rx)
        if result.superseded_path:
            faults.point("ingest.replaced")
            self.storage.remove(result.superseded_path)
            log.info("replaced %s with a new copy from %s", sop_uid, rx.calling_ae)
        if result.queued:
            self.on_queued()
        return SUCCESS

    def _delay(self, facts, calling_ae: str) -> float:
        """Seconds the deciding rule's ``after`` holds the instance back from compression (fixed now,
        at receipt, and kept in the queue)."""
        decision = R.decide(self.cfg.rules, R.Facts(facts.modality, facts.sop_class_uid, calling_ae,
                                                    facts.bits_stored, facts.photometric, facts.transfer_syntax,
                                                    facts.body_part), self.cfg.lossy_ceilings)
        return decision.after

    def _decode_private(self, ds) -> None:
        """A data set received in a private syntax is stored as it is and served as it is, never
        re-encoded by this node's compressor: every frame is decoded once now (model id, CRC-32 of the
        pixels) so that a damaged one is refused while the sender still holds the original."""
        try:
            dicom_nncodec.dataset.verify(ds, device=self.cfg.device, batch_size=self.cfg.batch_size)
        except OSError:
            raise                          # (the staged file cannot be read: not the data set's fault)
        except Exception as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, f"private pixel data does not decode: {exc}") from None

    def _duplicate(self, sop_uid: str, rx: Received) -> int:
        if self.cfg.duplicates == "reject":
            raise StoreRefused(DUPLICATE, "this SOP Instance UID is already stored (duplicates: reject)")
        log.info("%s from %s is already stored: new copy discarded (duplicates: keep)", sop_uid, rx.calling_ae)
        return SUCCESS


def _shown(uid) -> str:
    """A received UID as it may appear in a log line or the failure table (a hostile one is cut and escaped)."""
    text = str(uid or "").strip()
    return text if checks.valid_uid(text) else repr(text[:64])


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the storage file system is full ({exc.strerror})"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the storage folder cannot be written ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"
