"""Hostile input (issue 14): nothing a peer sends ends a thread, stalls the compression queue, goes
unanswered, or is acknowledged and then returned changed.

- A native decoder's panic (PyO3's ``PanicException`` derives from ``BaseException``) is contained at
  every boundary where outside data is decoded: ingest, the compressor (the job fails, the queue moves
  on), retrieval (the sub-operation fails), storage commitment and fsck.  A genuine one comes from
  pylibjpeg-rle on an RLE frame whose first segment decodes past the image; elsewhere a decode
  function is made to raise ``FakePanic(BaseException)``.
- A compression worker thread that ends anyway is replaced by the watchdog, and ``status`` says so.
- A C-STORE request with an empty Affected SOP Instance UID, or naming a class that is not a storage
  class, gets a C-STORE response with a failure status (never silence, never a C-ECHO response).
- Native Pixel Data longer than its description is kept exactly as received: never compressed,
  returned bit-exact, never transcoded (which would drop the surplus).
"""
from __future__ import annotations

import io
import logging
import struct
import threading
import time
from io import BytesIO

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import (CTImageStorage, SecondaryCaptureImageStorage,
                                  StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
                                  StudyRootQueryRetrieveInformationModelGet as STUDY_GET, Verification)

import dicom_nncodec
from scp import checks, fsck, isolation, status
from scp.index import COMPRESSED, FAILED, KEPT, Instance
from scp.testing import CommitmentSCU, encoded, exchange, get, running_node, send, send_raw, wait_until
from tests.imaging import make_dataset, smooth_image

OK, NOT_SUPPORTED, C000 = 0x0000, 0x0122, 0xC000
PEERS = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]


class FakePanic(BaseException):
    """What ``pyo3_runtime.PanicException`` is to Python: a BaseException that is not an Exception."""


def image(rows=32, cols=32, seed=0) -> Dataset:
    ds = make_dataset(smooth_image(rows, cols, 12, seed=seed)[None], 16, 12)
    ds.PatientID = "HOSTILE"
    return ds


def rle_segment(n: int, value: int = 7) -> bytes:
    """An RLE segment (PS3.5 G.3.1) of replicate runs decoding to ``n`` bytes of ``value``."""
    out = b""
    while n > 0:
        k = min(128, n)
        out += bytes([257 - k, value]) if k > 1 else bytes([0, value])
        n -= k
    return out


def panicking_rle(ds: Dataset) -> Dataset:
    """``ds`` in RLE Lossless with one frame whose first segment decodes to two bytes more than the image
    has: pylibjpeg-rle 2.x panics on it (``index out of bounds: the len is ... but the index is ...``).
    Structurally it is a valid encapsulation: ingest accepts it (no pixels are decoded there)."""
    n = int(ds.Rows) * int(ds.Columns)
    segments = [rle_segment(n + 2)] + [rle_segment(n)] * (int(ds.BitsAllocated) // 8 - 1)
    offsets, pos = [], 64
    for seg in segments:
        offsets.append(pos)
        pos += len(seg)
    frame = struct.pack("<16L", len(segments), *offsets, *([0] * (15 - len(segments)))) + b"".join(segments)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def test_the_malformed_rle_frame_really_panics():
    """(What the tests below rely on: this frame makes the RLE decoder raise a BaseException.)"""
    import pydicom.pixels
    with pytest.raises(BaseException) as info:
        pydicom.pixels.pixel_array(panicking_rle(image()), raw=True)
    assert isolation.is_panic(info.value), type(info.value).__mro__


def row(node, uid) -> Instance:
    with node.index.session() as s:
        return s.query(Instance).filter_by(sop_uid=uid).one()


def study(uid) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


# --- 1. panics are contained ---------------------------------------------------------------------------

def test_a_panicking_decoder_fails_its_compression_job_and_the_queue_goes_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, "scp")
    bad, good = panicking_rle(image(seed=1)), image(seed=2)
    with running_node(tmp_path / "s", compression={"workers": 1}) as node:
        assert send(node.port, [bad, good]) == [OK, OK]        # stored as received: not decoded at ingest
        assert node.compressor.wait_idle(120), "the compression queue stalled"
        failed = row(node, bad.SOPInstanceUID)
        assert failed.state == FAILED and "panicked" in failed.state_reason, failed.state_reason
        assert row(node, good.SOPInstanceUID).state == COMPRESSED
        assert node.compressor.alive == 1 and node.compressor.restarts == 0
        assert send(node.port, [image(seed=3)]) == [OK]
        assert node.compressor.wait_idle(120)
        text = status.report_for(node.cfg)
    assert "watchdog no compression worker restarts" in text
    messages = [r.getMessage() for r in caplog.records]
    assert any("panicked while compressing" in m and bad.SOPInstanceUID in m for m in messages)


