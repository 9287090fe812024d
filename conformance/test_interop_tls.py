"""DICOM TLS with DCMTK (echoscu, storescu, findscu, movescu, storescp with +tls): section 7.1 of the
statement.  A throw-away CA, server and client certificates are made with openssl; the node runs its
TLS listener with client certificates required, next to its plain port.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml
from pydicom import dcmread

from scp import config as C

pytestmark = pytest.mark.interop

SCU = "TLSSCU"          # a listed peer with tls: true
DEST = "TLSDEST"        # storescp over TLS, a listed peer with tls: true


@pytest.fixture(scope="module")
def pki(tmp_path_factory, helpers):
    if "tls" not in yaml.safe_load(C.default_text()):
        pytest.skip("this release of the node has no TLS listener (CONFORMANCE.md 7.1)")
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found (needed to make test certificates): apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")

    def ssl(*args):
        helpers.run([openssl, *args], cwd=str(d))
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=interop test CA")
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


@pytest.fixture(scope="module")
def node(node_factory, dcmtk, pki, helpers):
    ports = {"tls": helpers.free_port(), "dest": helpers.free_port()}
    peers = [{"ae_title": SCU, "host": "127.0.0.1", "port": helpers.free_port(), "tls": True},
             {"ae_title": DEST, "host": "127.0.0.1", "port": ports["dest"], "allow": ["echo", "store"], "tls": True}]
    n = node_factory(peers, tls={"port": ports["tls"], "certificate": str(pki / "server.crt"),
                                 "private_key": str(pki / "server.key"), "client_certificates": "required",
                                 "ca_certificates": str(pki / "ca.crt")})
    n.tls_port, n.dest_port = ports["tls"], ports["dest"]
    return n


def tls_client(pki):
    return ["+tls", pki / "client.key", pki / "client.crt", "+cf", pki / "ca.crt"]


def test_echo_over_tls_with_a_client_certificate(node, dcmtk, pki, helpers):
    out = helpers.run([dcmtk["echoscu"], "-v", *tls_client(pki), "-aet", SCU, "-aec", "NNCODEC", "127.0.0.1",
                       node.tls_port])
    assert "Received Echo Response (Success)" in out.text


def test_no_client_certificate_no_association(node, dcmtk, pki, helpers):
    out = helpers.run([dcmtk["echoscu"], "+tla", "+cf", pki / "ca.crt", "-aet", "ANYONE", "-aec", "NNCODEC",
                       "127.0.0.1", node.tls_port], check=False)
    assert out.returncode != 0


def test_plain_dicom_on_the_tls_port_fails(node, dcmtk, helpers):
    out = helpers.run([dcmtk["echoscu"], "-to", "5", "-ta", "5", "-aet", "ANYONE", "-aec", "NNCODEC", "127.0.0.1",
                       node.tls_port], check=False, timeout=60)
    assert out.returncode != 0


def test_a_tls_peer_is_refused_on_the_plain_port(node, dcmtk, helpers):
    out = helpers.run([dcmtk["echoscu"], "-aet", SCU, "-aec", "NNCODEC", "127.0.0.1", node.port], check=False)
    assert out.returncode != 0 and "Success" not in out.text


def test_store_and_find_over_tls(node, dcmtk, pki, sent, helpers, tmp_path):
    ct = next(s for s in sent.instances if s.source == "CT_small.dcm" and s.transfer_syntax.endswith(".1.2.1"))
    helpers.run([dcmtk["storescu"], *tls_client(pki), "-aet", SCU, "-aec", "NNCODEC", "127.0.0.1", node.tls_port,
                 ct.path])
    assert ct.sop_uid in node.instances()
    rsp_dir = tmp_path / "find"
    rsp_dir.mkdir()
    helpers.run([dcmtk["findscu"], "-S", *tls_client(pki), "-aet", SCU, "-aec", "NNCODEC", "-X", "-od", rsp_dir,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct.study_uid}", "-k", "PatientID",
                 "127.0.0.1", node.tls_port])
    assert [str(dcmread(p).StudyInstanceUID) for p in rsp_dir.iterdir()] == [ct.study_uid]


def test_move_to_a_tls_destination(node, dcmtk, pki, sent, helpers, tmp_path):
    ct = next(s for s in sent.instances if s.source == "CT_small.dcm" and s.transfer_syntax.endswith(".1.2.1"))
    if ct.sop_uid not in node.instances():
        helpers.run([dcmtk["storescu"], *tls_client(pki), "-aet", SCU, "-aec", "NNCODEC", "127.0.0.1",
                     node.tls_port, ct.path])
    # the destination: a DCMTK storescp that speaks TLS only; the node must check its certificate
    # against the CA and its host.  DCMTK's movescu has no TLS, so the C-MOVE comes from pynetdicom.
    out_dir = tmp_path / "moved"
    out_dir.mkdir()
    dest = subprocess.Popen([dcmtk["storescp"], "+tls", pki / "server.key", pki / "server.crt", "+cf", pki / "ca.crt",
                             "-aet", DEST, "-od", out_dir, str(node.dest_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        helpers.wait_until(lambda: _listening(node.dest_port), 30, "storescp to listen")
        final = _move_over_tls(pki, node.tls_port, ct)
    finally:
        dest.terminate()
        dest.wait(30)
    assert final.Status == 0, f"{final}\n{node.log()[-3000:]}"
    files = helpers.dicom_files(out_dir)
    assert [str(dcmread(f).SOPInstanceUID) for f in files] == [ct.sop_uid]
    sent.assert_same_pixels(files)


def _listening(port) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        time.sleep(0.1)
        return False


def _move_over_tls(pki, port, ct):
    import ssl
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    ae = AE(ae_title=SCU)
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC", tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = ct.study_uid, ct.series_uid, ct.sop_uid
    final = None
    try:
        for status, _ in assoc.send_c_move(q, DEST, MOVE):
            if status is not None and status.Status != 0xFF00:
                final = status
    finally:
        assoc.release()
    return final
