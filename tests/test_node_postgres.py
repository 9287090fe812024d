"""The node with a PostgreSQL index: store, compress, find and get through the same code as SQLite;
two nodes receiving at once into one index and one storage folder.

PostgreSQL is a throwaway server of the test session (tests/conftest.py, scp.pgcluster), or the
database NNCODEC_TEST_POSTGRES_URL names (emptied first).  Skipped, with the reason, when neither
the server binaries nor that variable are there.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as FIND,
                                  StudyRootQueryRetrieveInformationModelGet as GET)


def test_store_compress_find_get_with_postgresql(tmp_path, postgres_url):
    from scp.testing import find, get, running_node, send
    URL = postgres_url
    study = generate_uid()
    batches = []
    for _ in range(3):
        batch = []
        for name in ("CT_small.dcm", "emri_small.dcm"):
            ds = dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = study
            batch.append(ds)
        batches.append(batch)
    peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]
    with running_node(tmp_path / "s", index={"url": URL}, peers=peers) as node:
        results = []
        threads = [threading.Thread(target=lambda b=b: results.append(send(node.port, b))) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [[0, 0]] * 3
        assert node.compressor.wait_idle(120)
        assert node.index.stats()["by_state"] == {"compressed": 6}
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.NumberOfStudyRelatedInstances = "STUDY", study, ""
        q.ModalitiesInStudy, q.PatientName = "", "compressed*"          # case-insensitive name match
        status, found = find(node.port, q, FIND)
        assert status == 0 and len(found) == 1 and found[0].NumberOfStudyRelatedInstances == 6
        assert list(found[0].ModalitiesInStudy) == ["CT", "MR"]
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study
        originals = {ds.SOPInstanceUID: ds for b in batches for ds in b}
        final, received = get(node.port, q, GET, sorted({d.SOPClassUID for d in originals.values()}),
                              [ExplicitVRLittleEndian])
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 6)
        for _, ds in received:
            assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)


def test_two_nodes_receive_at_once_into_one_index_and_folder(tmp_path, index_url):
    """Each node receives from two senders at once; both then answer every query the same way, and
    their compression workers (one each) share the queue."""
    from scp.testing import find, get, running_node, send
    storage = tmp_path / "shared"
    index = {"url": index_url} if index_url else {}
    if not index_url:          # one SQLite file in the shared folder (one machine)
        index = {"url": f"sqlite:///{storage / 'index.sqlite'}"}
    study, originals = generate_uid(), {}
    batches = []
    for _ in range(4):
        batch = []
        for name in ("CT_small.dcm", "MR_small.dcm"):
            ds = dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = study
            batch.append(ds)
            originals[ds.SOPInstanceUID] = ds
        batches.append(batch)
    peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]
    with running_node(storage, index=index, peers=peers) as a, \
            running_node(storage, index=index, peers=peers, ae_title="NODEB") as b:
        results = []
        threads = [threading.Thread(target=lambda n=n, bt=bt: results.append(send(n.port, bt, called_ae=n.cfg.ae_title)))
                   for n, bt in zip((a, b, a, b), batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [[0, 0]] * 4
        assert a.compressor.wait_idle(120) and b.compressor.wait_idle(120)
        assert a.index.stats()["by_state"] == {"compressed": 8}
        answers = []
        for node in (a, b):
            q = Dataset()
            q.QueryRetrieveLevel, q.StudyInstanceUID, q.SOPInstanceUID, q.SeriesInstanceUID = "IMAGE", study, "", ""
            status, found = find(node.port, q, FIND)
            assert status == 0
            answers.append(sorted(str(f.SOPInstanceUID) for f in found))
            q = Dataset()
            q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study
            final, received = get(node.port, q, GET, sorted({d.SOPClassUID for d in originals.values()}),
                                  [ExplicitVRLittleEndian])
            assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 8)
            for _, ds in received:
                assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)
        assert answers[0] == answers[1] == sorted(originals)
        assert len(a.storage.files()) == 8          # each instance stored once (originals removed)
