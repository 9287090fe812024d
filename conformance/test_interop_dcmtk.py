"""Interoperability with DCMTK 3.6 (echoscu, dcmsend, findscu, getscu, movescu, storescp) and dciodvfy.

One node for the module: DCMTK's dcmsend sends it the mixed folder (two studies, ten instances in
seven transfer syntaxes), the queue drains, and then DCMTK queries and retrieves, with default and
restricted transfer syntax proposals.  Every retrieved file is decoded by pydicom and compared bit for
bit with what was sent, and checked by dciodvfy against the file that was sent.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest
from pydicom import dcmread
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless)

import dicom_nncodec

pytestmark = pytest.mark.interop

SCU = "DCMTKSCU"       # findscu / getscu / movescu (a listed peer: may find, get and move)
DEST = "STORESCP"      # storescp, the C-MOVE destination
STRANGER = "STRANGER"  # not listed: may echo and store only (the default access policy)


@pytest.fixture(scope="module")
def ports(helpers):
    return {"scu": helpers.free_port(), "dest": helpers.free_port()}


@pytest.fixture(scope="module")
def node(node_factory, dcmtk, sent, ports, helpers):
    peers = [{"name": "dcmtk", "ae_title": SCU, "host": "127.0.0.1", "port": ports["scu"]},
             {"name": "storescp", "ae_title": DEST, "host": "127.0.0.1", "port": ports["dest"],
              "allow": ["echo", "store"]}]
    n = node_factory(peers)
    # dcmsend's default: propose each file's own syntax (plus uncompressed for lossless ones, which it
    # can decompress); the node accepts the compressed one, so every instance arrives as it was sent
    out = helpers.run([dcmtk["dcmsend"], "-aet", SCU, "-aec", helpers.NODE_AE, "+sd", "+r", "127.0.0.1", n.port,
                       sent.folder])
    n.dcmsend_output = out.text
    n.wait_idle()
    return n


def dcm(dcmtk, tool, *args):
    return [dcmtk[tool], "-aet", SCU, "-aec", "NNCODEC", *args]


def study_uids(sent, *labels):
    return "\\".join(sent.studies[label]["StudyInstanceUID"] for label in labels)


# --- C-ECHO, C-STORE -------------------------------------------------------------------------------------

def test_echoscu(node, dcmtk, helpers):
    out = helpers.run(dcm(dcmtk, "echoscu", "-v", "127.0.0.1", node.port))
    assert "Received Echo Response (Success)" in out.text
    # anyone may echo (access.echo: any), with any called AE title (access.check_called_ae: false)
    out = helpers.run([dcmtk["echoscu"], "-v", "-aet", STRANGER, "-aec", "ANY-SCP", "127.0.0.1", node.port])
    assert "Success" in out.text


def test_dcmsend_stores_every_instance_compressed_as_it_was_sent(node, sent):
    """dcmsend offers a lossless-compressed file's own syntax and the uncompressed ones; the node takes
    the compressed one (nothing decompressed on the way), and Explicit VR LE among uncompressed ones."""
    rows = node.instances()
    assert {s.sop_uid for s in sent.instances} <= set(rows)
    for s in sent.instances:
        row = rows[s.sop_uid]
        ts = dcmread(s.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        expected = s.transfer_syntax if ts.is_compressed else str(ExplicitVRLittleEndian)
        assert row.received_transfer_syntax == expected, s.source
        assert row.calling_ae == SCU
        # every one is an image the codec supports: after the queue drained, all are in the private syntax
        assert (row.state, row.transfer_syntax) == ("compressed", str(dicom_nncodec.NNCodecLossless)), \
            f"{s.source}: {row.state} {row.state_reason}"


def test_stored_files_decode_to_the_pixels_sent(node, sent):
    sent.assert_same_pixels(node.stored_path(s.sop_uid) for s in sent.instances)


# --- C-FIND -----------------------------------------------------------------------------------------------

def findscu(node, dcmtk, helpers, tmp_path, model: str, keys: list[str]) -> list:
    """findscu's responses as datasets (extracted to files with -X)."""
    out_dir = tmp_path / f"find{time.monotonic_ns()}"
    out_dir.mkdir()
    args = dcm(dcmtk, "findscu", model, "-X", "-od", out_dir)
    for k in keys:
        args += ["-k", k]
    helpers.run(args + ["127.0.0.1", node.port])
    return [dcmread(p) for p in sorted(out_dir.iterdir())]


def values(responses, keyword):
    return sorted(str(r.get(keyword, "")) for r in responses)