def test_a_panic_outside_the_decode_also_fails_only_that_job(tmp_path, monkeypatch):
    """Writing the compressed result panics: the worker records the job as failed and goes on."""
    save = dicom_nncodec.dataset.save
    first, second = image(seed=4), image(seed=5)

    def panicking_save(ds, f):
        if ds.SOPInstanceUID == first.SOPInstanceUID:
            raise FakePanic("while writing")
        return save(ds, f)
    monkeypatch.setattr(dicom_nncodec.dataset, "save", panicking_save)
    with running_node(tmp_path / "s", compression={"workers": 1}) as node:
        assert send(node.port, [first, second]) == [OK, OK]
        assert node.compressor.wait_idle(120), "the compression queue stalled"
        assert row(node, first.SOPInstanceUID).state == FAILED
        assert "FakePanic" in row(node, first.SOPInstanceUID).state_reason
        assert row(node, second.SOPInstanceUID).state == COMPRESSED
        assert node.compressor.alive == 1 and node.compressor.restarts == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_replaces_a_worker_that_ended_and_status_shows_it(tmp_path, caplog):
    first, second = image(seed=6), image(seed=7)
    with running_node(tmp_path / "s", compression={"workers": 1}) as node:
        process = node.compressor.process

        def ending_process(job):
            if job.sop_uid == first.SOPInstanceUID:
                raise SystemExit          # never contained: it ends the thread
            return process(job)
        node.compressor.process = ending_process
        assert send(node.port, [first, second]) == [OK, OK]
        wait_until(lambda: node.compressor.restarts == 1, 30, "the watchdog to restart the worker")
        assert node.compressor.wait_idle(120), "the compression queue stalled"
        assert node.compressor.alive == 1
        assert row(node, first.SOPInstanceUID).state == FAILED
        assert "died" in row(node, first.SOPInstanceUID).state_reason
        assert row(node, second.SOPInstanceUID).state == COMPRESSED
        text = status.report_for(node.cfg)
    assert "watchdog 1 compression worker restarts, the last at " in text
    assert "nncodec-compress-0 died" in text
    assert any("the watchdog started another" in r.getMessage() for r in caplog.records)


def test_a_panic_while_checking_a_c_store_is_a_refusal_and_the_association_goes_on(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "scp")
    bad, good = image(seed=8), image(seed=9)
    check = checks.check_pixel_data

    def panicking_check(ds, ts, max_pixels):
        if ds.SOPInstanceUID == bad.SOPInstanceUID:
            raise FakePanic("index out of bounds")
        return check(ds, ts, max_pixels)
    monkeypatch.setattr(checks, "check_pixel_data", panicking_check)
    with running_node(tmp_path / "s", compression={"workers": 0}, limits={"dimse_timeout": 10}) as node:
        assert send(node.port, [bad, good]) == [C000, OK]
        assert node.index.stats()["instances"] == 1
    refusals = [r.getMessage() for r in caplog.records if "refused (0xC000)" in r.getMessage()]
    assert len(refusals) == 1 and "panicked while checking the received data set" in refusals[0]


