"""Access: DICOM TLS, AE title and host checks per peer, and the limits on associations, PDUs,
data sets and time that keep one peer from stalling or exhausting the node."""
from __future__ import annotations

import logging
import socket
import struct
import time

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (CTImageStorage, SecondaryCaptureImageStorage,
                                  StudyRootQueryRetrieveInformationModelFind, Verification)

from scp import config as C
from scp.testing import client_tls, make_certificates, running_node, send
from tests.imaging import make_dataset, smooth_image


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    try:
        return make_certificates(tmp_path_factory.mktemp("certs"))
    except RuntimeError as exc:
        pytest.skip(str(exc))


def tls_settings(certs, **extra):
    return {"port": 0, "certificate": certs["server.crt"], "private_key": certs["server.key"],
            "ca_certificates": certs["ca"], **extra}


def associate(port, calling="SCU", called="NNCODEC", contexts=(Verification,), **kwargs):
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title=called, **kwargs)


def released(assoc) -> bool:
    """True (after releasing it) when ``assoc`` was established."""
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def ct(seed=0):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the node closes ``sock`` within ``seconds`` (whatever it sent before)."""
    sock.settimeout(0.25)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


# --- TLS ---------------------------------------------------------------------------------------------

def test_mutual_tls_beside_the_plain_port(tmp_path, certs, caplog):
    caplog.set_level(logging.WARNING, "scp.transport")
    with running_node(tmp_path / "s", compression={"workers": 0},
                      tls=tls_settings(certs, client_certificates="required")) as node:
        assert node.port and node.tls_port and node.port != node.tls_port
        assoc = associate(node.tls_port, contexts=[Verification, CTImageStorage], tls_args=client_tls(certs))
        assert assoc.is_established
        tls_socket = assoc.dul.socket.socket
        assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(ct()).Status == 0
        assoc.release()
        assert released(associate(node.port))                                    # plain stays open
        assert not associate(node.tls_port, tls_args=client_tls(certs, client=None)).is_established
        assert not associate(node.tls_port, tls_args=client_tls(certs, client="rogue")).is_established
        assert not associate(node.tls_port).is_established                       # plain TCP to the TLS port
        assert node.index.stats()["instances"] == 1
    assert sum("TLS connection from 127.0.0.1 refused" in r.getMessage() for r in caplog.records) >= 2


def test_optional_client_certificates_and_tls_only(tmp_path, certs):
    with running_node(tmp_path / "s", port=None, compression={"workers": 0},
                      tls=tls_settings(certs, client_certificates="optional", minimum_version="1.3")) as node:
        assert node.port is None
        assert released(associate(node.tls_port, tls_args=client_tls(certs, client=None)))
        assert released(associate(node.tls_port, tls_args=client_tls(certs)))
        assert not associate(node.tls_port, tls_args=client_tls(certs, client="rogue")).is_established
        ctx, host = client_tls(certs)
        import ssl
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2                            # below minimum_version 1.3
        assert not associate(node.tls_port, tls_args=(ctx, host)).is_established


def test_a_silent_client_does_not_block_the_tls_listener(tmp_path, certs):
    with running_node(tmp_path / "s", compression={"workers": 0}, tls=tls_settings(certs),
                      limits={"acse_timeout": 2}) as node:
        silent = socket.create_connection(("127.0.0.1", node.tls_port))       # never starts the handshake
        try:
            started = time.monotonic()
            assoc = associate(node.tls_port, tls_args=client_tls(certs, client=None))
            assert assoc.is_established and time.monotonic() - started < 2
            assoc.release()
            assert closed_within(silent, 6)                                    # dropped after acse_timeout
        finally:
            silent.close()


def test_a_tls_peer_is_recognised_only_over_tls(tmp_path, certs, caplog):
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 1, "allow": ["echo", "find"], "tls": True}]
    with running_node(tmp_path / "s", peers=peers, compression={"workers": 0}, tls=tls_settings(certs)) as node:
        contexts = (Verification, StudyRootQueryRetrieveInformationModelFind)
        plain = associate(node.port, "VIEWER", contexts=contexts)
        assert plain.is_rejected
        assoc = associate(node.tls_port, "VIEWER", contexts=contexts, tls_args=client_tls(certs))
        assert len(assoc.accepted_contexts) == 2
        assoc.release()
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_c_move_to_a_tls_peer_goes_over_tls_with_the_node_certificate(tmp_path, certs):
    import ssl
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    from scp.testing import StorageSCP, move
    dest = StorageSCP("TLSDEST")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED                  # the destination wants the node's own certificate
    ctx.load_cert_chain(certs["client.crt"], certs["client.key"])
    from pynetdicom import evt
    dest.server = dest.ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx,
                                       evt_handlers=[(evt.EVT_C_STORE, dest._on_store)])
    try:
        peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1},
                 {"ae_title": "TLSDEST", "host": "127.0.0.1", "port": dest.port, "tls": True}]
        with running_node(tmp_path / "s", peers=peers, compression={"workers": 0}, tls=tls_settings(certs)) as node:
            ds = ct()
            assert send(node.port, [ds]) == [0]
            q = Dataset()
            q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
            final = move(node.port, q, "TLSDEST", MOVE)
            assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 1)
            assert [str(d.SOPInstanceUID) for _, d in dest.received] == [ds.SOPInstanceUID]
    finally:
        dest.stop()


@pytest.mark.parametrize("tls, path, reason", [
    ({"port": 0}, "tls.certificate", "required when tls.port"),
    ({"client_certificates": "sometimes"}, "tls.client_certificates", "one of none, optional, required"),
    ({"minimum_version": "1.1"}, "tls.minimum_version", "one of 1.2, 1.3"),
    ({"certificate": "/nonexistent.pem"}, "tls.certificate", "no such file"),
])
def test_tls_configuration_errors_name_the_key(tls, path, reason):
    with pytest.raises(C.ConfigError) as info:
        C.load_dict({"tls": tls})
    assert path in str(info.value) and reason in str(info.value)


def test_unusable_tls_files_stop_start_up(tmp_path, certs):
    from scp.node import Node
    from scp.testing import node_config
    cfg = node_config(tmp_path / "s", tls=tls_settings(certs, certificate=certs["client.crt"]))   # wrong key
    with pytest.raises(C.ConfigError) as info:
        Node(cfg).start()
    assert "tls.certificate" in str(info.value)


def test_port_null_needs_tls_and_a_tls_peer_needs_the_listener():
    with pytest.raises(C.ConfigError, match="port: may be null only"):
        C.load_dict({"port": None})
    with pytest.raises(C.ConfigError, match=r"peers\[0\].tls: needs the TLS listener"):
        C.load_dict({"peers": [{"ae_title": "A", "host": "h", "port": 1, "tls": True}]})


# --- AE titles and hosts -----------------------------------------------------------------------------

def test_called_ae_and_peer_host_checks(tmp_path, caplog):
    peers = [{"ae_title": "FARAWAY", "host": "192.0.2.77", "port": 104},
             {"ae_title": "LOCAL", "host": "127.0.0.1", "port": 104, "allow": ["find"]}]
    with running_node(tmp_path / "s", peers=peers, access={"check_called_ae": True, "check_peer_host": True},
                      compression={"workers": 0}) as node:
        assert associate(node.port, called="SOMEONE").is_rejected
        assert released(associate(node.port, "STRANGER"))                 # echo is open to anyone
        impostor = associate(node.port, "FARAWAY")                        # a listed peer, from the wrong host
        assert impostor.is_rejected
        local = associate(node.port, "LOCAL", contexts=(Verification, StudyRootQueryRetrieveInformationModelFind))
        assert [cx.abstract_syntax for cx in local.accepted_contexts] == [StudyRootQueryRetrieveInformationModelFind]
        local.release()
    assert any("connected from 127.0.0.1, not from 192.0.2.77" in r.getMessage() for r in caplog.records)


# --- limits ------------------------------------------------------------------------------------------

def test_association_limit_counts_both_listeners(tmp_path, certs):
    with running_node(tmp_path / "s", compression={"workers": 0}, tls=tls_settings(certs),
                      limits={"max_associations": 2}) as node:
        a = associate(node.port)
        b = associate(node.tls_port, tls_args=client_tls(certs, client=None))
        assert a.is_established and b.is_established
        c = associate(node.port)
        assert c.is_rejected and c.acceptor.primitive.result_source == 3      # local limit exceeded
        a.release()
        time.sleep(0.3)
        d = associate(node.port)
        assert d.is_established
        for assoc in (b, d):
            assoc.release()


def big_image(rows=1024, cols=1024):
    return make_dataset(smooth_image(rows, cols, 16)[None], 16, 16)     # 2 MiB of pixel data


def test_an_instance_over_max_instance_mb_is_answered_a700_and_the_association_goes_on(tmp_path, caplog):
    with running_node(tmp_path / "s", compression={"workers": 0}, limits={"max_instance_mb": 1}) as node:
        small = ct()
        assert send(node.port, [big_image(), small]) == [0xA700, 0]        # one association, in this order
        st = node.index.stats()
        assert st["instances"] == 1 and "max_instance_mb" in st["recent_failures"][0].reason
    assert any("larger than limits.max_instance_mb" in r.getMessage() for r in caplog.records)


def test_a_pdu_over_max_pdu_size_closes_that_connection_only(tmp_path, caplog):
    with running_node(tmp_path / "s", compression={"workers": 0}, limits={"max_pdu_size": 16384}) as node:
        assoc = associate(node.port, contexts=[SecondaryCaptureImageStorage])
        assert assoc.acceptor.maximum_length == 16384
        from pynetdicom.pdu_primitives import MaximumLengthNotification
        for item in assoc.acceptor.user_information:       # a peer that ignores what the node said
            if isinstance(item, MaximumLengthNotification):
                item.maximum_length_received = 0
        try:
            status = assoc.send_c_store(big_image(256, 256))
        except RuntimeError:                              # (pynetdicom: the association is gone)
            status = {}
        assert "Status" not in status                     # no answer: the node closed the connection
        assoc.abort()
        assert send(node.port, [ct()]) == [0]
        assert node.index.stats()["instances"] == 1
    assert any("it sent a PDU of" in r.getMessage() for r in caplog.records)


def test_a_peer_stalling_inside_a_pdu_is_dropped_after_network_timeout(tmp_path):
    with running_node(tmp_path / "s", compression={"workers": 0},
                      limits={"network_timeout": 1, "acse_timeout": 30}) as node:
        stalled = socket.create_connection(("127.0.0.1", node.port))
        try:
            stalled.sendall(struct.pack(">BBL", 0x01, 0, 4096) + b"\x00\x01")   # an A-ASSOCIATE-RQ cut short
            assert closed_within(stalled, 5)
        finally:
            stalled.close()
        assert released(associate(node.port))


@pytest.mark.parametrize("data", [
    struct.pack(">BBL", 0x01, 0, 2**31),                       # an association request of 2 GiB
    struct.pack(">BBL", 0x09, 0, 4) + b"junk",                 # no such PDU type
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["huge-a-associate-rq", "unknown-pdu", "http"])
def test_garbage_and_absurd_pdus_close_the_connection(tmp_path, data):
    with running_node(tmp_path / "s", compression={"workers": 0}, limits={"acse_timeout": 1, "network_timeout": 2}) as node:
        sock = socket.create_connection(("127.0.0.1", node.port))
        try:
            sock.sendall(data)
            assert closed_within(sock, 5)
        finally:
            sock.close()
        assert released(associate(node.port))


def test_defaults_are_bounded():
    cfg = C.load(None)
    assert cfg.max_associations == 16 and cfg.max_pdu_size == 65536
    assert cfg.max_instance_mb == 2048 and cfg.max_pixels == 2**30
    assert None not in (cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout)
    assert cfg.tls.port is None and cfg.tls.minimum_version == "1.2"
    assert np.isfinite(cfg.commitment_retry_seconds)