def test_findscu_patient_level_wildcard_is_case_insensitive_for_names(node, dcmtk, helpers, tmp_path, sent):
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-P",
                  ["QueryRetrieveLevel=PATIENT", "PatientName=interop*", "PatientID", "PatientBirthDate",
                   "PatientSex", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                   "NumberOfPatientRelatedInstances"])
    assert values(rsp, "PatientID") == ["IOP-001", "IOP-002"]
    by_id = {str(r.PatientID): r for r in rsp}
    assert str(by_id["IOP-001"].PatientName) == "Interop^Alpha" and by_id["IOP-001"].PatientBirthDate == "19700101"
    assert (int(by_id["IOP-001"].NumberOfPatientRelatedStudies), int(by_id["IOP-001"].NumberOfPatientRelatedSeries),
            int(by_id["IOP-001"].NumberOfPatientRelatedInstances)) == (1, 2, 6)
    assert int(by_id["IOP-002"].NumberOfPatientRelatedInstances) == 4
    assert all(r.QueryRetrieveLevel == "PATIENT" and r.RetrieveAETitle == "NNCODEC" for r in rsp)
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-P", ["QueryRetrieveLevel=PATIENT", "PatientName=Interop^Alph?",
                                                        "PatientID"])
    assert values(rsp, "PatientID") == ["IOP-001"]


@pytest.mark.parametrize("key, expected", [
    ("StudyDate=20240101-20240131", ["alpha"]),
    ("StudyDate=20240301-", ["beta"]),
    ("StudyDate=-20241231", ["alpha", "beta"]),
    ("StudyDate=20240320", ["beta"]),
    ("StudyTime=1000-1100", ["alpha"]),
    ("AccessionNumber=ACC-?1", ["alpha", "beta"]),
    ("ModalitiesInStudy=US", ["beta"]),
    ("ModalitiesInStudy=CT\\OT", ["alpha", "beta"]),
    ("StudyDescription=*beta", ["beta"]),
    ("PatientName=INTEROP^*", ["alpha", "beta"]),
])
def test_findscu_study_level_range_wildcard_and_list_keys(node, dcmtk, helpers, tmp_path, sent, key, expected):
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-S",
                  ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "ModalitiesInStudy",
                   "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", key])   # (a later -k wins)
    assert values(rsp, "StudyInstanceUID") == sorted(sent.studies[s]["StudyInstanceUID"] for s in expected)
    for r in rsp:
        label = "alpha" if r.PatientID == "IOP-001" else "beta"
        assert list(r.ModalitiesInStudy) == {"alpha": ["CT", "MR"], "beta": ["MR", "OT", "US"]}[label]
        assert int(r.NumberOfStudyRelatedInstances) == len(sent.in_study(label))
        assert int(r.NumberOfStudyRelatedSeries) == {"alpha": 2, "beta": 3}[label]


def test_findscu_series_level(node, dcmtk, helpers, tmp_path, sent):
    alpha = sent.studies["alpha"]["StudyInstanceUID"]
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-S",
                  ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={alpha}", "Modality=MR", "SeriesInstanceUID",
                   "SeriesNumber", "NumberOfSeriesRelatedInstances"])
    assert len(rsp) == 1 and rsp[0].Modality == "MR" and int(rsp[0].NumberOfSeriesRelatedInstances) == 4
    assert rsp[0].SeriesInstanceUID == next(s.series_uid for s in sent.instances if s.source == "MR_small_RLE.dcm")
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-P",
                  ["QueryRetrieveLevel=SERIES", "PatientID=IOP-002", f"StudyInstanceUID={sent.studies['beta']['StudyInstanceUID']}",
                   "Modality=O?", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"])
    assert [(r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in rsp] == [("OT", 2)]


def test_findscu_image_level_with_a_uid_list(node, dcmtk, helpers, tmp_path, sent):
    mr = [s for s in sent.instances if s.modality == "MR" and s.study_uid == sent.studies["alpha"]["StudyInstanceUID"]]
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-S",
                  ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={mr[0].study_uid}",
                   f"SeriesInstanceUID={mr[0].series_uid}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
                   "Rows", "Columns"])
    assert values(rsp, "SOPInstanceUID") == sorted(s.sop_uid for s in mr)
    assert values(rsp, "InstanceNumber") == ["1", "2", "3", "4"]
    assert all(r.Rows == 64 and r.Columns == 64 for r in rsp)        # not indexed: answered from the header
    two = [mr[0].sop_uid, mr[2].sop_uid]
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-S",
                  ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={mr[0].study_uid}",
                   f"SeriesInstanceUID={mr[0].series_uid}", "SOPInstanceUID=" + "\\".join(two)])
    assert values(rsp, "SOPInstanceUID") == sorted(two)


