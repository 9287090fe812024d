"""Storage Commitment Push Model: commitment only for what is durably kept (and, for private-syntax
data that arrived as it is, decodes); the report on the same association or on a new one; requests
survive a restart."""
from __future__ import annotations

import pytest

import logging
import os
import time

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, StorageCommitmentPushModel,
                                  StorageCommitmentPushModelInstance)

import dicom_nncodec
from scp.status import report_for
from scp.index import Instance
from scp.node import Node
from scp.testing import CommitmentSCU, node_config, running_node, send
from tests.test_node_fsck import damage_payload

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")


def read(name="CT_small.dcm"):
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def refs_of(*datasets):
    return [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets]


def outcome(info: Dataset) -> tuple[set[str], dict[str, int]]:
    ok = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.get("FailedSOPSequence", [])}
    return ok, failed


def path_of(node, uid):
    with node.index.session() as s:
        return node.storage.abspath(s.query(Instance).filter_by(sop_uid=uid).one().path)


def test_commitment_on_the_same_association_with_every_failure_reason(tmp_path, caplog):
    caplog.set_level(logging.INFO, "scp.commitment")
    kept, compressed, private, damaged, lost = read(), read(), read(), read(), read()
    dicom_nncodec.compress(private, device="cpu")                 # arrives in the private syntax
    dicom_nncodec.compress(damaged, device="cpu")
    with running_node(tmp_path / "s") as node:
        assert send(node.port, [compressed]) == [0]
        assert node.compressor.wait_idle(60)                       # compressed here: verified when it was made
        node.compressor.stop(5)
        assert send(node.port, [kept, private, damaged, lost]) == [0] * 4
        damage_payload(path_of(node, damaged.SOPInstanceUID))
        os.unlink(path_of(node, lost.SOPInstanceUID))
        scu = CommitmentSCU()
        unknown = generate_uid()
        status, transaction = scu.ask(node.port, refs_of(kept, compressed, private, damaged, lost) + [
            (CTImageStorage, unknown), (MRImageStorage, kept.SOPInstanceUID)])
        assert status == 0 and len(scu.reports) == 1
        event, info, how = scu.reports[0]
        assert (event, how, info.TransactionUID, info.RetrieveAETitle) == (2, "the same association", transaction,
                                                                          "NNCODEC")
        ok = {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
        failed = sorted((str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in info.FailedSOPSequence)
        assert ok == {kept.SOPInstanceUID, compressed.SOPInstanceUID, private.SOPInstanceUID}
        assert failed == sorted([(damaged.SOPInstanceUID, 0x0110), (lost.SOPInstanceUID, 0x0110), (unknown, 0x0112),
                                 (kept.SOPInstanceUID, 0x0119)])          # asked about as MR: class conflict
        assert node.index.commitments() == {transaction: "delivered"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("do not decode" in m and damaged.SOPInstanceUID in m for m in messages)
    assert any("3 of 7 instances committed, report sent on the same association" in m for m in messages)


def test_all_committed_is_event_type_1_and_near_lossless_originals_are_not(tmp_path):
    ct, mr = read(), read("MR_small.dcm")
    rules = [{"match": {"modality": ["MR"]}, "action": {"max_error": 2}}, {"action": "lossless"}]
    with running_node(tmp_path / "s", compression={"rules": rules}) as node:
        assert send(node.port, [ct, mr]) == [0, 0]
        scu = CommitmentSCU()
        scu.ask(node.port, refs_of(ct))
        assert scu.reports[-1][0] == 1 and outcome(scu.reports[-1][1]) == ({ct.SOPInstanceUID}, {})
        scu.ask(node.port, refs_of(mr))                           # pending or done: the original is not kept
        assert outcome(scu.reports[-1][1])[1] == {mr.SOPInstanceUID: 0x0110}
        assert node.compressor.wait_idle(60)
        scu.ask(node.port, refs_of(mr))
        assert outcome(scu.reports[-1][1])[1] == {mr.SOPInstanceUID: 0x0110}


def test_no_commitment_without_fsync(tmp_path):
    ds = read()
    with running_node(tmp_path / "s", storage={"fsync": False}, compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [0]
        scu = CommitmentSCU()
        scu.ask(node.port, refs_of(ds))
        assert outcome(scu.reports[-1][1]) == (set(), {ds.SOPInstanceUID: 0x0110})


def test_report_on_a_new_association_and_after_a_restart(tmp_path):
    ds = read()
    scu = CommitmentSCU("SENDER")
    try:
        port = scu.listen()
        peers = [{"ae_title": "SENDER", "host": "127.0.0.1", "port": port}]
        cfg = node_config(tmp_path / "s", peers=peers, compression={"workers": 0},
                          commitment={"retry_seconds": 0.5})
        node = Node(cfg).start()
        try:
            assert send(node.port, [ds], calling_ae="SENDER") == [0]
            status, first = scu.ask(node.port, refs_of(ds), keep_open=False)    # gone before the report
            assert status == 0 and scu.wait(30)
            assert scu.reports[-1][2] == "a new association"
            assert outcome(scu.reports[-1][1]) == ({ds.SOPInstanceUID}, {})
            node.commitments.stop()                    # as if the node died right after answering the N-ACTION
            scu._got.clear()
            status, second = scu.ask(node.port, refs_of(ds), keep_open=False)
            assert status == 0 and not scu.wait(1)
        finally:
            node.stop()
        assert node.index.commitments()[second] == "pending"         # recorded before the N-ACTION was answered
        with running_node(tmp_path / "s", peers=peers, compression={"workers": 0},
                          commitment={"retry_seconds": 0.5}) as again:
            assert scu.wait(30) and scu.reports[-1][1].TransactionUID == second
            deadline = time.monotonic() + 10
            while again.index.commitments()[second] != "delivered" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert again.index.commitments() == {first: "delivered", second: "delivered"}
            assert "commit   2 delivered" in report_for(again.cfg)
    finally:
        scu.stop()


def test_same_association_off_and_unreachable_requestors(tmp_path, caplog):
    ds = read()
    with running_node(tmp_path / "s", compression={"workers": 0},
                      commitment={"same_association": False}) as node:
        assert send(node.port, [ds]) == [0]
        scu = CommitmentSCU("STRANGER")
        status, transaction = scu.ask(node.port, refs_of(ds), wait=3)
        assert status == 0 and scu.reports == []                   # not a listed peer: nowhere to send it
        deadline = time.monotonic() + 10
        while node.index.commitments()[transaction] != "given_up" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.index.commitments()[transaction] == "given_up"
    assert any("STRANGER is not listed under peers" in r.getMessage() for r in caplog.records)


def n_action(port, info, action_type=1, instance=StorageCommitmentPushModelInstance, calling="SCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
    try:
        if not assoc.is_established:
            return None
        status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def info(transaction=None, refs=((CTImageStorage, "1.2.3"),)) -> Dataset:
    ds = Dataset()
    if transaction is not False:
        ds.TransactionUID = transaction or generate_uid()
    if refs is not None:
        ds.ReferencedSOPSequence = []
        for sop_class, sop_uid in refs:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_uid:
                item.ReferencedSOPInstanceUID = sop_uid
            ds.ReferencedSOPSequence.append(item)
    return ds


def test_malformed_commitment_requests(tmp_path, caplog):
    with running_node(tmp_path / "s", compression={"workers": 0}, access={"store": "peers"},
                      peers=[{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]) as node:
        assert n_action(node.port, info(), action_type=2) == 0x0123
        assert n_action(node.port, info(), instance="1.2.3.4") == 0x0112
        assert n_action(node.port, info(transaction=False)) == 0x0115
        assert n_action(node.port, info(transaction="../../x")) == 0x0115
        assert n_action(node.port, info(refs=None)) == 0x0115
        assert n_action(node.port, info(refs=[(CTImageStorage, None)])) == 0x0115
        assert n_action(node.port, info(), calling="STRANGER") is None        # not allowed to store: no context
        assert n_action(node.port, info()) == 0
    refused = [r.getMessage() for r in caplog.records if "storage commitment from" in r.getMessage()]
    assert len(refused) == 6 and all("refused (0x01" in m for m in refused)
