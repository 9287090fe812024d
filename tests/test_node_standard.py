"""The node with the standard lossless codecs: rule actions jpegxl / htj2k / smallest, the compression
delay (rule ``after``) across a restart, and C-GET / C-MOVE peers that accept only JPEG XL or HTJ2K.
Real associations, real files, a real index."""
from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, generate_uid
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
                                  StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE)
from sqlalchemy import text

import dicom_nncodec
from dicom_nncodec.syntax import JPEGXLLossless
from scp import status
from scp.index import COMPRESSED, PENDING, Index, Instance, QueueItem
from scp.node import Node
from scp.testing import StorageSCP, get, move, node_config, running_node, send, wait_until

STUDY = generate_uid()


def read(name):
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.PatientID = STUDY, "P1"
    return ds


def signed_ct():
    """CT_small (signed 16-bit) moved into Hounsfield-like values: air below zero, padding at -2000."""
    ds = read("CT_small.dcm")
    arr = ds.pixel_array.astype(np.int32) - 1024
    arr[:6] = -2000
    ds.PixelData = arr.astype("<i2").tobytes()
    return ds


# signed 16-bit CT with negative values, 12-bit unsigned multi-frame MR, 8-bit RGB
ORIGINALS = [signed_ct(), read("emri_small.dcm"), read("SC_rgb.dcm")]
BY_UID = {ds.SOPInstanceUID: ds for ds in ORIGINALS}
SOP_CLASSES = sorted({ds.SOPClassUID for ds in ORIGINALS})
PEERS = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]


def rows(node):
    with node.index.session() as s:
        return {i.sop_uid: i for i in s.query(Instance).all()}


def study_query():
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = STUDY
    return q


def check_received(received, target):
    assert sorted(ds.SOPInstanceUID for _, ds in received) == sorted(BY_UID)
    for ts, ds in received:
        assert ts == target
        assert np.array_equal(ds.pixel_array, BY_UID[ds.SOPInstanceUID].pixel_array)


@pytest.mark.parametrize("action, syntax", [("jpegxl", JPEGXLLossless), ("htj2k", HTJ2KLossless)])
def test_standard_action_stores_bit_exact_and_serves_it(tmp_path, action, syntax):
    assert (ORIGINALS[0].pixel_array < 0).any()       # the CT really is signed with negative values
    with running_node(tmp_path / "s", peers=PEERS, compression={"rules": [{"action": action}]}) as node:
        assert send(node.port, ORIGINALS) == [0, 0, 0]
        assert node.compressor.wait_idle(120)
        for uid, row in rows(node).items():
            assert (row.state, row.transfer_syntax) == (COMPRESSED, str(syntax)), row.state_reason
            on_disk = dcmread(node.storage.abspath(row.path))
            assert on_disk.SOPInstanceUID == uid
            assert np.array_equal(on_disk.pixel_array, BY_UID[uid].pixel_array)
            assert row.stored_bytes < row.received_bytes
        # a peer that asks for the stored syntax gets the stored bytes; one that asks for
        # uncompressed gets them decoded
        final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES, [syntax])
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 3)
        check_received(received, str(syntax))
        final, received = get(node.port, study_query(), STUDY_GET, SOP_CLASSES, [ExplicitVRLittleEndian])
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 3)
        check_received(received, str(ExplicitVRLittleEndian))


def test_smallest_keeps_the_smaller_verified_result(tmp_path):
    with running_node(tmp_path / "s", peers=PEERS, compression={"rules": [{"action": "smallest"}]}) as node:
        assert send(node.port, ORIGINALS) == [0, 0, 0]
        assert node.compressor.wait_idle(240)
        for uid, row in rows(node).items():
            assert row.state == COMPRESSED, row.state_reason
            assert row.state_reason.startswith("smallest:")
            candidates = {}
            for target in (dicom_nncodec.NNCodecLossless, JPEGXLLossless):
                ds = read_again(uid)
                if target == JPEGXLLossless:
                    ds.compress(JPEGXLLossless, generate_instance_uid=False)
                else:
                    dicom_nncodec.compress(ds, target, device="cpu")
                candidates[str(target)] = len(ds.PixelData)
            assert row.transfer_syntax == min(candidates, key=candidates.get), (candidates, row.transfer_syntax)
            on_disk = dcmread(node.storage.abspath(row.path))
            assert np.array_equal(on_disk.pixel_array, BY_UID[uid].pixel_array)