def test_findscu_from_an_unlisted_ae_is_refused(node, dcmtk, helpers):
    """access.find: peers -- the Q/R presentation contexts are not offered to an unknown calling AE."""
    out = helpers.run([dcmtk["findscu"], "-S", "-aet", STRANGER, "-aec", "NNCODEC", "-k", "QueryRetrieveLevel=STUDY",
                       "-k", "StudyInstanceUID", "127.0.0.1", node.port], check=False)
    assert out.returncode != 0
    assert "Pending" not in out.text


@pytest.fixture(scope="module")
def latin1_patient(node, dcmtk, helpers, sent, tmp_path_factory):
    """One more instance, for patient "Müller^Jürgen" (IOP-003) in ISO_IR 100, sent with dcmsend."""
    import warnings
    from pydicom.uid import generate_uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(sent.instances[2].path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID = "Müller^Jürgen", "IOP-003"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    # a study no other query of this module matches, whatever the order the tests run in
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyDescription = "", "", "LATIN1", "latin1"
    path = tmp_path_factory.mktemp("latin1") / "latin1.dcm"
    ds.save_as(path, enforce_file_format=True)
    helpers.run([dcmtk["dcmsend"], "-aet", SCU, "-aec", "NNCODEC", "127.0.0.1", node.port, path])
    return "IOP-003"


def test_findscu_returns_a_non_ascii_name_in_utf8(node, dcmtk, helpers, tmp_path, latin1_patient):
    """A name stored in ISO_IR 100 comes back intact, in ISO_IR 192 (UTF-8)."""
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-P",
                  ["QueryRetrieveLevel=PATIENT", f"PatientID={latin1_patient}", "PatientName"])
    assert len(rsp) == 1 and str(rsp[0].PatientName) == "Müller^Jürgen"
    assert rsp[0].SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize("name", ["Müller^Jürgen", "Mü*", "müller*"])
def test_findscu_matches_a_non_ascii_person_name(node, dcmtk, helpers, tmp_path, latin1_patient, name):
    rsp = findscu(node, dcmtk, helpers, tmp_path, "-P",
                  ["QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 100",
                   b"PatientName=" + name.encode("latin-1"), "PatientID"])
    assert values(rsp, "PatientID") == [latin1_patient]


# --- C-GET ------------------------------------------------------------------------------------------------

GET_CASES = [
    # getscu option, the syntax the node sends (its retrieve preference among what getscu proposed)
    ([], ExplicitVRLittleEndian),             # getscu proposes Explicit LE, Big Endian, Implicit LE
    (["+xe"], ExplicitVRLittleEndian),        # (DCMTK 3.6.7's getscu +xi still proposes Explicit LE only)
    (["+xt"], JPEGLSLossless),                # JPEG-LS lossless first
    (["+xv"], JPEG2000Lossless),              # JPEG 2000 lossless first
    (["+xs"], ExplicitVRLittleEndian),        # JPEG lossless first: not produced by the node, so uncompressed
    (["+xr"], ExplicitVRLittleEndian),        # RLE first: not in the default retrieve.transfer_syntaxes
    (["+xt", "-xi"], JPEGLSLossless),         # the C-GET itself on Implicit VR LE
]


@pytest.fixture(scope="module")
def getscu_results(node, dcmtk, sent, helpers, tmp_path_factory):
    """Both studies retrieved with each getscu option (run once, used by several tests)."""
    out = {}
    for opts, _ in GET_CASES:
        folder = tmp_path_factory.mktemp("get")
        res = helpers.run(dcm(dcmtk, "getscu", "-S", *opts, "-od", folder, "-k", "QueryRetrieveLevel=STUDY",
                              "-k", "StudyInstanceUID=" + study_uids(sent, "alpha", "beta"), "127.0.0.1", node.port))
        out[" ".join(opts)] = (str(folder), res.text)
    return out


@pytest.mark.parametrize("opts, expected", GET_CASES, ids=[" ".join(o) or "default" for o, _ in GET_CASES])
def test_getscu_receives_every_instance_bit_exact_in_the_negotiated_syntax(getscu_results, sent, helpers, opts,
                                                                           expected):
    folder, text = getscu_results[" ".join(opts)]
    files = helpers.dicom_files(folder)
    assert sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files) == \
        sorted(s.sop_uid for s in sent.instances), text[-3000:]
    assert {helpers.transfer_syntax_of(f) for f in files} == {str(expected)}
    sent.assert_same_pixels(files)