def test_a_panicking_decoder_fails_a_retrieval_sub_operation_not_the_association(tmp_path):
    bad, good = panicking_rle(image(seed=10)), image(seed=11)
    bad.StudyInstanceUID = good.StudyInstanceUID
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 0},
                      limits={"dimse_timeout": 10}) as node:
        assert send(node.port, [bad, good]) == [OK, OK]
        # the receiver takes only Explicit VR Little Endian: the RLE instance must be decoded to be sent
        final, received = get(node.port, study(good.StudyInstanceUID), STUDY_GET, [SecondaryCaptureImageStorage],
                              [ExplicitVRLittleEndian])
        assert final is not None and final.Status == 0xB000        # sub-operations complete, one failed
        assert [str(ds.SOPInstanceUID) for _, ds in received] == [good.SOPInstanceUID]
        assert bad.SOPInstanceUID in str(final.get("FailedSOPInstanceUIDList", ""))
        stats = node.index.stats()
    assert any(stage == "retrieve" and "panicked" in reason for _, stage, _, reason in stats["recent_failures"])


def private_image(seed: int) -> Dataset:
    ds = image(seed=seed)
    dicom_nncodec.compress(ds, device="cpu")              # arrives in the private syntax: decoded to check it
    return ds


def panicking_decode(*args, **kwargs):
    raise FakePanic("index out of bounds")


def test_a_panicking_decoder_is_a_failed_storage_commitment(tmp_path, monkeypatch):
    ds = private_image(12)
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [OK]            # (decoded once at ingest, before the decoder breaks)
        monkeypatch.setattr(dicom_nncodec.codec, "decode_frames", panicking_decode)
        scu = CommitmentSCU()
        code, _ = scu.ask(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID)], wait=30)
        assert code == 0 and len(scu.reports) == 1, "no storage commitment report"
        event, info, _ = scu.reports[0]
        assert event == 2 and [int(i.FailureReason) for i in info.FailedSOPSequence] == [0x0110]
        assert node.commitments._thread.is_alive()


def test_a_panicking_decoder_is_a_corrupt_file_in_fsck(tmp_path, monkeypatch):
    ds = private_image(13)
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [OK]
        cfg = node.cfg
    monkeypatch.setattr(dicom_nncodec.codec, "decode_frames", panicking_decode)
    out = io.StringIO()
    assert fsck.check(cfg, False, out) == 1
    text = out.getvalue()
    assert "corrupt" in text and "panicked" in text and ds.SOPInstanceUID in text, text


# --- 2. every C-STORE request gets a C-STORE response ----------------------------------------------------

def store_request(sop_class, sop_uid, data: bytes, message_id: int = 1) -> C_STORE:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req._affected_sop_instance_uid = None if sop_uid is None else UID(sop_uid)   # (no validation: as sent)
    req.Priority = 2
    req.DataSet = BytesIO(data)
    return req


@pytest.fixture
def association(tmp_path):
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 0}) as node:
        ae = AE(ae_title="SCU")
        ae.dimse_timeout = 10
        for cx in (CTImageStorage, Verification, STUDY_FIND):
            ae.add_requested_context(cx, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="NNCODEC")
        assert assoc.is_established
        contexts = {str(cx.abstract_syntax): cx.context_id for cx in assoc.accepted_contexts}
        try:
            yield node, assoc, contexts
        finally:
            if assoc.is_established:
                assoc.release()


def ct() -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


@pytest.mark.parametrize("uid", ["", "   ", None])
def test_an_empty_or_blank_affected_sop_instance_uid_gets_a_failure_response(association, uid, caplog):
    node, assoc, cx = association
    ds = ct()
    rsp = exchange(assoc, store_request(CTImageStorage, uid, encoded(ds), message_id=7), cx[CTImageStorage])
    assert isinstance(rsp, C_STORE), "no C-STORE response"
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (7, C000)
    assert any("refused (0xC000)" in r.getMessage() and "Affected SOP Instance UID" in r.getMessage()
               for r in caplog.records)
    assert assoc.send_c_store(ds).Status == OK                # the association goes on
    assert node.index.stats()["instances"] == 1


