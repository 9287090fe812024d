"""The node with a PostgreSQL index: store, compress, find and get through the same code as SQLite.

Runs only when NNCODEC_TEST_POSTGRES_URL names a database that may be emptied, e.g.
postgresql+psycopg://user@127.0.0.1:5432/nncodec_test (needs the `postgres` extra, psycopg 3).
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as FIND,
                                  StudyRootQueryRetrieveInformationModelGet as GET)

URL = os.environ.get("NNCODEC_TEST_POSTGRES_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="set NNCODEC_TEST_POSTGRES_URL to test with PostgreSQL")


def test_store_compress_find_get_with_postgresql(tmp_path):
    pytest.importorskip("psycopg")
    from scp.index import Base, Index
    from scp.testing import find, get, running_node, send
    idx = Index(URL)
    Base.metadata.drop_all(idx.engine)
    idx.dispose()
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
