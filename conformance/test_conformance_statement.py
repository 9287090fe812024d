"""CONFORMANCE.md against the code: every table marked ``<!-- check: NAME -->`` is compared with what
the node does, statically (the configuration, ``scp.node.build_ae``, ``scp.transcode``, ``scp.query``,
``scp.commitment``, the TLS contexts of ``scp.transport``) and live (a node on a free port: the
contexts it supports, a negotiation proposing every known transfer syntax, a C-FIND at each level
asking for every key the statement lists, a Storage Commitment request answered on the same
association and one answered on a new association).

No external peer is needed: these tests run with the normal suite (the TLS check makes its test
certificates with the ``openssl`` command and is skipped without it).
"""
from __future__ import annotations

import os
import re
import ssl
import threading
import time

import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
import pydicom.uid as U
from pynetdicom import AE, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, PatientRootQueryRetrieveInformationModelFind,
                                  StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet, Verification)

import dicom_nncodec
from dicom_nncodec.syntax import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless
from scp import commitment
from scp import config as C
from scp import query, rules, transcode
from scp.node import QR_MODELS, build_ae
from scp.testing import CommitmentSCU, find, make_certificates, running_node, send

HERE = os.path.dirname(os.path.abspath(__file__))
STATEMENT = os.path.join(HERE, "CONFORMANCE.md")
ANNEX = os.path.join(HERE, "PRIVATE_TRANSFER_SYNTAX.md")
STORAGE_CLASSES = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
NN = {str(dicom_nncodec.NNCodecLossless): "NNCodecLossless", str(dicom_nncodec.NNCodecLossy): "NNCodecLossy"}


# --- reading the statement --------------------------------------------------------------------------

def text() -> str:
    with open(STATEMENT, encoding="utf-8") as f:
        return f.read()


def table(name: str) -> list[list[str]]:
    """The rows (cells, backticks removed) of the table after ``<!-- check: name -->``."""
    lines = text().splitlines()
    marker = f"<!-- check: {name} -->"
    assert marker in lines, f"CONFORMANCE.md has no table {name!r}"
    i = lines.index(marker) + 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip().replace("`", "") for c in lines[i].strip().strip("|").split("|")])
        i += 1
    assert len(rows) > 2, f"table {name!r} is empty"
    return rows[2:]          # header and separator dropped


def syntax_name(uid) -> str:
    uid = str(uid)
    return NN.get(uid) or UID(uid).name


def uid_of_name(name: str) -> str:
    """A transfer syntax named in the statement (pydicom's name, or a short form used in the tables)."""
    short = {"JPEG-LS Lossless": U.JPEGLSLossless, "JPEG 2000 Lossless": U.JPEG2000Lossless,
             "Explicit VR Little Endian": U.ExplicitVRLittleEndian, "Implicit VR Little Endian":
             U.ImplicitVRLittleEndian, "JPEG Lossless SV1": U.JPEGLosslessSV1,
             "Explicit VR Big Endian": U.ExplicitVRBigEndian, "Deflated Explicit VR Little Endian":
             U.DeflatedExplicitVRLittleEndian}
    if name in short:
        return str(short[name])
    for uid, n in NN.items():
        if name == n:
            return uid
    for uid in U.AllTransferSyntaxes:
        if UID(uid).name == name:
            return str(uid)
    raise KeyError(name)


@pytest.fixture(scope="module")
def defaults() -> C.Config:
    return C.load(None)


@pytest.fixture(scope="module")
def ae(defaults):
    return build_ae(defaults)


def contexts_by_class(ae) -> dict[str, list[str]]:
    return {str(cx.abstract_syntax): [str(t) for t in cx.transfer_syntax] for cx in ae.supported_contexts}


# --- section 1 and 4.2.1.2 ---------------------------------------------------------------------------

def test_implementation_identification():
    rows = dict((r[0], r[1]) for r in table("implementation"))
    assert rows["Implementation Class UID"] == str(dicom_nncodec.IMPLEMENTATION_CLASS_UID)
    assert rows["Implementation Version Name"] == dicom_nncodec.IMPLEMENTATION_VERSION_NAME


