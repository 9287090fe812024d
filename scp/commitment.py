"""Storage Commitment Push Model (PS3.4 J): a sender may delete its copies once this node commits.

Why durable and asynchronous: a commitment is a promise that lets the
sender throw data away, so it is given only for what is really safe here, and
the answer may take time (a private-syntax file is decoded in full first).
The N-ACTION request is recorded in the index before it is answered, so a
restart loses no request; a worker thread evaluates it and sends the
N-EVENT-REPORT on the requesting association while that is still open
(``commitment.same_association``), otherwise on a new association to the
requestor's address under ``peers`` (this node proposing the SCP role, PS3.4
J.3.3), retrying every ``retry_seconds`` until ``give_up_hours``.

An instance is committed when its file is there with the size the index
recorded and the SOP Instance UID asked about, storage.fsync is on, and:
compressed by this node (verified when it was made), or stored as it arrived
in a standard syntax (kept byte for byte), or, when it arrived in a private
syntax, every frame decodes and passes its CRC-32 now.  Failed, with Failure
Reason: 0112H no such object instance; 0119H the SOP class differs; 0110H
processing failure: the file is missing or damaged, fsync is off, or the
original is (or is about to be) replaced by a lossy derivative (a max_error or
ratio rule).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

import dicom_nncodec

from . import checks, isolation
from . import rules as R
from .config import Config
from .index import COMPRESSED, PENDING, Index
from .storage import Storage
from .transport import tls_args

log = logging.getLogger("scp.commitment")

SUCCESS_EVENT, FAILURES_EVENT = 1, 2          # Event Type ID of the N-EVENT-REPORT
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
# N-ACTION response statuses
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124
SAME_ASSOCIATION_GRACE = 0.5     # seconds a requestor has to release before the report comes on its association
SAME_ASSOCIATION_WAIT = 5.0      # seconds to wait for its answer there


class BadRequest(ValueError):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def parse_request(request, information: Dataset | None) -> tuple[str, list[tuple[str, str]]]:
    """(Transaction UID, [(SOP Class UID, SOP Instance UID)]) of an N-ACTION request, or BadRequest."""
    if int(request.ActionTypeID or 0) != 1:
        raise BadRequest(NO_SUCH_ACTION, f"Action Type ID {request.ActionTypeID} (only 1, Request Storage Commitment)")
    if str(request.RequestedSOPInstanceUID or "") != StorageCommitmentPushModelInstance:
        raise BadRequest(NO_SUCH_SOP_INSTANCE, "the Requested SOP Instance UID is not the well-known "
                                               "Storage Commitment Push Model SOP Instance")
    if information is None:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "no Action Information")
    transaction = str(information.get("TransactionUID", "") or "").strip()
    if not checks.valid_uid(transaction):
        raise BadRequest(INVALID_ARGUMENT_VALUE, "the Transaction UID is missing or not a valid UID")
    refs = []
    for item in information.get("ReferencedSOPSequence", None) or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_uid:
            raise BadRequest(INVALID_ARGUMENT_VALUE, "a Referenced SOP Sequence item lacks a UID")
        refs.append((sop_class[:64], sop_uid[:64]))
    if not refs:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "the Referenced SOP Sequence is missing or empty")
    return transaction, refs


class Commitments:
    def __init__(self, cfg: Config, index: Index, storage: Storage):
        self.cfg, self.index, self.storage = cfg, index, storage
        self._associations: dict[str, object] = {}     # transaction UID -> the requesting association
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="nncodec-commitment", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def request(self, assoc, calling_ae: str, transaction_uid: str, refs: list[tuple[str, str]]) -> None:
        """Record a request durably (before the N-ACTION response) and wake the worker."""
        self.index.add_commitment(transaction_uid, calling_ae, [list(r) for r in refs])
        with self._lock:
            self._associations[transaction_uid] = assoc
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                with isolation.contained("handling storage commitment requests"):
                    for c in self.index.due_commitments():
                        if self._stopping.is_set():
                            break
                        self._handle(c)
            except Exception:
                log.exception("storage commitment worker error")
            self._wake.wait(min(self.cfg.commitment_retry_seconds, 5.0))
            self._wake.clear()

    # --- one request --------------------------------------------------------------------------------

    def _handle(self, c) -> None:
        ds, failed = self.report(c.transaction_uid, c.references)
        event = FAILURES_EVENT if failed else SUCCESS_EVENT
        how = self._deliver(c, ds, event)
        n = len(c.references)
        if how:
            log.info("storage commitment %s for %s: %d of %d instances committed, report sent on %s",
                     c.transaction_uid, c.calling_ae, n - failed, n, how)
            self.index.commitment_attempted(c.id, "delivered")
            with self._lock:
                self._associations.pop(c.transaction_uid, None)
            return
        age = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) - c.requested_at
        if self.cfg.peer_by_ae(c.calling_ae) is None or age.total_seconds() > self.cfg.commitment_give_up_hours * 3600:
            log.warning("storage commitment %s for %s given up: the report could not be delivered%s",
                        c.transaction_uid, c.calling_ae, "" if self.cfg.peer_by_ae(c.calling_ae) else
                        f" ({c.calling_ae} is not listed under peers, and its association is gone)")
            self.index.commitment_attempted(c.id, "given_up")
            with self._lock:
                self._associations.pop(c.transaction_uid, None)
            return
        retry = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(
            seconds=self.cfg.commitment_retry_seconds)
        self.index.commitment_attempted(c.id, PENDING, retry)

    def report(self, transaction_uid: str, refs) -> tuple[Dataset, int]:
        """The N-EVENT-REPORT's Event Information, and how many instances failed."""
        ds = Dataset()
        ds.TransactionUID = transaction_uid
        ds.RetrieveAETitle = self.cfg.ae_title
        ok, failed = [], []
        for sop_class, sop_uid in refs:
            reason = self.evaluate(sop_class, sop_uid)
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
            if reason:
                item.FailureReason = reason
                failed.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if failed:
            ds.FailedSOPSequence = failed
        return ds, len(failed)

    def evaluate(self, sop_class: str, sop_uid: str) -> int:
        """0 when ``sop_uid`` is safely kept here, else the Failure Reason (the cause is logged)."""
        for attempt in range(2):          # the compressor may switch the file just while it is looked at
            reason, why = self._evaluate(sop_class, sop_uid)
            if not reason or why != "missing":
                break
        if reason:
            log.info("storage commitment for %s refused (0x%04X): %s", sop_uid, reason, why)
        return reason

    def _evaluate(self, sop_class: str, sop_uid: str) -> tuple[int, str]:
        kept, replaced = self.index.kept(sop_uid)
        if kept is None:
            if replaced:
                return PROCESSING_FAILURE, "replaced by a lossy derivative: the original is not kept"
            return NO_SUCH_OBJECT_INSTANCE, "not stored here"
        if kept.sop_class_uid != sop_class:
            return CLASS_INSTANCE_CONFLICT, f"stored as SOP class {kept.sop_class_uid}"
        if not self.cfg.fsync:
            return PROCESSING_FAILURE, "storage.fsync is off: not stored durably"
        if kept.state == PENDING:
            decision = R.decide(self.cfg.rules, R.Facts(kept.modality, kept.sop_class_uid, kept.calling_ae,
                                                        kept.bits_stored, kept.photometric,
                                                        kept.received_transfer_syntax, kept.body_part),
                                self.cfg.lossy_ceilings)
            if decision.lossy:
                return PROCESSING_FAILURE, f"rule {decision.rule!r} will replace it by a lossy derivative"
        try:
            path = self.storage.abspath(kept.path)
            if os.path.getsize(path) != kept.stored_bytes:
                return PROCESSING_FAILURE, "the stored file does not have the size recorded"
            private = dicom_nncodec.syntax.registered(kept.transfer_syntax) is not None
            received_as_is = kept.transfer_syntax == kept.received_transfer_syntax
            with isolation.contained(f"reading stored {sop_uid}"):
                ds = dcmread(path, stop_before_pixels=not (private and (received_as_is or kept.state != COMPRESSED)))
            if str(ds.SOPInstanceUID) != sop_uid:
                return PROCESSING_FAILURE, "the stored file holds another SOP Instance UID"
        except FileNotFoundError:
            return PROCESSING_FAILURE, "missing"
        except Exception as exc:
            return PROCESSING_FAILURE, f"the stored file cannot be read ({type(exc).__name__})"
        if "PixelData" in ds and private:
            try:            # not verified by this node's own compressor: decode every frame, check its CRC
                with isolation.contained(f"decoding stored {sop_uid}"):
                    dicom_nncodec.dataset.verify(ds, device=self.cfg.device, batch_size=self.cfg.batch_size)
            except Exception as exc:
                return PROCESSING_FAILURE, f"its frames do not decode ({exc})"
        return 0, ""

    # --- delivery -----------------------------------------------------------------------------------

    def _on_same(self, c, assoc, ds: Dataset, event: int) -> bool:
        """Send the report on the requesting association, if the requestor is still on it and answers.

        A requestor that releases right after the N-ACTION response ignores a report that crosses its
        A-RELEASE-RQ (PS3.7 allows no DIMSE after it), and pynetdicom would wait the whole DIMSE timeout
        for the answer: so wait briefly first, send only to one still listening, and give up on the
        answer after a few seconds or as soon as a release comes in."""
        deadline = time.monotonic() + SAME_ASSOCIATION_GRACE
        while time.monotonic() < deadline:
            if not assoc.is_established or assoc.acse.is_release_requested():
                return False
            time.sleep(0.05)
        saved = assoc.dimse_timeout
        assoc.dimse_timeout = min(saved or SAME_ASSOCIATION_WAIT, SAME_ASSOCIATION_WAIT)
        done = threading.Event()

        def end_wait_on_release():
            while not done.wait(0.05):
                if assoc.acse.is_release_requested() or not assoc.is_established:
                    assoc.dimse.msg_queue.put((None, None))      # no answer will come: stop waiting now
                    return
        threading.Thread(target=end_wait_on_release, daemon=True).start()
        try:
            status, _ = assoc.send_n_event_report(ds, event, StorageCommitmentPushModel,
                                                  StorageCommitmentPushModelInstance)
        except Exception as exc:
            log.info("storage commitment %s: cannot report on the requesting association (%s)", c.transaction_uid, exc)
            return False
        finally:
            done.set()
            assoc.dimse_timeout = saved
        if status.get("Status") == 0:
            return True
        log.info("storage commitment %s: no answer to the report on the requesting association", c.transaction_uid)
        return False

    def _deliver(self, c, ds: Dataset, event: int) -> str:
        """Where the report went ("the same association", "a new association") or "" when it did not."""
        with self._lock:
            assoc = self._associations.get(c.transaction_uid)
        if self.cfg.commitment_same_association and assoc is not None and self._on_same(c, assoc, ds, event):
            return "the same association"
        peer = self.cfg.peer_by_ae(c.calling_ae)
        if peer is None:
            return ""
        ae = AE(ae_title=self.cfg.ae_title)
        ae.implementation_class_uid = dicom_nncodec.IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = dicom_nncodec.IMPLEMENTATION_VERSION_NAME
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, name, getattr(self.cfg, name))
        ae.add_requested_context(StorageCommitmentPushModel)
        try:
            out = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                               ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)], **tls_args(self.cfg, peer))
        except Exception as exc:
            log.warning("storage commitment %s: cannot reach %s (%s)", c.transaction_uid, peer.ae_title, exc)
            return ""
        if not out.is_established:
            log.warning("storage commitment %s: %s@%s:%d did not accept the association for the report",
                        c.transaction_uid, peer.ae_title, peer.host, peer.port)
            return ""
        try:
            status, _ = out.send_n_event_report(ds, event, StorageCommitmentPushModel,
                                                StorageCommitmentPushModelInstance)
            return "a new association" if status.get("Status") == 0 else ""
        except Exception as exc:
            log.warning("storage commitment %s: the report to %s failed (%s)", c.transaction_uid, peer.ae_title, exc)
            return ""
        finally:
            if out.is_established:
                out.release()

