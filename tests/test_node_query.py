"""C-FIND at every level of both information models, over real associations (PS3.4 C.2.2.2 matching)."""
from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
                                  StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT)

from scp.testing import find, running_node, send

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")

S1, S2, S3 = (generate_uid() for _ in range(3))
SE_CT, SE_MR, SE_B, SE_C = (generate_uid() for _ in range(4))


def instance(patient_id, name, study, series, modality, date, time, accession, number):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, name, "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time, accession
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    return ds


DATA = [
    instance("PA", "DOE^JOHN", S1, SE_CT, "CT", "20200105", "101500", "ACC1", 1),
    instance("PA", "DOE^JOHN", S1, SE_CT, "CT", "20200105", "101500", "ACC1", 2),
    instance("PA", "DOE^JOHN", S1, SE_MR, "MR", "20200105", "101500", "ACC1", 1),
    instance("PB", "SMITH^JANE", S2, SE_B, "CT", "20210310", "080000", "ACC_2", 1),
    instance("PC", "MÜLLER^HANS", S3, SE_C, "MR", "20220101", "235959", "ACC%3", 1),
]


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]
    with running_node(tmp_path_factory.mktemp("q"), peers=peers, compression={"workers": 0}) as node:
        assert send(node.port, DATA) == [0] * len(DATA)
        yield node.port


def query(level, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def values(responses, keyword):
    return sorted(str(r.get(keyword, "")) for r in responses)


def test_patient_level_with_computed_counts(port):
    status, found = find(port, query("PATIENT", PatientID="", PatientName="DOE*",
                                     NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
                                     NumberOfPatientRelatedInstances=""), PATIENT_ROOT)
    assert status == 0 and len(found) == 1
    r = found[0]
    assert (r.PatientID, str(r.PatientName), r.RetrieveAETitle) == ("PA", "DOE^JOHN", "NNCODEC")
    assert (r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedSeries,
            r.NumberOfPatientRelatedInstances) == (1, 2, 3)


@pytest.mark.parametrize("keys, expected", [
    ({"PatientID": ""}, ["PA", "PB", "PC"]),                    # universal
    ({"PatientID": "*"}, ["PA", "PB", "PC"]),                   # only '*': universal
    ({"PatientID": "P?"}, ["PA", "PB", "PC"]),                  # wildcard ?
    ({"PatientID": "PB"}, ["PB"]),                              # single value
    ({"PatientID": "pb"}, []),                                  # case-sensitive text
    ({"PatientID": "", "PatientName": "doe^john"}, ["PA"]),     # names: case-insensitive
    ({"PatientID": "", "PatientName": "*ÜLL*"}, ["PC"]),        # non-ASCII wildcard
    ({"PatientID": "", "PatientBirthDate": "19600101-19751231"}, ["PA", "PB", "PC"]),
])
def test_patient_matching(port, keys, expected):
    status, found = find(port, query("PATIENT", **keys), PATIENT_ROOT)
    assert status == 0 and values(found, "PatientID") == expected


@pytest.mark.parametrize("keys, expected", [
    ({"StudyDate": "20200101-20201231"}, [S1]),                 # range
    ({"StudyDate": "-20210310"}, [S1, S2]),                     # open start
    ({"StudyDate": "20210101-"}, [S2, S3]),                     # open end
    ({"StudyDate": "20220101"}, [S3]),
    ({"StudyTime": "1000-1015"}, [S1]),                         # time range, bound covers its minute
    ({"StudyInstanceUID": [S1, S3]}, [S1, S3]),                 # list of UIDs
    ({"AccessionNumber": "ACC_*"}, [S2]),                       # '_' is literal, not SQL's wildcard
    ({"AccessionNumber": "ACC%3"}, [S3]),
    ({"ModalitiesInStudy": "MR"}, [S1, S3]),
    ({"ModalitiesInStudy": ["CT", "XA"]}, [S1, S2]),
    ({"PatientName": "SMITH^*"}, [S2]),                         # patient keys in the Study Root
])
def test_study_matching(port, keys, expected):
    keys.setdefault("StudyInstanceUID", "")
    status, found = find(port, query("STUDY", **keys), STUDY_ROOT)
    assert status == 0 and values(found, "StudyInstanceUID") == sorted(expected)


def test_study_level_returns_requested_and_computed_keys(port):
    status, found = find(port, query("STUDY", StudyInstanceUID=S1, ModalitiesInStudy="", StudyDate="",
                                     NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                                     PatientName="", StudyDescription="", SOPClassesInStudy=""), STUDY_ROOT)
    assert status == 0 and len(found) == 1
    r = found[0]
    assert list(r.ModalitiesInStudy) == ["CT", "MR"] and r.StudyDate == "20200105"
    assert (r.NumberOfStudyRelatedSeries, r.NumberOfStudyRelatedInstances) == (2, 3)
    assert r.SOPClassesInStudy == "1.2.840.10008.5.1.4.1.1.2"
    assert "StudyDescription" in r and r.QueryRetrieveLevel == "STUDY"


def test_series_and_image_levels(port):
    status, found = find(port, query("SERIES", StudyInstanceUID=S1, SeriesInstanceUID="", Modality="",
                                     NumberOfSeriesRelatedInstances=""), STUDY_ROOT)
    assert status == 0
    assert sorted((r.Modality, r.NumberOfSeriesRelatedInstances) for r in found) == [("CT", 2), ("MR", 1)]
    status, found = find(port, query("IMAGE", PatientID="PA", StudyInstanceUID=S1, SeriesInstanceUID=SE_CT,
                                     SOPInstanceUID="", InstanceNumber="2", SOPClassUID="", Rows=None),
                         PATIENT_ROOT)
    assert status == 0 and len(found) == 1
    assert found[0].SOPInstanceUID == DATA[1].SOPInstanceUID and found[0].Rows == 128   # Rows: from the header


def test_non_ascii_names_come_back_intact(port):
    status, found = find(port, query("PATIENT", PatientID="PC", PatientName=""), PATIENT_ROOT)
    assert status == 0 and str(found[0].PatientName) == "MÜLLER^HANS"


@pytest.mark.parametrize("model, level", [(STUDY_ROOT, "PATIENT"), (PATIENT_ROOT, "FRAME"), (STUDY_ROOT, "")])
def test_an_invalid_level_is_refused(port, model, level):
    status, found = find(port, query(level, PatientID=""), model)
    assert status == 0xA900 and found == []
