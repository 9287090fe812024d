"""Receiving one instance (the Storage SCP service): check, write durably, index, queue.

Why this order: the sender is told Success only after the file is on disk
(fsynced, atomically renamed) and the index transaction that makes it
findable (and queues its compression) has committed.  The dataset is stored
exactly as it arrived on the wire, behind File Meta Information written by
this implementation; only the header is parsed here, never the pixels.
"""
from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import encode_file_meta

import dicom_nncodec

from .config import Config
from .index import COMPRESSED, NOT_IMAGE, PENDING, Index, facts_from_dataset
from .storage import Storage

log = logging.getLogger("scp.ingest")

SUCCESS = 0x0000
DUPLICATE = 0x0111           # Failure: Duplicate SOP Instance (duplicates: reject)
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class Received:
    """One C-STORE request as the handler hands it over."""
    dataset: bytes            # the encoded dataset exactly as received
    transfer_syntax: str      # of the presentation context
    sop_class_uid: str        # Affected SOP Class UID of the request
    sop_instance_uid: str     # Affected SOP Instance UID of the request
    calling_ae: str


class StoreRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


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


def _check_uid(ds, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} is missing")
    if len(value) > 64 or not _UID.match(value):
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
    return value


class Ingest:
    def __init__(self, cfg: Config, index: Index, storage: Storage, on_queued=lambda: None):
        self.cfg, self.index, self.storage, self.on_queued = cfg, index, storage, on_queued

    def store(self, rx: Received) -> int:
        """Store one instance; returns the C-STORE status.  Refusals and failures are logged by UID."""
        try:
            return self._store(rx)
        except StoreRefused as exc:
            log.warning("C-STORE of %s from %s refused (0x%04X): %s", rx.sop_instance_uid, rx.calling_ae,
                        exc.status, exc)
            if exc.status != DUPLICATE:
                self.index.record_failure("store", rx.sop_instance_uid, str(exc))
            return exc.status
        except Exception as exc:
            log.error("C-STORE of %s from %s failed: %s: %s", rx.sop_instance_uid, rx.calling_ae,
                      type(exc).__name__, exc)
            self.index.record_failure("store", rx.sop_instance_uid, f"{type(exc).__name__}: {exc}")
            return OUT_OF_RESOURCES

    def _store(self, rx: Received) -> int:
        if self.cfg.min_free_mb and self.storage.free_mb() < self.cfg.min_free_mb:
            raise StoreRefused(OUT_OF_RESOURCES, f"less than {self.cfg.min_free_mb} MB free in the storage folder")
        meta = file_meta(rx)
        content = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), rx.dataset))
        try:
            ds = dcmread(io.BytesIO(content), stop_before_pixels=True)
        except Exception as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, f"the dataset cannot be parsed: {exc}") from None
        sop_uid = _check_uid(ds, "SOPInstanceUID")
        if sop_uid != rx.sop_instance_uid.strip():
            raise StoreRefused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's")
        _check_uid(ds, "StudyInstanceUID")
        _check_uid(ds, "SeriesInstanceUID")
        policy = self.cfg.duplicates
        if policy != "replace" and self.index.existing(sop_uid) is not None:
            return self._duplicate(sop_uid, rx)
        facts = facts_from_dataset(ds, meta.TransferSyntaxUID)
        if not facts.is_image:
            state = NOT_IMAGE
        elif meta.TransferSyntaxUID == dicom_nncodec.NNCodecLossless:
            state = COMPRESSED
        else:
            state = PENDING
        path, size = self.storage.write(content)
        try:
            result = self.index.add(facts, path, size, rx.calling_ae, policy, state)
        except BaseException:
            self.storage.remove(path)
            raise
        if result.outcome in ("kept_existing", "rejected"):      # a copy arrived on another association meanwhile
            self.storage.remove(path)
            return self._duplicate(sop_uid, rx)
        if result.superseded_path:
            self.storage.remove(result.superseded_path)
            log.info("replaced %s with a new copy from %s", sop_uid, rx.calling_ae)
        if result.queued:
            self.on_queued()
        return SUCCESS

    def _duplicate(self, sop_uid: str, rx: Received) -> int:
        if self.cfg.duplicates == "reject":
            raise StoreRefused(DUPLICATE, "this SOP Instance UID is already stored (duplicates: reject)")
        log.info("%s from %s is already stored: new copy discarded (duplicates: keep)", sop_uid, rx.calling_ae)
        return SUCCESS