@pytest.mark.parametrize("sop_class, context", [
    (Verification, Verification),          # pynetdicom would answer it with a C-ECHO response
    (Verification, CTImageStorage),
    (STUDY_FIND, STUDY_FIND),              # pynetdicom would abort the association
    (CTImageStorage, Verification),        # a storage class on a context of another abstract syntax
])
def test_a_c_store_that_names_no_storage_class_gets_a_c_store_failure(association, sop_class, context):
    node, assoc, cx = association
    ds = ct()
    rsp = exchange(assoc, store_request(sop_class, ds.SOPInstanceUID, encoded(ds), message_id=9), cx[context])
    assert isinstance(rsp, C_STORE) and not isinstance(rsp, C_ECHO), type(rsp).__name__
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (9, NOT_SUPPORTED)
    assert assoc.is_established and assoc.send_c_echo().Status == OK
    assert node.index.stats()["instances"] == 0


# --- 4. Pixel Data longer than its description ---------------------------------------------------------

def with_surplus(ds: Dataset, extra: bytes) -> Dataset:
    ds.PixelData = ds.PixelData + extra
    return ds


def test_pixel_data_longer_than_its_description_is_kept_and_returned_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO, "scp")
    surplus = with_surplus(image(seed=15), b"\x01\x02")                   # 2,048 + 2 bytes
    odd = make_dataset(smooth_image(5, 5, 8, seed=16)[None], 8, 8)         # 25 bytes: one pad byte is allowed
    odd.PixelData = odd.PixelData + b"\x00"
    odd.StudyInstanceUID = surplus.StudyInstanceUID
    sent = bytes(surplus.PixelData)
    retrieve = {"transfer_syntaxes": ["RLELossless", "ExplicitVRLittleEndian"]}
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 1}, retrieve=retrieve) as node:
        assert send(node.port, [surplus, odd]) == [OK, OK]
        assert node.compressor.wait_idle(120)
        kept = row(node, surplus.SOPInstanceUID)
        assert kept.state == KEPT and "2 bytes more than its description" in kept.state_reason
        assert kept.transfer_syntax == ExplicitVRLittleEndian
        assert dcmread(node.storage.abspath(kept.path)).PixelData == sent
        assert row(node, odd.SOPInstanceUID).state == COMPRESSED          # (the pad byte is no surplus)
        # queued again (as fsck --repair may do): the compressor keeps it too
        node.index.requeue(kept.id)
        node.compressor.wake()
        assert node.compressor.wait_idle(60)
        again = row(node, surplus.SOPInstanceUID)
        assert again.state == KEPT and again.path == kept.path and "2 bytes more" in again.state_reason
        # a receiver of the stored syntax gets the bytes as received
        final, received = get(node.port, study(surplus.StudyInstanceUID), STUDY_GET,
                              [SecondaryCaptureImageStorage], [ExplicitVRLittleEndian])
        by_uid = {str(ds.SOPInstanceUID): ds for _, ds in received}
        assert final.Status == OK and by_uid[surplus.SOPInstanceUID].PixelData == sent
        # one that takes only RLE would get the described pixels without the surplus: not sent at all
        final, received = get(node.port, study(surplus.StudyInstanceUID), STUDY_GET,
                              [SecondaryCaptureImageStorage], [RLELossless])
        assert [str(ds.SOPInstanceUID) for _, ds in received] == [odd.SOPInstanceUID]
        assert surplus.SOPInstanceUID in str(final.get("FailedSOPInstanceUIDList", ""))
    assert any("2 bytes more than its description" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
