"""Two nodes: A C-MOVEs both studies to B, which accepts the private transfer syntax.

The compressed bytes must pass through as they are: A proposes the private syntax first, B accepts it,
A sends its stored encapsulated Pixel Data without decoding (checked by watching A's transcoder),
and B stores it as received (already compressed: nothing queued).  The fragments on both sides are
identical and decode to the pixels that were sent.

Both nodes run in this process (scp.testing) so that A's transcoder can be watched; the C-MOVE is
requested by a pynetdicom SCU, so this module needs no external tool.
"""
from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE

import dicom_nncodec
from scp import transcode
from scp.testing import move, running_node, send

pytestmark = pytest.mark.interop

PRIVATE = str(dicom_nncodec.NNCodecLossless)


def rows(node):
    from scp.index import Instance
    with node.index.session() as s:
        out = {i.sop_uid: i for i in s.query(Instance)}
        s.expunge_all()
    return out


def stored(node, row):
    ds = dcmread(node.storage.abspath(row.path))
    dicom_nncodec.fix_transfer_syntax(ds)
    return ds


@pytest.fixture(scope="module")
def moved(sent, tmp_path_factory):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = [dcmread(s.path) for s in sent.instances]
    root = tmp_path_factory.mktemp("two-nodes")
    with running_node(root / "b", ae_title="NODEB") as b:
        peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1},
                 {"ae_title": "NODEB", "host": "127.0.0.1", "port": b.port}]
        with running_node(root / "a", peers=peers) as a:
            assert send(a.port, datasets) == [0] * len(datasets)
            assert a.compressor.wait_idle(180)
            calls = []
            real_decoded, real_encode = transcode.decoded, transcode.encode_as
            mp = pytest.MonkeyPatch()
            mp.setattr(transcode, "decoded", lambda *a_, **k: calls.append("decoded") or real_decoded(*a_, **k))
            mp.setattr(transcode, "encode_as", lambda *a_, **k: calls.append("encode_as") or real_encode(*a_, **k))
            try:
                q = Dataset()
                q.QueryRetrieveLevel = "STUDY"
                q.StudyInstanceUID = [st["StudyInstanceUID"] for st in sent.studies.values()]
                final = move(a.port, q, "NODEB", STUDY_MOVE)
            finally:
                mp.undo()
            assert b.compressor.wait_idle(60)
            yield final, calls, a, b, rows(a), rows(b)


def test_the_move_completes(moved, sent):
    final, *_ = moved
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (0, len(sent.instances), 0, 0)


def test_nothing_is_decoded_on_the_way(moved):
    _, calls, *_ = moved
    assert calls == []


def test_the_receiver_stored_the_private_syntax_as_received(moved, sent):
    _, _, a, b, rows_a, rows_b = moved
    assert sorted(rows_b) == sorted(s.sop_uid for s in sent.instances)
    for uid, row in rows_b.items():
        assert (row.received_transfer_syntax, row.transfer_syntax, row.state) == (PRIVATE, PRIVATE, "compressed")
        assert row.calling_ae == a.cfg.ae_title
    assert b.index.queue_length() == 0


def test_the_fragments_are_identical(moved):
    _, _, a, b, rows_a, rows_b = moved
    assert rows_b, "nothing arrived"
    for uid, row in rows_b.items():
        got, had = stored(b, row), stored(a, rows_a[uid])
        assert got.PixelData == had.PixelData
        assert list(generate_fragments(got.PixelData)) == list(generate_fragments(had.PixelData))
        # and the rest of the data set is what A holds, element for element
        assert got == had


def test_the_receiver_decodes_the_pixels_that_were_sent(moved, sent):
    _, _, _, b, _, rows_b = moved
    assert len(rows_b) == len(sent.instances)
    sent.assert_same_pixels(b.storage.abspath(row.path) for row in rows_b.values())