def test_getscu_series_and_image_level_patient_root(node, dcmtk, sent, helpers, tmp_path):
    us = next(s for s in sent.instances if s.modality == "US")
    rgb = next(s for s in sent.instances if s.source == "SC_rgb_rle_2frame.dcm")
    for level, keys, want in [
        ("SERIES", [f"SeriesInstanceUID={us.series_uid}"], [us]),
        ("IMAGE", [f"SeriesInstanceUID={rgb.series_uid}", f"SOPInstanceUID={rgb.sop_uid}"], [rgb]),
    ]:
        folder = tmp_path / level
        folder.mkdir()
        args = dcm(dcmtk, "getscu", "-P", "+xt", "-od", folder, "-k", f"QueryRetrieveLevel={level}",
                   "-k", f"PatientID={us.patient_id}", "-k", f"StudyInstanceUID={us.study_uid}")
        for k in keys:
            args += ["-k", k]
        helpers.run(args + ["127.0.0.1", node.port])
        files = helpers.dicom_files(folder)
        assert [str(dcmread(f).SOPInstanceUID) for f in files] == [s.sop_uid for s in want]
        assert helpers.transfer_syntax_of(files[0]) == str(JPEGLSLossless)
        sent.assert_same_pixels(files)


# --- C-MOVE -----------------------------------------------------------------------------------------------

MOVE_CASES = [
    # storescp option, what it accepts, the syntax the node sends
    ([], ExplicitVRLittleEndian),             # storescp's default: uncompressed, explicit first
    (["+xi"], ImplicitVRLittleEndian),        # Implicit VR LE only
    (["+xa"], JPEGLSLossless),                # everything storescp supports: the node's preference decides
    (["+xv"], JPEG2000Lossless),
    (["+xt"], JPEGLSLossless),
    (["+xs"], ExplicitVRLittleEndian),        # JPEG lossless preferred, but the node does not propose it
]


def storescp(dcmtk, port, folder, opts):
    proc = subprocess.Popen([dcmtk["storescp"], "-aet", DEST, *opts, "-od", str(folder), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    import socket
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"storescp exited: {proc.stdout.read()!r}")
            time.sleep(0.1)
    raise AssertionError("storescp did not listen")


def stop(proc):
    proc.terminate()
    proc.wait(30)


@pytest.mark.parametrize("opts, expected", MOVE_CASES, ids=[" ".join(o) or "default" for o, _ in MOVE_CASES])
def test_movescu_to_storescp_in_the_syntax_it_accepted(node, dcmtk, sent, helpers, ports, tmp_path, opts, expected):
    dest = storescp(dcmtk, ports["dest"], tmp_path, opts)
    try:
        out = helpers.run(dcm(dcmtk, "movescu", "-v", "-S", "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
                              "-k", "StudyInstanceUID=" + study_uids(sent, "alpha", "beta"), "127.0.0.1", node.port))
    finally:
        stop(dest)
    files = helpers.dicom_files(tmp_path)
    assert len(files) == len(sent.instances), out.text[-3000:]
    assert {helpers.transfer_syntax_of(f) for f in files} == {str(expected)}
    sent.assert_same_pixels(files)


def test_movescu_to_itself(node, dcmtk, sent, helpers, ports, tmp_path):
    """movescu as its own C-MOVE destination (the listed peer DCMTKSCU, port given with --port)."""
    helpers.run(dcm(dcmtk, "movescu", "-P", "--port", ports["scu"], "-aem", SCU, "-od", tmp_path,
                    "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=IOP-002", "127.0.0.1", node.port))
    files = helpers.dicom_files(tmp_path)
    assert sorted(str(dcmread(f).SOPInstanceUID) for f in files) == sorted(s.sop_uid for s in sent.in_study("beta"))
    sent.assert_same_pixels(files)


def test_movescu_to_an_unknown_destination_fails_with_a801(node, dcmtk, sent, helpers):
    out = helpers.run(dcm(dcmtk, "movescu", "-v", "-S", "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "StudyInstanceUID=" + study_uids(sent, "alpha"), "127.0.0.1", node.port), check=False)
    assert re.search(r"0xa801|MoveDestinationUnknown", out.text, re.I), out.text[-2000:]


# --- output validity ---------------------------------------------------------------------------------------



@pytest.mark.parametrize("opts", [[], ["+xt"], ["+xv"]], ids=["explicit", "jpeg-ls", "jpeg2000"])
def test_retrieved_instances_are_no_less_valid_than_those_sent(getscu_results, sent, helpers, dciodvfy, opts):
    folder, _ = getscu_results[" ".join(opts)]
    worse = []
    for f in helpers.dicom_files(folder):
        s = sent.by_uid(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        before, after = dciodvfy(s.path), dciodvfy(f)
        if len(after) > len(before):
            worse.append(f"{s.source}: {len(before)} -> {len(after)} errors; new: {sorted(set(after) - set(before))}")
    assert not worse, "\n".join(worse)