def test_private_transfer_syntaxes_and_lossy_method():
    rows = table("private-transfer-syntaxes")
    assert [(r[0].split(" ")[0], r[1], r[2]) for r in rows] == [
        ("NNCodecLossless", str(dicom_nncodec.NNCodecLossless), "Yes"),
        ("NNCodecLossy", str(dicom_nncodec.NNCodecLossy), "No")]
    with open(ANNEX, encoding="utf-8") as f:
        annex = f.read()
    for _, uid, _ in [(r[0], r[1], r[2]) for r in rows]:
        assert uid in annex                                  # the annex names the same UIDs
    assert f"`{dicom_nncodec.LOSSY_METHOD}`" in text() and f"`{dicom_nncodec.LOSSY_METHOD}`" in annex


def test_network_services_are_what_the_node_supports(ae):
    rows = table("network-services")
    supported = contexts_by_class(ae)
    listed = {r[1]: r for r in rows if r[1].startswith("1.2.")}
    assert set(listed) == set(supported) - set(STORAGE_CLASSES)
    for uid, (name, _, scu, scp) in listed.items():
        assert UID(uid).name.replace(" - ", " – ").startswith(name.split(" –")[0].split(" (")[0])
        assert (scu, scp) == ("No", "Yes")
    storage = next(r for r in rows if r[0].startswith("Storage SOP Classes"))
    assert f"all {len(STORAGE_CLASSES)} of Annex A" in storage[0]
    assert set(STORAGE_CLASSES) <= set(supported)


def test_annex_a_lists_every_storage_class():
    rows = table("storage-sop-classes")
    assert [r[1] for r in rows] == STORAGE_CLASSES
    assert all(r[0] == UID(r[1]).name for r in rows)


# --- 4.2.1.4 accepted presentation contexts ------------------------------------------------------------

def accepted_storage_table() -> list[str]:
    rows = table("accepted-storage-ts")
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert r[1] == syntax_name(r[2])
    return [r[2] for r in rows]


def test_accepted_storage_syntaxes_are_the_nodes(ae, defaults):
    listed = accepted_storage_table()
    assert listed == [str(u) for u in transcode.storage_syntaxes(defaults.retrieve_syntaxes)]
    supported = contexts_by_class(ae)
    for sop_class in STORAGE_CLASSES:
        assert supported[sop_class] == listed, sop_class
    for r in table("accepted-storage-ts"):
        lossy = r[2] in rules.LOSSY_SYNTAXES
        assert r[3] == ("No" if lossy else "Yes"), r


def test_accepted_other_syntaxes(ae):
    (row,) = table("accepted-other-ts")
    listed = [uid_of_name(n.strip()) for n in row[1].split(",")]
    supported = contexts_by_class(ae)
    for model in (Verification, StorageCommitmentPushModel, *QR_MODELS):
        assert supported[str(model)] == listed, model


