"""The node's listeners: TLS, timeouts on every socket, and limits on what a peer may send.

Why not pynetdicom's own server as it is: it performs the TLS handshake in the
thread that accepts connections, with no timeout, so one client that connects
and says nothing stops every other client from getting in; the sockets it
accepts have no timeout, so a peer that stops in the middle of a PDU holds its
association (and one of ``limits.max_associations``) for ever; and it reads a
PDU of any announced length into memory.  Here each connection gets its own
thread for the handshake (bounded by ``acse_timeout``), its socket a timeout
(``network_timeout``), and its reads two limits: a PDU longer than
``max_pdu_size`` closes the connection, and data-set bytes beyond
``max_instance_mb`` in one message are dropped as they arrive (the message still
completes, and the C-STORE handler answers A700 for it).  Every C-STORE
request gets a C-STORE response (:class:`NodeAssociation`), also one that
pynetdicom would ignore or give to another service.  pynetdicom is pinned to
3.0.x; the names used from its internals are ``AssociationSocket.recv``
(called with 6, then with the PDU length), the request handler's
``_create_association`` and the association's ``_serve_request`` (with its
``_accepted_cx``, ``_sent_release`` and ``_is_paused``).
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from datetime import datetime

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from . import checks
from . import config as C

log = logging.getLogger("scp.transport")

P_DATA_TF = 0x04
OTHER_PDU_LIMIT = 1 << 20      # A-ASSOCIATE-RQ with many contexts stays far below this
PDU_SLACK = 64                 # implementations differ on whether the limit counts PDV item headers
IDLE_POLL = 0.005              # seconds (pynetdicom: 0.001); only while nothing arrives, so transfers keep their speed


# --- TLS ------------------------------------------------------------------------------------------

def _base_context(purpose: ssl.Purpose, tls: C.TLS) -> ssl.SSLContext:
    # a bare context: only the CAs of tls.ca_certificates are trusted, never the system's
    # (PROTOCOL_TLS_CLIENT checks the peer's certificate and host name by default)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.minimum_version == "1.3" else ssl.TLSVersion.TLSv1_2
    # BCP 195: forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are all of that kind)
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    return ctx


def server_context(tls: C.TLS) -> ssl.SSLContext:
    """The TLS listener's context; a file that cannot be used stops start-up naming its key."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, tls)
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise C.ConfigError("tls.certificate", f"cannot use the certificate and private key ({exc})") from None
    if tls.client_certificates != "none":
        try:
            ctx.load_verify_locations(tls.ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            raise C.ConfigError("tls.ca_certificates", f"cannot use the CA certificates ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_certificates == "required" else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: C.TLS) -> ssl.SSLContext:
    """For associations this node opens to a ``tls: true`` peer: the peer's certificate must chain to
    ``tls.ca_certificates`` and name its host; this node's own certificate is presented."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, tls)
    try:
        if tls.ca_certificates:
            ctx.load_verify_locations(tls.ca_certificates)
        if tls.certificate:
            ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise C.ConfigError("tls", f"cannot use the TLS files for outgoing associations ({exc})") from None
    return ctx


def tls_args(cfg: C.Config, peer: C.Peer) -> dict:
    """``associate()`` keyword arguments for an association this node opens to ``peer``."""
    return {"tls_args": (client_context(cfg.tls), peer.host)} if peer.tls else {}


def is_tls(assoc) -> bool:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return isinstance(sock, ssl.SSLSocket)


# --- limits on what is read -------------------------------------------------------------------------

class GuardedSocket(AssociationSocket):
    """An acceptor's socket that enforces the PDU and data-set limits while reading."""

    pdu_limit: int
    dataset_limit: int

    def guard(self, pdu_limit: int, dataset_limit: int) -> None:
        self.pdu_limit, self.dataset_limit = pdu_limit, dataset_limit
        self._body: bytearray | None = None
        self._dataset_bytes = 0       # data-set bytes of the message being received
        self.oversized = False        # the message's data set went past the limit (read by the handler)

    def take_oversized(self) -> bool:
        """True once after a message whose data set was cut (the C-STORE handler asks)."""
        was, self.oversized = self.oversized, False
        return was

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body is not None:               # the body of a PDU already read and checked
            body, self._body = self._body, None
            return body
        header = super().recv(nr_bytes)
        if nr_bytes != 6 or len(header) != 6:
            return header
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self.pdu_limit if pdu_type == P_DATA_TF else OTHER_PDU_LIMIT
        if limit and length > limit:
            log.warning("closing the connection from %s: it sent a PDU of %d bytes (limit %d, limits.max_pdu_size)",
                        self.assoc.requestor.address, length, limit)
            return bytearray()                   # pynetdicom treats a short header as a closed connection
        if pdu_type != P_DATA_TF:
            return header
        body = super().recv(length)
        if len(body) == length:
            body = self._cap_datasets(body)
        self._body = body
        return bytearray(struct.pack(">BBL", pdu_type, 0, len(body)))

    def _cap_datasets(self, body: bytearray) -> bytearray:
        """The P-DATA-TF body with data-set fragment bytes past the limit left out (items kept)."""
        items, cut, pos = [], False, 0
        while pos + 6 <= len(body):
            item_len = struct.unpack_from(">L", body, pos)[0]
            end = pos + 4 + item_len
            if item_len < 2 or end > len(body):
                return body                      # malformed: let pynetdicom refuse it
            control = body[pos + 5]
            drop = False
            if control & 1:                      # command fragment: a new message starts
                self._dataset_bytes = 0
            else:
                self._dataset_bytes += item_len - 2
                if self._dataset_bytes > self.dataset_limit:
                    if not self.oversized:
                        log.warning("data set from %s is larger than limits.max_instance_mb: the rest is discarded",
                                    self.assoc.requestor.address)
                    self.oversized = drop = cut = True
                if control & 2:                  # last fragment of the data set
                    self._dataset_bytes = 0
            items.append((pos, end, drop))
            pos = end
        if not cut:
            return body
        out = bytearray()
        for pos, end, drop in items:
            out += struct.pack(">L", 2) + body[pos + 4:pos + 6] if drop else body[pos:end]
        return out


# --- C-STORE requests pynetdicom would not give to the Storage service ----------------------------------

def _misrouted_store(msg) -> bool:
    """A C-STORE request that pynetdicom would drop without an answer (a required command element, such as
    the Affected SOP Instance UID, empty or missing) or hand to the service of its Affected SOP Class UID
    (a C-ECHO response for the Verification class, an abort for a query model)."""
    if not isinstance(msg, C_STORE) or msg.MessageIDBeingRespondedTo is not None or msg.Status is not None:
        return False       # (a response)
    return not msg.is_valid_request or str(msg.AffectedSOPClassUID or "") not in checks.STORAGE_CLASSES


class NodeAssociation(Association):
    """An acceptor's association that answers every C-STORE request with a C-STORE response.

    pynetdicom picks the service for a request by its Affected SOP Class UID, not by the message type
    or the presentation context, and ignores a request that lacks a required element; such a request
    is given to the Storage service here, whose handler (``scp.handlers.handle_store``, through
    ``scp.checks.check_request``) refuses it with a failure status and a log line."""

    def _serve_request(self, msg, context_id: int) -> None:
        if not _misrouted_store(msg) or self._sent_release or context_id not in self._accepted_cx:
            super()._serve_request(msg, context_id)       # (an unknown context: pynetdicom aborts)
            return
        if msg.MessageID is None:      # no Message ID to answer to: the peer is told by an abort, not silence
            log.warning("C-STORE request from %s without a Message ID: association aborted", self.requestor.address)
            self.abort()
            return
        try:
            self.dimse.cancel_req = {}
            self._is_paused = True
            StorageServiceClass(self).SCP(msg, self._accepted_cx[context_id])
            self._is_paused = False
        except Exception:
            log.exception("C-STORE request from %s could not be answered: association aborted",
                          self.requestor.address)
            self.abort()


class _Handler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        assoc.__class__ = NodeAssociation
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket           # (constructing a second socket would queue a second Evt5)
        sock.guard(*self.server.limits)
        assoc.dul._run_loop_delay = IDLE_POLL    # an idle association polls its socket less often
        return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the handshake moved into the connection's own thread."""

    def __init__(self, *args, tls_context: ssl.SSLContext | None = None, limits=(0, 0), handshake_timeout=None,
                 network_timeout=None, **kwargs):
        self.tls_context, self.limits = tls_context, limits
        self.handshake_timeout, self.network_timeout = handshake_timeout, network_timeout
        super().__init__(*args, request_handler=_Handler, **kwargs)

    def get_request(self):
        assert self.socket is not None
        return self.socket.accept()

    def finish_request(self, request, client_address) -> None:
        try:
            request.settimeout(self.handshake_timeout)
            if self.tls_context is not None:
                request = self.tls_context.wrap_socket(request, server_side=True)
            request.settimeout(self.network_timeout)
        except (OSError, ValueError) as exc:
            log.warning("TLS connection from %s refused: %s", client_address[0], _reason(exc))
            _close(request)
            return
        super().finish_request(request, client_address)


def _reason(exc: Exception) -> str:
    if isinstance(exc, socket.timeout):
        return "no TLS handshake within limits.acse_timeout"
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


def start_listener(ae, cfg: C.Config, port: int, handlers: list, tls: bool) -> NodeServer:
    """A running listener on ``cfg.bind``:``port`` (TLS when ``tls``) serving ``ae``'s contexts."""
    limits = (cfg.max_pdu_size + PDU_SLACK if cfg.max_pdu_size else cfg.max_instance_mb * 2**20 + PDU_SLACK,
              cfg.max_instance_mb * 2**20)
    server = ae.make_server((cfg.bind, port), evt_handlers=handlers, server_class=NodeServer,
                            tls_context=server_context(cfg.tls) if tls else None, limits=limits,
                            handshake_timeout=cfg.acse_timeout, network_timeout=cfg.network_timeout)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server