def read_again(uid):
    import copy
    return copy.deepcopy(BY_UID[uid])


@pytest.mark.parametrize("syntax", [JPEGXLLossless, HTJ2KLossless])
def test_move_to_a_peer_accepting_only_one_standard_syntax(tmp_path, syntax):
    with StorageSCP("DEST", [syntax]) as dest:
        peers = PEERS + [{"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}]
        # stored in the learned codec's syntax: the node transcodes for the peer
        with running_node(tmp_path / "s", peers=peers,
                          retrieve={"transfer_syntaxes": ["NNCodecLossless", "JPEGXLLossless", "HTJ2KLossless",
                                                          "ExplicitVRLittleEndian"]}) as node:
            assert send(node.port, ORIGINALS) == [0, 0, 0]
            assert node.compressor.wait_idle(120)
            assert {r.transfer_syntax for r in rows(node).values()} == {str(dicom_nncodec.NNCodecLossless)}
            final = move(node.port, study_query(), "DEST", STUDY_MOVE)
        assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 3, 0)
        check_received(dest.received, str(syntax))


def _queue(node):
    with node.index.session() as s:
        return {i.sop_uid: (i.state, i.transfer_syntax, q.due_at)
                for q, i in s.query(QueueItem, Instance).join(Instance, QueueItem.instance_pk == Instance.id)}


def test_compression_delay_survives_a_restart(tmp_path):
    delay = 4
    ds = ORIGINALS[0]
    cfg = node_config(tmp_path / "s", peers=PEERS,
                      compression={"rules": [{"action": "jpegxl", "after": f"{delay}s"}], "poll_seconds": 0.1})
    node = Node(cfg).start()
    try:
        received_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        assert send(node.port, [ds]) == [0]
        (state, ts, due), = _queue(node).values()
        assert (state, ts) == (PENDING, str(ds.file_meta.TransferSyntaxUID))
        assert abs((due - received_at).total_seconds() - delay) < 2
        text = status.report_for(cfg)
        assert "delayed  1 held back" in text and f"{due:%Y-%m-%d %H:%M:%S} UTC" in text
        # until due it is served as received
        final, got = get(node.port, study_query(), STUDY_GET, [ds.SOPClassUID], [JPEGXLLossless, ds.file_meta.TransferSyntaxUID])
        assert final.Status == 0 and got[0][0] == str(ds.file_meta.TransferSyntaxUID)
        assert node.compressor.wait_idle(5)         # nothing due: the workers are idle, the item waits
    finally:
        node.stop()
    # restarted without the delay in the rules: the due time set at receipt still holds
    cfg2 = node_config(tmp_path / "s", peers=PEERS, compression={"rules": [{"action": "jpegxl"}], "poll_seconds": 0.1})
    node = Node(cfg2).start()
    try:
        assert [q[2] for q in _queue(node).values()] == [due]
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        if now < due - dt.timedelta(seconds=0.5):
            time.sleep(0.5)
            assert rows(node)[ds.SOPInstanceUID].state == PENDING      # not before its time
        wait_until(lambda: rows(node)[ds.SOPInstanceUID].state == COMPRESSED, 60, "the delayed compression")
        done = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        assert done >= due
        row = rows(node)[ds.SOPInstanceUID]
        assert row.transfer_syntax == str(JPEGXLLossless)
        assert np.array_equal(dcmread(node.storage.abspath(row.path)).pixel_array, ds.pixel_array)
        assert "none held back" in status.report_for(cfg2)
    finally:
        node.stop()


def test_an_index_without_the_due_column_is_upgraded(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    idx = Index(url)
    idx.create()
    with idx.engine.begin() as conn:      # an index as the version before the compression delay wrote it
        conn.execute(text("DROP INDEX ix_compression_queue_due_at"))
        conn.execute(text("ALTER TABLE compression_queue DROP COLUMN due_at"))
    idx.dispose()
    idx = Index(url)
    idx.create()
    assert idx.queue_length(due_only=True) == 0 and idx.stats()["delayed"] == 0
    idx.dispose()