@pytest.fixture(scope="module")
def live_node(tmp_path_factory):
    """A node with one CT instance stored (no compression), a listed peer SCU."""
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.StudyInstanceUID, ct.SeriesInstanceUID = generate_uid(), generate_uid()
    with running_node(tmp_path_factory.mktemp("statement"), compression={"workers": 0},
                      peers=[{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]) as node:
        assert send(node.port, [ct]) == [0]
        node.ct = ct
        yield node


def test_a_running_node_supports_the_listed_contexts(live_node):
    listed = accepted_storage_table()
    supported = contexts_by_class(live_node.ae)
    assert all(supported[c] == listed for c in STORAGE_CLASSES)


def test_live_negotiation_accepts_exactly_the_listed_storage_syntaxes(live_node):
    """CT Image Storage proposed once per known transfer syntax (each in its own context)."""
    candidates = list(dict.fromkeys([str(u) for u in U.AllTransferSyntaxes]       # (pydicom 3.0 lacks JPEG XL)
                                    + [str(u) for u in (JPEGXLLossless, JPEGXLJPEGRecompression, JPEGXL)]))
    candidates += list(NN)
    scu = AE(ae_title="SCU")
    contexts = [build_context(CTImageStorage, [dicom_nncodec.syntax.registered(t) or UID(t)]) for t in candidates]
    assoc = scu.associate("127.0.0.1", live_node.port, ae_title="NNCODEC", contexts=contexts)
    assert assoc.is_established
    try:
        accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        implementation = (str(assoc.acceptor.implementation_class_uid), assoc.acceptor.implementation_version_name)
    finally:
        assoc.release()
    assert accepted == set(accepted_storage_table())
    assert implementation == (str(dicom_nncodec.IMPLEMENTATION_CLASS_UID), dicom_nncodec.IMPLEMENTATION_VERSION_NAME)


# --- 4.2.1.3 C-GET and C-MOVE ------------------------------------------------------------------------

def test_c_get_storage_syntax_order(defaults):
    rows = table("get-storage-ts")
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert [r[2] for r in rows] == [str(u) for u in transcode.get_syntaxes(defaults.retrieve_syntaxes)]
    assert all(r[1] == syntax_name(r[2]) for r in rows)


def test_live_c_get_association_picks_the_first_listed_syntax(live_node):
    order = [r[2] for r in table("get-storage-ts")]
    scu = AE(ae_title="SCU")
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # proposed in reverse: the node's own order decides
    scu.add_requested_context(CTImageStorage, [dicom_nncodec.syntax.registered(t) or UID(t) for t in reversed(order)])
    assoc = scu.associate("127.0.0.1", live_node.port, ae_title="NNCODEC",
                          ext_neg=[build_role(CTImageStorage, scp_role=True)])
    assert assoc.is_established
    try:
        (cx,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    finally:
        assoc.release()
    assert str(cx.transfer_syntax[0]) == order[0]


def test_c_move_proposals(defaults):
    for stored, _, proposed, role, ext in table("move-proposed"):
        stored_uid = uid_of_name(stored.split(" (")[0])
        got = [str(u) for u in transcode.proposals([stored_uid], defaults.retrieve_syntaxes)]
        assert got == [uid_of_name(n.strip()) for n in proposed.split(",")], stored
        assert (role, ext) == ("SCU", "None")


# --- 5.2 transcoding -------------------------------------------------------------------------------------

OTHER = [U.ExplicitVRBigEndian, U.JPEGLossless, U.JPEGLosslessSV1, U.HTJ2KLosslessRPCL, U.HTJ2K, JPEGXL,
         JPEGXLJPEGRecompression, U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLSNearLossless, U.JPEG2000]
STORED_ROWS = {
    "NNCodecLossless": [dicom_nncodec.NNCodecLossless],
    "NNCodecLossy": [dicom_nncodec.NNCodecLossy],
    "Explicit VR LE, Implicit VR LE, Deflated Explicit VR LE": [U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian,
                                                                 U.DeflatedExplicitVRLittleEndian],
    "Explicit VR Big Endian": [U.ExplicitVRBigEndian],
    "another standard compressed syntax": [U.JPEGLSLossless, U.JPEG2000Lossless, U.HTJ2KLossless, JPEGXLLossless,
                                           U.RLELossless, U.JPEGLosslessSV1, U.JPEGLSNearLossless, U.JPEG2000,
                                           U.HTJ2K, JPEGXL, U.JPEGBaseline8Bit, U.JPEGExtended12Bit],
}
TARGET_COLUMNS = {
    "NNCodecLossless": [dicom_nncodec.NNCodecLossless], "NNCodecLossy": [dicom_nncodec.NNCodecLossy],
    "JPEG-LS Lossless": [U.JPEGLSLossless], "JPEG 2000 Lossless": [U.JPEG2000Lossless],
    "Explicit VR LE": [U.ExplicitVRLittleEndian], "Implicit VR LE": [U.ImplicitVRLittleEndian],
    "Deflated Explicit VR LE": [U.DeflatedExplicitVRLittleEndian], "RLE Lossless": [U.RLELossless],
    "JPEG XL Lossless": [JPEGXLLossless], "HTJ2K Lossless": [U.HTJ2KLossless], "any other": OTHER,
}


def transcoding_value(stored, target, preference) -> str:
    if transcode.candidates(stored, {target}, preference):
        return "S"
    if target in transcode.PRODUCIBLE and transcode.candidates(stored, {target}, tuple(preference) + (target,)):
        return "C"
    return "N"


def test_transcoding_table(defaults):
    lines = text().splitlines()
    header = lines[lines.index("<!-- check: transcoding -->") + 1]
    columns = [c.strip() for c in header.strip().strip("|").split("|")][1:]
    assert columns[0] == "same as stored" and columns[1:] == list(TARGET_COLUMNS)
    rows = table("transcoding")
    assert len(rows) == len(STORED_ROWS)
    pref = defaults.retrieve_syntaxes
    for row in rows:
        label = next(k for k in STORED_ROWS if row[0].startswith(k))
        for stored in STORED_ROWS[label]:
            stored = transcode.syntax(stored)
            assert transcoding_value(stored, stored, pref) == row[1] == "S"
            for cell, (col, targets) in zip(row[2:], TARGET_COLUMNS.items()):
                for target in targets:
                    target = transcode.syntax(target)
                    if target == stored:
                        continue          # that is the "same as stored" column
                    assert transcoding_value(stored, target, pref) == cell, (label, stored.name, col, target.name)


def test_rgb_sent_as_jpeg_2000_lossless_is_ybr_rct(defaults):
    """5.2 and 8.1: the one attribute transcoding changes besides the pixel data's encoding."""
    assert "| Photometric Interpretation (0028,0004) | transcoding of an RGB image to JPEG 2000 Lossless" in text()
    original = dcmread(get_testdata_file("SC_rgb.dcm"))
    assert original.PhotometricInterpretation == "RGB"
    pixels = original.pixel_array.copy()
    for target, photometric in ((U.JPEG2000Lossless, "YBR_RCT"), (U.JPEGLSLossless, "RGB")):
        out = transcode.for_receiver(dcmread(get_testdata_file("SC_rgb.dcm")), {target}, defaults.retrieve_syntaxes)
        assert out.file_meta.TransferSyntaxUID == target
        assert out.PhotometricInterpretation == photometric, target.name
        assert out.SOPInstanceUID == original.SOPInstanceUID
        assert (out.pixel_array == pixels).all(), target.name


# --- 4.2.1.4.3 Q/R keys ------------------------------------------------------------------------------------

MATCHING = {
    "uid": "single value, list of UIDs, universal", "text": "single value, wildcard, universal",
    "pn": "single value, wildcard (case-insensitive), universal", "date": "single value, range, universal",
    "time": "single value, range, universal", "int": "single value, universal",
}


def tag_text(keyword: str) -> str:
    t = tag_for_keyword(keyword)
    return f"({t >> 16:04X},{t & 0xFFFF:04X})"


def keyword_of(name: str) -> str:
    from pydicom.datadict import keyword_for_tag
    from pydicom.datadict import DicomDictionary
    for tag, entry in DicomDictionary.items():
        if entry[2] == name:
            return keyword_for_tag(tag)
    raise KeyError(name)


def test_matching_keys_are_the_query_modules():
    rows = table("qr-keys")
    listed = {}
    for level, name, tag, matching in rows:
        kw = keyword_of(name)
        assert tag == tag_text(kw) and dictionary_description(kw) == name
        listed[kw] = (level, matching)
    expected = {kw: (level, MATCHING[kind]) for kw, (level, _, kind) in query.KEYS.items()}
    modalities = listed.pop("ModalitiesInStudy")
    assert listed == expected
    assert modalities[0] == query.COMPUTED_LEVEL["ModalitiesInStudy"] == "STUDY"
    assert modalities[1].startswith(MATCHING["text"])


def test_computed_keys_are_the_query_modules():
    rows = table("qr-computed")
    listed = {}
    for level, name, tag, matched in rows:
        kw = keyword_of(name)
        assert tag == tag_text(kw)
        listed[kw] = level
        assert matched == ("Yes" if kw == "ModalitiesInStudy" else "No")
    assert listed == query.COMPUTED_LEVEL


@pytest.mark.parametrize("model, level", [(PatientRootQueryRetrieveInformationModelFind, "PATIENT"),
                                          (StudyRootQueryRetrieveInformationModelFind, "STUDY"),
                                          (StudyRootQueryRetrieveInformationModelFind, "SERIES"),
                                          (StudyRootQueryRetrieveInformationModelFind, "IMAGE")])
def test_live_c_find_returns_every_listed_key(live_node, model, level):
    order = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
    keys = [keyword_of(r[1]) for r in table("qr-keys") if order.index(r[0]) <= order.index(level)]
    keys = [k for k in keys if not (k == "ModalitiesInStudy" and level != "STUDY")]
    computed = [keyword_of(r[1]) for r in table("qr-computed") if r[0] == level]
    ident = Dataset()
    ident.QueryRetrieveLevel = level
    for kw in dict.fromkeys(keys + computed):
        setattr(ident, kw, None)
    ident.Rows = None            # not indexed: answered from the stored header
    status, responses = find(live_node.port, ident, model)
    assert status == 0 and len(responses) == 1
    (rsp,) = responses
    for kw in dict.fromkeys(keys + computed):
        assert kw in rsp, kw
    for kw in computed:
        assert rsp[kw].value not in (None, "", []), kw
    assert rsp.Rows == live_node.ct.Rows and rsp.RetrieveAETitle == "NNCODEC" and rsp.QueryRetrieveLevel == level
    unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}[level]
    assert rsp[unique].value == live_node.ct[unique].value


# --- statuses ------------------------------------------------------------------------------------------

STORE_STATUS_NAMES = ("SUCCESS", "DUPLICATE", "SOP_CLASS_NOT_SUPPORTED", "NOT_AUTHORISED", "OUT_OF_RESOURCES",
                      "DATASET_MISMATCH", "CANNOT_UNDERSTAND")


def codes(table_name) -> set[int]:
    out = set()
    for row in table(table_name):
        for code in re.findall(r"\b[0-9A-F]{4}\b", row[1]):
            out.add(int(code, 16))
    return out


def test_store_statuses_are_the_nodes():
    import importlib
    module = None
    for name in ("scp.checks", "scp.ingest"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "SUCCESS"):
            break
    defined = {getattr(module, n) for n in STORE_STATUS_NAMES if hasattr(module, n)}
    assert codes("store-status") == defined


def test_query_retrieve_statuses():
    import scp.handlers as H
    node_codes = {H.IDENTIFIER_MISMATCH, getattr(H, "UNABLE_TO_PROCESS", H.IDENTIFIER_MISMATCH)}
    assert codes("find-status") == {0xFF00, 0x0000, 0xFE00} | node_codes
    # (A702, B000, A801, C416, C516: pynetdicom's, from the sub-operation counts and the destination)
    assert codes("retrieve-status") == {0xFF00, 0x0000, 0xB000, 0xA702, 0xA801, 0xFE00, 0xC416, 0xC516} | node_codes


# --- 4.2.1.3.3 and 4.2.1.4.5 Storage Commitment ---------------------------------------------------------

def flat() -> str:
    return " ".join(text().split())


def returned_constants(function, module) -> set[int]:
    """The status constants a function of ``module`` returns or raises (``return NAME`` / ``BadRequest(NAME``)
    and the literal ``0x....`` statuses it returns."""
    import inspect
    src = inspect.getsource(function)
    out = {int(v, 16) for v in re.findall(r"return (0x[0-9A-Fa-f]{4})\b", src)}
    out |= {getattr(module, n) for n in re.findall(r"(?:return|BadRequest\()\s*([A-Z_]+)\b", src)}
    return out


def test_commitment_action_statuses():
    import scp.handlers as H
    from_code = returned_constants(H.handle_n_action, commitment) | returned_constants(commitment.parse_request,
                                                                                       commitment)
    assert codes("commitment-action-status") == from_code
    assert from_code == {0x0000, commitment.PROCESSING_FAILURE, commitment.NO_SUCH_SOP_INSTANCE,
                         commitment.INVALID_ARGUMENT_VALUE, commitment.NO_SUCH_ACTION, commitment.NOT_AUTHORISED}


def reason_codes() -> dict[str, int]:
    return {r[0]: int(r[1], 16) for r in table("commitment-reasons")}


def test_commitment_failure_reasons():
    reasons = reason_codes()
    assert reasons == {"Processing failure": commitment.PROCESSING_FAILURE,
                       "No such object instance": commitment.NO_SUCH_OBJECT_INSTANCE,
                       "Class / instance conflict": commitment.CLASS_INSTANCE_CONFLICT}
    # every reason the evaluation can give is listed (and nothing else)
    assert {v for v in returned_constants(commitment.Commitments._evaluate, commitment) if v} == set(reasons.values())


def test_commitment_event_types_and_timing():
    rows = table("commitment-events")
    assert {int(r[0]) for r in rows} == {commitment.SUCCESS_EVENT, commitment.FAILURES_EVENT}
    assert [int(r[0]) for r in rows if "Failed SOP Sequence" in r[2]] == [commitment.FAILURES_EVENT]
    assert f"first waits {commitment.SAME_ASSOCIATION_GRACE:g} s" in flat()
    assert f"waits at most {commitment.SAME_ASSOCIATION_WAIT:g} s" in flat()


def test_live_commitment_report_on_the_same_association(live_node):
    """A listed peer asks about a stored instance, an unknown one, and the stored one under another class."""
    ct = live_node.ct
    unknown = generate_uid()
    scu = CommitmentSCU("SCU")
    status, transaction = scu.ask(live_node.port, [(ct.SOPClassUID, ct.SOPInstanceUID), (CTImageStorage, unknown),
                                                   (MRImageStorage, ct.SOPInstanceUID)])
    assert status == 0 and len(scu.reports) == 1
    event, info, how = scu.reports[0]
    assert how == "the same association" and event == commitment.FAILURES_EVENT
    assert (info.TransactionUID, info.RetrieveAETitle) == (transaction, "NNCODEC")
    (row,) = [r for r in table("commitment-events") if int(r[0]) == event]
    for name in ("Transaction UID", "Retrieve AE Title", "Referenced SOP Sequence", "Failed SOP Sequence"):
        assert name in row[2] and keyword_of(name) in info, name
    reasons = reason_codes()
    assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [ct.SOPInstanceUID]
    failed = {(str(i.ReferencedSOPInstanceUID), str(i.ReferencedSOPClassUID)): int(i.FailureReason)
              for i in info.FailedSOPSequence}
    assert failed == {(unknown, CTImageStorage): reasons["No such object instance"],
                      (ct.SOPInstanceUID, MRImageStorage): reasons["Class / instance conflict"]}
    status, _ = scu.ask(live_node.port, [(ct.SOPClassUID, ct.SOPInstanceUID)])
    assert status == 0 and scu.reports[-1][0] == commitment.SUCCESS_EVENT
    assert "FailedSOPSequence" not in scu.reports[-1][1]


def test_live_commitment_report_on_a_new_association(tmp_path):
    """The report goes on an association the node opens to the listed peer: the proposed context and roles."""
    seen: dict = {}
    got = threading.Event()

    def on_requested(event):
        rq = event.assoc.requestor.primitive
        seen["contexts"] = [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                            for cx in rq.presentation_context_definition_list]
        seen["roles"] = [(str(i.sop_class_uid), i.scu_role, i.scp_role) for i in rq.user_information
                         if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
        seen["calling"] = str(rq.calling_ae_title).strip()
        seen["implementation"] = str(rq.implementation_class_uid)

    def on_report(event):
        seen["event"] = int(event.request.EventTypeID)
        got.set()
        return 0x0000, None

    receiver = AE(ae_title="REPORTS")
    receiver.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = receiver.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, on_requested), (evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        peers = [{"ae_title": "REPORTS", "host": "127.0.0.1", "port": server.server_address[1]}]
        with running_node(tmp_path / "s", peers=peers, compression={"workers": 0},
                          commitment={"same_association": False}) as node:
            status, transaction = CommitmentSCU("REPORTS").ask(node.port, [(CTImageStorage, generate_uid())],
                                                               keep_open=False)
            assert status == 0 and got.wait(30)
            deadline = time.monotonic() + 10          # (recorded as delivered just after the response)
            while node.index.commitments()[transaction] != "delivered" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert node.index.commitments()[transaction] == "delivered"
    finally:
        server.shutdown()
    (row,) = table("commitment-proposed")
    abstract, syntaxes, role, ext = row
    (uid,) = re.findall(r"\b1\.2\.840\.10008[.0-9]*", abstract)
    assert uid == str(StorageCommitmentPushModel) and abstract.startswith(UID(uid).name.removesuffix(" SOP Class"))
    assert seen["contexts"] == [(uid, [uid_of_name(n.strip()) for n in syntaxes.split(",")])]
    scu_role, scp_role = (int(v) for v in re.findall(r"(?:SCU|SCP) role ([01])", ext))
    assert role == "SCP" and seen["roles"] == [(uid, bool(scu_role), bool(scp_role))] == [(uid, False, True)]
    assert seen["calling"] == "NNCODEC" and seen["implementation"] == str(dicom_nncodec.IMPLEMENTATION_CLASS_UID)
    assert seen["event"] == commitment.FAILURES_EVENT          # (an unknown instance: 0112)


# --- 4.4 configuration, 7.2 access, 7.1 TLS -------------------------------------------------------------

WHOLE = ("compression.lossy_ceilings",)       # mappings listed as one row (their own table: 5.3.1)


def leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and f"{prefix}{k}" not in WHOLE:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def test_configuration_table_is_the_default_file():
    defaults = leaves(yaml.safe_load(C.default_text()))
    rows = {r[0]: r[1] for r in table("configuration")}
    assert set(rows) == set(defaults), (sorted(set(defaults) - set(rows)), sorted(set(rows) - set(defaults)))
    for key, value in defaults.items():
        cell = rows[key]
        if key == "retrieve.transfer_syntaxes":
            assert [n.strip() for n in cell.split(",")] == value
        elif key == "compression.rules":
            assert [r["action"] for r in value] == ["lossless"] and "match" not in value[0]
            assert cell == "lossless for every supported image"
        elif key == "compression.lossy_ceilings":
            assert cell == "the DRG consensus ceilings of 5.3.1"
        elif isinstance(value, list):
            assert cell == "[]" and value == []
        else:
            assert cell == shown(value), key


def test_lossy_ceilings_table_is_the_default_configuration(defaults):
    """5.3.1: every ceiling of the default configuration, and what an instance of each row gets."""
    from scp import ceilings
    rows = table("lossy-ceilings")
    listed: dict[str, tuple[float | None, dict]] = {}
    for modality, body_parts, ceiling, _ in rows:
        ratio = float(ceiling.removesuffix(":1"))
        general, parts = listed.get(modality, (None, {}))
        if body_parts.startswith("none"):      # Body Part Examined absent: the modality's strictest ceiling
            samples = [""]
        elif body_parts in ("any", "any other"):
            general = ratio
            samples = ["CHEST"] if body_parts == "any other" else ["", "HEAD"]
        else:
            samples = [b.strip() for b in body_parts.split(",")]
            parts = {**parts, **{b: ratio for b in samples}}
        listed[modality] = (general, parts)
        for body_part in samples:
            assert ceilings.for_instance(defaults.lossy_ceilings, modality, body_part).ratio == ratio
    assert listed == {m: (c.ratio, c.body_parts) for m, c in defaults.lossy_ceilings.by_modality.items()}
    for modality in ("US", "NM", "PT", "OT"):                    # "A modality not listed ... has no ceiling"
        assert f"{modality}" in text() and modality not in listed
        assert ceilings.for_instance(defaults.lossy_ceilings, modality, "").ratio is None
    assert all(r.action != "ratio" for r in defaults.rules)


def test_access_defaults(defaults):
    import scp.handlers as H
    services = {"Verification (C-ECHO)": "echo", "Storage (C-STORE)": "store", "Query (C-FIND)": "find",
                "Retrieve (C-GET)": "get", "Retrieve (C-MOVE)": "move", "Storage Commitment (N-ACTION)": "store"}
    words = {"any calling AE title": "any", "listed peers only": "peers"}
    rows = table("access")
    assert sorted(r[0] for r in rows) == sorted(services)
    assert all(defaults.access[services[r[0]]] == words[r[1]] for r in rows)
    assert {services[r[0]] for r in rows} == set(defaults.access)
    assert all(r[2] == f"access.{services[r[0]]}" for r in rows)
    assert H.SERVICE_OF[StorageCommitmentPushModel] == services["Storage Commitment (N-ACTION)"]


def test_tls_is_stated_as_implemented():
    """Section 7.1 describes a TLS listener exactly when the configuration has one."""
    has_tls = "tls" in yaml.safe_load(C.default_text())
    described = "A second listener speaking DICOM over TLS" in text()
    assert described == has_tls
    if not has_tls:
        assert "not supported in this release" in text()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    try:
        return make_certificates(tmp_path_factory.mktemp("certs"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


def tls_config(certs, mode: str = "required", version: str = "1.2") -> C.Config:
    return C.load_dict({"tls": {"port": 0, "certificate": certs["server.crt"], "private_key": certs["server.key"],
                                "ca_certificates": certs["ca"], "client_certificates": mode,
                                "minimum_version": version}})


def test_tls_profile(certs):
    from scp import transport
    rows = {r[0]: r[1] for r in table("tls-profile")}
    assert list(rows) == ["Protocol versions", "TLS 1.2 cipher suites", "TLS 1.3 cipher suites", "Node certificate",
                          "Client certificates on the listener", "Server certificates of TLS peers",
                          "Revocation (CRL, OCSP)"]
    # versions: the ones the configuration allows, each the context's floor
    assert set(re.findall(r"\b1\.[0-9]\b", rows["Protocol versions"])) == set(C.TLS_VERSIONS)
    assert "1.2, the default" in rows["Protocol versions"] and C.load(None).tls.minimum_version == "1.2"
    for version in C.TLS_VERSIONS:
        ctx = transport.server_context(tls_config(certs, version=version).tls)
        assert ctx.minimum_version == getattr(ssl.TLSVersion, "TLSv1_" + version.split(".")[1])
    # cipher suites: the stated OpenSSL string gives exactly the node's TLS 1.2 suites, all forward-secret AEAD
    (cipher_string,) = re.findall(r"[A-Z0-9]+\+[A-Z0-9]+(?::[A-Z0-9]+\+[A-Z0-9]+)+", rows["TLS 1.2 cipher suites"])
    stated = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stated.set_ciphers(cipher_string)
    node_ctx = transport.server_context(tls_config(certs).tls)
    suites = [c for c in node_ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert {c["name"] for c in suites} == {c["name"] for c in stated.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in suites)
    assert all(c["aead"] for c in node_ctx.get_ciphers() if c["protocol"] == "TLSv1.3")
    # client certificates: the modes, and the CAs they are verified against (the configured file only)
    modes = re.findall(r"\b(none|optional|required)\b", rows["Client certificates on the listener"])
    assert modes == list(C.CLIENT_CERTIFICATES)
    assert "against tls.ca_certificates only" in rows["Client certificates on the listener"]
    for mode, verify in zip(C.CLIENT_CERTIFICATES, (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED)):
        ctx = transport.server_context(tls_config(certs, mode).tls)
        assert ctx.verify_mode == verify and len(ctx.get_ca_certs()) == (0 if mode == "none" else 1)
    # outgoing TLS: chain and host name verified; which CAs are trusted is what the statement (9.3) says
    client = transport.client_context(tls_config(certs).tls)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    system_too = len(client.get_ca_certs()) > 1
    assert ("also the operating system's trusted CAs" in rows["Server certificates of TLS peers"]) == system_too
    assert ("Outgoing TLS also trusts the operating system's CAs" in text()) == system_too
    # no revocation checking on either side
    crl = ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_CRL_CHECK_CHAIN
    assert rows["Revocation (CRL, OCSP)"].startswith("not checked")
    assert not (node_ctx.verify_flags & crl) and not (client.verify_flags & crl)
