"""Verification and Storage over real associations: ingest that loses nothing, access, duplicates."""
from __future__ import annotations

import os

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from scp.index import Instance, NOT_IMAGE, PENDING
from scp.testing import running_node, send

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")

FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "MR_small_jpeg_ls_lossless.dcm",
         "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm",
         "image_dfl.dcm", "MR_small_bigendian.dcm", "JPEGLSNearLossless_08.dcm"]


def read(name, new_uid=True):
    """A test file with its own SOP Instance UID (several bundled files share one)."""
    ds = dcmread(get_testdata_file(name))
    if new_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):     # a few test files lack them
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    return ds


def instances(node):
    with node.index.session() as s:
        return {i.sop_uid: i for i in s.query(Instance).all()}


def associate(port, calling, *contexts):
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title="NNCODEC")


def test_every_syntax_is_stored_durably_and_indexed_before_success(tmp_path):
    with running_node(tmp_path / "store", compression={"workers": 0}) as node:
        datasets = [read(n) for n in FILES]
        assert send(node.port, datasets) == [0] * len(FILES)
        rows = instances(node)       # indexed by the time the response came
        assert len(rows) == len(FILES)
        for ds in datasets:
            row = rows[ds.SOPInstanceUID]
            assert row.state == PENDING and row.calling_ae == "SCU"
            assert row.received_transfer_syntax == ds.file_meta.TransferSyntaxUID
            assert ds.SOPInstanceUID not in row.path and row.path.startswith("objects" + os.sep)
            stored = dcmread(node.storage.abspath(row.path))
            assert stored.file_meta.ImplementationClassUID == "2.25.164171005495589579792106225184349771088"
            assert stored.file_meta.SourceApplicationEntityTitle == "SCU"
            assert stored.PixelData == ds.PixelData           # the pixel data exactly as sent
        assert os.listdir(tmp_path / "store" / "tmp") == []
        assert node.index.queue_length() == len(FILES)


def test_echo_is_open_and_find_is_for_listed_peers_only(tmp_path):
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 1, "allow": ["echo", "find"]}]
    with running_node(tmp_path / "s", peers=peers, compression={"workers": 0}) as node:
        assoc = associate(node.port, "STRANGER", Verification, StudyRootQueryRetrieveInformationModelFind)
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assoc = associate(node.port, "VIEWER", Verification, StudyRootQueryRetrieveInformationModelFind)
        assert len(assoc.accepted_contexts) == 2
        assoc.release()


def test_a_caller_allowed_nothing_is_rejected(tmp_path):
    with running_node(tmp_path / "s", access={"echo": "peers", "store": "peers"},
                      compression={"workers": 0}) as node:
        assoc = associate(node.port, "STRANGER", Verification)
        assert assoc.is_rejected


def test_a_peer_allowed_get_but_not_store_cannot_store(tmp_path):
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 1, "allow": ["get"]}]
    with running_node(tmp_path / "s", peers=peers, compression={"workers": 0}) as node:
        assert send(node.port, [read("CT_small.dcm")], calling_ae="VIEWER") == [0x0124]
        assert instances(node) == {}


def test_non_images_are_stored_but_not_queued(tmp_path):
    ds = dcmread(get_testdata_file("rtplan.dcm"))
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [0]
        assert instances(node)[ds.SOPInstanceUID].state == NOT_IMAGE
        assert node.index.queue_length() == 0


def test_an_instance_without_study_uid_is_refused_and_recorded(tmp_path):
    ds = read("CT_small.dcm")
    del ds.StudyInstanceUID
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [0xC000]
        stats = node.index.stats()
        assert stats["instances"] == 0 and stats["failures"] == 1
        assert "StudyInstanceUID is missing" in stats["recent_failures"][0].reason


@pytest.mark.parametrize("policy, status, description", [
    ("keep", 0x0000, "FIRST"), ("replace", 0x0000, "SECOND"), ("reject", 0x0111, "FIRST")])
def test_duplicate_policy(tmp_path, policy, status, description):
    first, second = read("CT_small.dcm", False), read("CT_small.dcm", False)
    first.StudyDescription, second.StudyDescription = "FIRST", "SECOND"
    second.PixelData = (second.pixel_array + 1).astype(second.pixel_array.dtype).tobytes()
    with running_node(tmp_path / "s", storage={"duplicates": policy}, compression={"workers": 0}) as node:
        assert send(node.port, [first]) == [0]
        assert send(node.port, [second]) == [status]
        rows = instances(node)
        assert len(rows) == 1
        row = rows[first.SOPInstanceUID]
        stored = dcmread(node.storage.abspath(row.path))
        assert stored.StudyDescription == description
        expected = second if description == "SECOND" else first
        assert np.array_equal(stored.pixel_array, expected.pixel_array)
        files = [f for _, _, fs in os.walk(tmp_path / "s" / "objects") for f in fs]
        assert len(files) == 1
        assert row.generation == (2 if policy == "replace" else 1)


def test_a_sender_offering_compressed_and_uncompressed_sends_compressed(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
    ds = read("MR_small_RLE.dcm")
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(ds.SOPClassUID, [RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="NNCODEC")
        assert assoc.accepted_contexts[0].transfer_syntax[0] == RLELossless
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        assert instances(node)[ds.SOPInstanceUID].received_transfer_syntax == RLELossless


def test_concurrent_associations_store_everything(tmp_path):
    import threading
    batches = [[read(n) for n in ("CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm")] for _ in range(4)]
    for batch in batches[1:]:                      # the same study and series from several senders at once
        for ds, first in zip(batch, batches[0]):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    results = {}
    with running_node(tmp_path / "s", compression={"workers": 1}) as node:
        threads = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, send(node.port, b)))
                   for i, b in enumerate(batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(results[i] == [0, 0, 0] for i in range(len(batches)))
        assert len(instances(node)) == 12
        assert node.compressor.wait_idle(120)
        assert node.index.stats()["by_state"] == {"compressed": 12}
