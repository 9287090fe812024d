"""C-GET and C-MOVE with transcoding to each target, over real associations; exact counts and failures."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         HTJ2KLossless, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless,
                         generate_uid)
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelGet as PATIENT_GET,
                                  StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
                                  StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE)

import dicom_nncodec
from dicom_nncodec import NNCodecLossless
from dicom_nncodec.syntax import JPEGXLLossless
from scp.index import Instance
from scp.testing import StorageSCP, failed_uids, get, move, running_node, send

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")

STUDY = generate_uid()


def read(name):
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.PatientID = STUDY, "P1"
    return ds


ORIGINALS = [read("CT_small.dcm"), read("emri_small.dcm"), read("SC_rgb.dcm")]
SOP_CLASSES = sorted({ds.SOPClassUID for ds in ORIGINALS})
BY_UID = {ds.SOPInstanceUID: ds for ds in ORIGINALS}


def study_query(level="STUDY", **keys):
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.StudyInstanceUID = STUDY
    for k, v in keys.items():
        setattr(q, k, v)
    return q


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with StorageSCP("ANYTS") as anyts:
        peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1},
                 {"ae_title": "ANYTS", "host": "127.0.0.1", "port": anyts.port}]
        syntaxes = ["NNCodecLossless", "NNCodecLossy", "JPEGLSLossless", "JPEG2000Lossless", "ExplicitVRLittleEndian",
                    "ImplicitVRLittleEndian", "RLELossless", "DeflatedExplicitVRLittleEndian", "JPEGXLLossless",
                    "HTJ2KLossless"]
        with running_node(tmp_path_factory.mktemp("r"), peers=peers, retrieve={"transfer_syntaxes": syntaxes}) as n:
            assert send(n.port, ORIGINALS) == [0, 0, 0]
            assert n.compressor.wait_idle(120)
            n.anyts = anyts
            yield n


def stored_pixel_data(node):
    with node.index.session() as s:
        return {i.sop_uid: dcmread(node.storage.abspath(i.path)).PixelData for i in s.query(Instance)}


def check_received(received, target):
    assert sorted(ds.SOPInstanceUID for _, ds in received) == sorted(BY_UID)
    for ts, ds in received:
        assert ts == target
        assert np.array_equal(ds.pixel_array, BY_UID[ds.SOPInstanceUID].pixel_array)


def test_get_in_the_stored_syntax_sends_the_stored_bytes(node):
    final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES, [NNCodecLossless, ExplicitVRLittleEndian])
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 0 and final.NumberOfWarningSuboperations == 0
    check_received(received, str(NNCodecLossless))
    stored = stored_pixel_data(node)
    assert all(ds.PixelData == stored[ds.SOPInstanceUID] for _, ds in received)


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEG2000Lossless, RLELossless, ExplicitVRLittleEndian,
                                    ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGXLLossless,
                                    HTJ2KLossless])
def test_get_transcodes_to_each_target_bit_exactly(node, target):
    final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES, [target])
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 3, 0)
    check_received(received, target)


def test_get_prefers_the_configured_order_among_accepted_syntaxes(node):
    final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES,
                          [ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless])
    assert final.Status == 0
    check_received(received, JPEGLSLossless)      # JPEG-LS comes first in the default preference


def test_patient_root_get_at_series_level(node):
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.PatientID, q.StudyInstanceUID, q.SeriesInstanceUID = "P1", STUDY, ORIGINALS[0].SeriesInstanceUID
    final, received = get(node.port, q, PATIENT_GET, SOP_CLASSES, [ExplicitVRLittleEndian])
    assert final.Status == 0 and [ds.SOPInstanceUID for _, ds in received] == [ORIGINALS[0].SOPInstanceUID]


def test_get_to_a_receiver_accepting_nothing_producible_fails_every_sub_operation(node):
    final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES, [ExplicitVRBigEndian])
    assert received == []
    assert final.Status == 0xA702
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 3)
    assert sorted(failed_uids(final)) == sorted(BY_UID)
    assert node.index.stats()["recent_failures"][0].stage == "retrieve"


def test_get_without_the_unique_key_is_refused(node):
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "P1"
    final, received = get(node.port, q, STUDY_GET, SOP_CLASSES, [ExplicitVRLittleEndian])
    assert final.Status == 0xA900 and received == []


@pytest.mark.parametrize("syntaxes, expected", [
    ([NNCodecLossless, ExplicitVRLittleEndian], NNCodecLossless),
    ([ImplicitVRLittleEndian], ImplicitVRLittleEndian),
    ([JPEG2000Lossless], JPEG2000Lossless),
])
def test_move_proposes_what_it_can_produce_and_sends_the_best_accepted(node, syntaxes, expected):
    with StorageSCP("DEST", syntaxes) as dest:
        # peers are fixed at start, so each destination gets a node of its own
        with running_node(node.storage.root + "-move-" + str(expected)[-6:], peers=[
                {"ae_title": "SCU", "host": "127.0.0.1", "port": 1},
                {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}]) as other:
            assert send(other.port, ORIGINALS) == [0, 0, 0]
            assert other.compressor.wait_idle(120)
            final = move(other.port, study_query(), "DEST", STUDY_MOVE)
        assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 3, 0)
        check_received(dest.received, expected)


def test_move_to_a_receiver_accepting_anything(node):
    node.anyts.received.clear()
    final = move(node.port, study_query(), "ANYTS", STUDY_MOVE)
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 3)
    assert sorted(ds.SOPInstanceUID for _, ds in node.anyts.received) == sorted(BY_UID)


def test_move_to_an_unknown_destination_is_refused(node):
    final = move(node.port, study_query(), "NOWHERE", STUDY_MOVE)
    assert final.Status == 0xA801


def test_a_corrupt_stored_instance_fails_alone_and_is_named(tmp_path):
    with StorageSCP("DEST", [ExplicitVRLittleEndian]) as dest:
        peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1},
                 {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}]
        with running_node(tmp_path / "s", peers=peers) as node:
            assert send(node.port, ORIGINALS) == [0, 0, 0]
            assert node.compressor.wait_idle(120)
            victim = ORIGINALS[0].SOPInstanceUID
            with node.index.session() as s:
                path = node.storage.abspath(s.query(Instance).filter_by(sop_uid=victim).one().path)
            ds = dcmread(path)
            frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
            frame[-20] ^= 0xFF
            ds.PixelData = encapsulate([bytes(frame)])
            ds["PixelData"].is_undefined_length = True
            dicom_nncodec.fix_transfer_syntax(ds)
            ds.save_as(path, enforce_file_format=True)
            final = move(node.port, study_query(), "DEST", STUDY_MOVE)
            assert final.Status == 0xB000
            assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
            assert failed_uids(final) == [victim]
            failure = node.index.stats()["recent_failures"][0]
            assert failure.sop_uid == victim and "C-MOVE to DEST" in failure.reason
        assert sorted(ds.SOPInstanceUID for _, ds in dest.received) == sorted(set(BY_UID) - {victim})


def test_get_picks_a_producible_syntax_when_the_requestor_offers_several_in_one_context(node):
    from pydicom.uid import HTJ2KLossless, JPEGLosslessSV1
    final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES,
                          [JPEGLosslessSV1, HTJ2KLossless, ExplicitVRLittleEndian])
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 3)
    check_received(received, ExplicitVRLittleEndian)


def _items(node):
    from scp.retrieve import Item
    with node.index.session() as s:
        return [Item(i.sop_uid, i.sop_class_uid, i.path, i.transfer_syntax) for i in s.query(Instance)]


def test_sub_operations_decode_ahead_in_parallel_and_keep_the_order(node):
    """The stored (compressed) instances are transcoded by a pool while earlier ones are sent: the
    first dataset is handed out while a later one is still being prepared, on another thread."""
    import threading
    import time
    items = _items(node) * 2
    retrieval, real_prepare = node.services.retrieval, node.services.retrieval.prepare
    first_sent = threading.Event()
    threads, prepared_before_first_sent = set(), []

    def prepare(item, accepted, service, peer):
        threads.add(threading.current_thread().name)
        if item is items[-1]:
            # the last instance cannot finish before the first has been handed to pynetdicom
            assert first_sent.wait(60)
        prepared_before_first_sent.append(first_sent.is_set())
        return real_prepare(item, accepted, service, peer)

    retrieval.prepare = prepare
    try:
        out = []
        for status, ds in retrieval.sub_operations(items, lambda sc: {ExplicitVRLittleEndian}, lambda: False,
                                                  "C-GET", "TEST", workers=2):
            assert status == 0xFF00
            out.append(ds)
            if not first_sent.is_set():
                # the instances behind the first are prepared while it waits to be sent
                deadline = time.monotonic() + 60
                while len(prepared_before_first_sent) < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                first_sent.set()
    finally:
        del retrieval.prepare
    assert [ds.SOPInstanceUID for ds in out] == [it.sop_uid for it in items]
    for ds in out:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, BY_UID[ds.SOPInstanceUID].pixel_array)
    assert len(threads) == 2 and all(t.startswith("nncodec-retrieve") for t in threads)
    assert prepared_before_first_sent[:3] == [False, False, False]


def test_sub_operations_stop_at_cancel_without_sending_the_rest(node):
    items = _items(node) * 3
    seen = []
    ops = node.services.retrieval.sub_operations(items, lambda sc: {ExplicitVRLittleEndian},
                                                 lambda: len(seen) >= 2, "C-GET", "TEST", workers=2)
    for status, ds in ops:
        seen.append((status, ds))
    assert [s for s, _ in seen] == [0xFF00, 0xFF00, 0xFE00] and seen[-1][1] is None


def test_jpeg2000_transcoding_in_parallel_threads_does_not_crash(node):
    """pydicom's JPEG 2000 encoder is not thread-safe; retrieval transcodes in parallel. Run in a child
    process so that a crash fails this test instead of ending the test session."""
    import subprocess
    import sys
    code = """
import copy, threading
import dicom_nncodec
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless
from scp import transcode
src = dcmread(get_testdata_file("CT_small.dcm"))
def work():
    for _ in range(60):
        out = transcode.encode_as(src, JPEG2000Lossless)
        assert out.file_meta.TransferSyntaxUID == JPEG2000Lossless
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
