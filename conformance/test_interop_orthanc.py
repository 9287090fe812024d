"""Interoperability with Orthanc 1.10 (Debian's, with orthanc-gdcm when installed).

Orthanc gets the mixed folder over REST, pushes both studies to the node (C-STORE), forgets them,
then finds them on the node (C-FIND) and pulls them back (C-MOVE to itself).  Orthanc does not
accept the private transfer syntaxes, so the node must send what Orthanc accepted; the files Orthanc
then holds are downloaded over REST and compared bit for bit with what was sent.  The node's
configuration lists Orthanc as a peer; Orthanc's lists the node as a modality.
"""
from __future__ import annotations

import pytest
from pydicom import dcmread

import dicom_nncodec

pytestmark = pytest.mark.interop

ORTHANC_AE = "ORTHANC"
PRIVATE = {str(dicom_nncodec.NNCodecLossless), str(dicom_nncodec.NNCodecLossy)}


@pytest.fixture(scope="module")
def pair(node_factory, orthanc_factory, sent, helpers):
    node_port, orthanc_dicom = helpers.free_port(), None
    # Orthanc picks its ports first, the node is told where Orthanc listens
    orthanc = orthanc_factory(ORTHANC_AE, {"nncodec": {"ae_title": helpers.NODE_AE, "host": "127.0.0.1",
                                                       "port": node_port}})
    orthanc_dicom = orthanc.dicom_port
    node = node_factory([{"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc_dicom}],
                        port=node_port)
    for s in sent.instances:
        with open(s.path, "rb") as f:
            r = orthanc.post("/instances", raw=f.read())
        assert r["Status"] in ("Success", "AlreadyStored"), r
    return node, orthanc


def orthanc_study_ids(orthanc) -> dict[str, str]:
    """StudyInstanceUID -> Orthanc's study id."""
    return {orthanc.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"]: sid for sid in orthanc.get("/studies")}


def test_orthanc_pushes_both_studies_to_the_node(pair, sent):
    node, orthanc = pair
    ids = orthanc_study_ids(orthanc)
    assert sorted(ids) == sorted(st["StudyInstanceUID"] for st in sent.studies.values())
    r = orthanc.post("/modalities/nncodec/store", {"Resources": list(ids.values()), "Synchronous": True})
    assert (r["InstancesCount"], r["FailedInstancesCount"]) == (len(sent.instances), 0), r
    rows = node.instances()
    assert sorted(rows) == sorted(s.sop_uid for s in sent.instances)
    for s in sent.instances:
        assert rows[s.sop_uid].calling_ae == ORTHANC_AE
        # Orthanc offers each file's own syntax; the node takes a compressed one as it is
        if dcmread(s.path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed:
            assert rows[s.sop_uid].received_transfer_syntax == s.transfer_syntax, s.source
    node.wait_idle()
    assert {r.transfer_syntax for r in node.instances().values()} == {str(dicom_nncodec.NNCodecLossless)}


@pytest.fixture(scope="module")
def pulled_back(pair, sent, tmp_path_factory):
    """Orthanc deletes its copies, finds both studies on the node and retrieves them by C-MOVE."""
    node, orthanc = pair
    if len(node.instances()) < len(sent.instances):
        pytest.skip("the push to the node failed (see test_orthanc_pushes_both_studies_to_the_node)")
    node.wait_idle()
    for sid in orthanc.get("/studies"):
        orthanc.delete(f"/studies/{sid}")
    assert orthanc.get("/instances") == []
    q = orthanc.post("/modalities/nncodec/query",
                     {"Level": "Study", "Query": {"PatientName": "Interop*", "StudyInstanceUID": "",
                                                 "StudyDate": "", "ModalitiesInStudy": "",
                                                 "NumberOfStudyRelatedInstances": ""}})
    answers = orthanc.get(f"/queries/{q['ID']}/answers?expand&simplify")
    retrieve = orthanc.post(f"/queries/{q['ID']}/retrieve", {"TargetAet": ORTHANC_AE, "Synchronous": True})
    folder = tmp_path_factory.mktemp("from-orthanc")
    files = []
    for iid in orthanc.get("/instances"):
        path = folder / f"{iid}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{iid}/file"))
        files.append(str(path))
    return answers, retrieve, files


def test_orthanc_finds_both_studies_on_the_node(pulled_back, sent):
    answers, _, _ = pulled_back
    by_uid = {a["StudyInstanceUID"]: a for a in answers}
    assert sorted(by_uid) == sorted(st["StudyInstanceUID"] for st in sent.studies.values())
    for label, st in sent.studies.items():
        a = by_uid[st["StudyInstanceUID"]]
        assert a["PatientName"] == st["PatientName"] and a["StudyDate"] == st["StudyDate"]
        assert int(a["NumberOfStudyRelatedInstances"]) == len(sent.in_study(label))
        assert a["RetrieveAETitle"] == "NNCODEC"


def test_orthanc_pulls_back_standard_syntaxes_with_identical_pixels(pulled_back, sent, helpers):
    _, retrieve, files = pulled_back
    assert sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files) == \
        sorted(s.sop_uid for s in sent.instances), retrieve
    syntaxes = {helpers.transfer_syntax_of(f) for f in files}
    assert not syntaxes & PRIVATE
    # Orthanc accepts every standard syntax; the node sends the first of its preference it accepted
    assert syntaxes == {"1.2.840.10008.1.2.4.80"}          # JPEG-LS lossless
    sent.assert_same_pixels(files)


def test_instances_orthanc_pulled_are_no_less_valid_than_those_sent(pulled_back, sent, dciodvfy):
    _, _, files = pulled_back
    worse = []
    for f in files:
        s = sent.by_uid(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        before, after = dciodvfy(s.path), dciodvfy(f)
        if len(after) > len(before):
            worse.append(f"{s.source}: {len(before)} -> {len(after)} errors; new: {sorted(set(after) - set(before))}")
    assert not worse, "\n".join(worse)


def test_orthanc_retrieves_one_series_by_c_move(pair, sent, tmp_path):
    """A series-level query and retrieve (Orthanc sends StudyInstanceUID and SeriesInstanceUID)."""
    node, orthanc = pair
    us = next(s for s in sent.instances if s.modality == "US")
    existing = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]: i for i in orthanc.get("/instances")}
    if us.sop_uid in existing:
        orthanc.delete(f"/instances/{existing[us.sop_uid]}")
    q = orthanc.post("/modalities/nncodec/query",
                     {"Level": "Series", "Query": {"StudyInstanceUID": us.study_uid, "Modality": "US",
                                                  "SeriesInstanceUID": ""}})
    answers = orthanc.get(f"/queries/{q['ID']}/answers?expand&simplify")
    assert [a["SeriesInstanceUID"] for a in answers] == [us.series_uid]
    orthanc.post(f"/queries/{q['ID']}/retrieve", {"TargetAet": ORTHANC_AE, "Synchronous": True})
    found = orthanc.post("/tools/lookup", raw=us.sop_uid.encode())
    assert len(found) == 1 and found[0]["Type"] == "Instance"
    data = orthanc.get(f"/instances/{found[0]['ID']}/file")
    path = tmp_path / "us.dcm"
    path.write_bytes(data)
    sent.assert_same_pixels([path])
