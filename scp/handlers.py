"""pynetdicom event handlers: one short function per event, each delegating to a service.

Why thin: query logic lives in query.py, file layout in storage.py, codec
calls in compressor.py and transcode.py; a handler only translates between
pynetdicom's event/generator protocol and those services, and logs.  At INFO
the log names AE titles, addresses, UIDs and counts, never patient data.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pynetdicom import build_context, evt
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, StorageCommitmentPushModel,
                                  Verification)

import dicom_nncodec

from . import config as C
from . import faults, query
from .commitment import BadRequest, Commitments, parse_request
from .index import Index
from .checks import NOT_AUTHORISED
from .ingest import Ingest, Received
from .retrieve import Retrieval, accepted_syntaxes
from .transport import GuardedSocket, is_tls, tls_args

log = logging.getLogger("scp.association")

ROOT = {
    PatientRootQueryRetrieveInformationModelFind: "patient", StudyRootQueryRetrieveInformationModelFind: "study",
    PatientRootQueryRetrieveInformationModelGet: "patient", StudyRootQueryRetrieveInformationModelGet: "study",
    PatientRootQueryRetrieveInformationModelMove: "patient", StudyRootQueryRetrieveInformationModelMove: "study",
}
SERVICE_OF = {
    PatientRootQueryRetrieveInformationModelFind: "find", StudyRootQueryRetrieveInformationModelFind: "find",
    PatientRootQueryRetrieveInformationModelGet: "get", StudyRootQueryRetrieveInformationModelGet: "get",
    PatientRootQueryRetrieveInformationModelMove: "move", StudyRootQueryRetrieveInformationModelMove: "move",
    Verification: "echo",
    StorageCommitmentPushModel: "store",     # who may store may ask whether it is safely kept
}
GET_MODELS = {PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet}
IDENTIFIER_MISMATCH = 0xA900     # Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000


@dataclass
class Services:
    cfg: C.Config
    index: Index
    ingest: Ingest
    retrieval: Retrieval
    get_syntaxes: list = field(default_factory=list)
    commitments: Commitments | None = None
    counters: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, assoc, what: str, n: int = 1) -> None:
        with self.lock:
            c = self.counters.setdefault(id(assoc), {"since": time.monotonic()})
            c[what] = c.get(what, 0) + n


def _peer(assoc) -> str:
    return f"{assoc.requestor.ae_title.strip()}@{assoc.requestor.address}:{assoc.requestor.port}"


# --- association events --------------------------------------------------------------------------------

def on_requested(event, services: Services) -> None:
    """Offer a caller only the services it may use (access policy); reject one allowed nothing."""
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()   # requestor.ae_title is set only later
    address = assoc.requestor.address
    tls = is_tls(assoc)
    peer = services.cfg.peer_by_ae(calling)
    why = C.impostor(services.cfg, peer, address, tls) if peer is not None else ""
    if why:
        log.warning("association from %s@%s rejected: calling AE title of a listed peer, but %s", calling, address, why)
        assoc.acse.send_reject(0x01, 0x01, 0x03)     # rejected-permanent, service-user, calling AE not recognised
        assoc.kill()
        return
    allowed = {s for s in C.SERVICES if C.allowed(services.cfg, calling, s, address, tls)}
    keep = []
    for cx in assoc.acceptor.supported_contexts:
        service = SERVICE_OF.get(cx.abstract_syntax)
        if service is None:      # a storage SOP class: also needed by a C-GET requestor for its sub-operations
            service_ok = "store" in allowed or "get" in allowed
        else:
            service_ok = service in allowed
        if service_ok:
            keep.append(cx)
    if not allowed:
        log.warning("association from %s@%s rejected: calling AE title not allowed any service", calling, address)
        assoc.acse.send_reject(0x01, 0x01, 0x03)     # rejected-permanent, service-user, calling AE not recognised
        assoc.kill()
        return
    requested = {cx.abstract_syntax for cx in assoc.requestor.primitive.presentation_context_definition_list}
    if "get" in allowed and requested & GET_MODELS:
        keep = [_for_get(cx, services.get_syntaxes) if cx.abstract_syntax not in SERVICE_OF else cx for cx in keep]
    assoc.acceptor.supported_contexts = keep


def _for_get(cx, syntaxes):
    """A storage context that prefers what this node can produce (C-GET sub-operations use it)."""
    out = build_context(cx.abstract_syntax, syntaxes)
    out.scp_role, out.scu_role = cx.scp_role, cx.scu_role
    return out


def on_accepted(event, services: Services) -> None:
    dicom_nncodec.fix_association(event)
    services.count(event.assoc, "contexts", len(event.assoc.accepted_contexts))


def on_closed(event, services: Services) -> None:
    with services.lock:
        c = services.counters.pop(id(event.assoc), None)
    if c is None:
        return
    how = "released" if event.event == evt.EVT_RELEASED else "aborted"
    seconds = time.monotonic() - c.pop("since")
    parts = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
    log.info("association with %s %s after %.1f s (%s)", _peer(event.assoc), how, seconds, parts)


def on_rejected(event, services: Services) -> None:
    log.info("association from %s rejected", _peer(event.assoc))


# --- DIMSE services ------------------------------------------------------------------------------------

def handle_echo(event, services: Services) -> int:
    services.count(event.assoc, "echo")
    return 0x0000


def handle_store(event, services: Services) -> int:
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip()
    sock = assoc.dul.socket
    oversized = isinstance(sock, GuardedSocket) and sock.take_oversized()
    if not C.allowed(services.cfg, calling, "store", assoc.requestor.address, is_tls(assoc)):
        log.warning("C-STORE from %s refused: not allowed to store", _peer(assoc))
        return NOT_AUTHORISED
    req = event.request
    data = req.DataSet.getbuffer() if req.DataSet is not None else memoryview(b"")   # the bytes, not a copy
    try:
        status = services.ingest.store(Received(data, event.context.transfer_syntax, str(req.AffectedSOPClassUID or ""),
                                                str(req.AffectedSOPInstanceUID or ""), calling,
                                                str(event.context.abstract_syntax), oversized))
    finally:
        data.release()
    services.count(assoc, "stored" if status == 0 else "store-failed")
    return status


def _identifier(event, service: str):
    """The request's identifier, or None (logged) when it cannot be decoded."""
    try:
        return event.identifier
    except Exception as exc:
        log.warning("%s from %s refused (0x%04X): the identifier cannot be decoded (%s)", service, _peer(event.assoc),
                    UNABLE_TO_PROCESS, type(exc).__name__)
        return None


def _unexpected(service: str, event, exc: Exception) -> None:
    # the type only: the message of a database error can quote the identifier's values
    log.error("%s from %s failed (0x%04X): %s", service, _peer(event.assoc), UNABLE_TO_PROCESS, type(exc).__name__)
    log.debug("%s failure", service, exc_info=True)


def handle_find(event, services: Services):
    root = ROOT[event.request.AffectedSOPClassUID]
    limit = services.cfg.max_find_results
    services.count(event.assoc, "find")
    identifier = _identifier(event, "C-FIND")
    if identifier is None:
        yield UNABLE_TO_PROCESS, None
        return
    n = 0
    with services.index.session() as s:
        try:
            for ds in query.find(s, identifier, root, limit):
                if event.is_cancelled:
                    yield 0xFE00, None
                    return
                ds.RetrieveAETitle = services.cfg.ae_title
                n += 1
                yield 0xFF00, ds
        except query.QueryError as exc:
            log.warning("C-FIND from %s refused (0x%04X): %s", _peer(event.assoc), IDENTIFIER_MISMATCH, exc)
            yield IDENTIFIER_MISMATCH, None
            return
        except Exception as exc:
            _unexpected("C-FIND", event, exc)
            yield UNABLE_TO_PROCESS, None
            return
    if limit and n >= limit:
        log.warning("C-FIND from %s cut at %d results (limits.max_find_results)", _peer(event.assoc), limit)


def handle_get(event, services: Services):
    root = ROOT[event.request.AffectedSOPClassUID]
    peer = _peer(event.assoc)
    identifier = _identifier(event, "C-GET")
    try:
        if identifier is None:
            yield 1
            yield UNABLE_TO_PROCESS, None
            return
        items = services.retrieval.select(identifier, root)
    except query.QueryError as exc:
        log.warning("C-GET from %s refused (0x%04X): %s", peer, IDENTIFIER_MISMATCH, exc)
        yield 1
        yield IDENTIFIER_MISMATCH, None
        return
    except Exception as exc:
        _unexpected("C-GET", event, exc)
        yield 1
        yield UNABLE_TO_PROCESS, None
        return
    log.info("C-GET from %s: %d instances", peer, len(items))
    services.count(event.assoc, "get-instances", len(items))
    yield len(items)
    yield from services.retrieval.sub_operations(items, lambda sc: accepted_syntaxes(event.assoc, sc),
                                                 lambda: event.is_cancelled, "C-GET", peer)


def handle_move(event, services: Services):
    root = ROOT[event.request.AffectedSOPClassUID]
    peer = _peer(event.assoc)
    name = event.move_destination
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name or "")
    destination = services.cfg.peer_by_ae(name)
    if destination is None:
        log.warning("C-MOVE from %s refused (0xA801): unknown destination %r", peer, name[:16])
        yield None, None
        return
    identifier = _identifier(event, "C-MOVE")
    try:
        if identifier is None:
            raise query.QueryError("the identifier cannot be decoded")
        items, error = services.retrieval.select(identifier, root), None
    except query.QueryError as exc:
        items, error = [], exc
    except Exception as exc:
        _unexpected("C-MOVE", event, exc)
        items, error = [], query.QueryError("the query failed")
    sub: dict = {}

    def on_sub_accepted(e):
        dicom_nncodec.fix_association(e)
        sub["assoc"] = e.assoc

    # (with nothing to send, pynetdicom answers before associating; a refused identifier still
    # associates once, so it needs one context)
    contexts = services.retrieval.move_contexts(items) if items else [build_context(Verification)]
    kwargs = {"contexts": contexts, "evt_handlers": [(evt.EVT_ACCEPTED, on_sub_accepted)],
              **tls_args(services.cfg, destination)}
    yield destination.host, destination.port, kwargs
    if error is not None:
        log.warning("C-MOVE from %s refused: %s", peer, error)
        yield 1
        yield IDENTIFIER_MISMATCH, None
        return
    dest_name = f"{destination.ae_title}@{destination.host}:{destination.port}"
    log.info("C-MOVE from %s to %s: %d instances", peer, dest_name, len(items))
    services.count(event.assoc, "move-instances", len(items))
    yield len(items)
    yield from services.retrieval.sub_operations(items, lambda sc: accepted_syntaxes(sub["assoc"], sc),
                                                 lambda: event.is_cancelled, "C-MOVE", dest_name)


def handle_n_action(event, services: Services):
    """Storage Commitment Push Model: record the request; the report follows (scp.commitment)."""
    assoc = event.assoc
    peer = _peer(assoc)
    calling = assoc.requestor.ae_title.strip()
    if not C.allowed(services.cfg, calling, "store", assoc.requestor.address, is_tls(assoc)):
        log.warning("storage commitment from %s refused (0x0124): not allowed to store", peer)
        return 0x0124, None
    try:
        try:
            information = event.action_information
        except Exception:
            information = None
        transaction, refs = parse_request(event.request, information)
    except BadRequest as exc:
        log.warning("storage commitment from %s refused (0x%04X): %s", peer, exc.status, exc)
        return exc.status, None
    try:
        services.commitments.request(assoc, calling, transaction, refs)
    except Exception as exc:
        log.error("storage commitment %s from %s failed (0x0110): %s", transaction, peer, type(exc).__name__)
        return 0x0110, None
    faults.point("commit.recorded")
    log.info("storage commitment %s from %s: %d instances", transaction, peer, len(refs))
    services.count(assoc, "commitment")
    return 0x0000, None


def bindings(services: Services) -> list:
    return [
        (evt.EVT_REQUESTED, on_requested, [services]),
        (evt.EVT_ACCEPTED, on_accepted, [services]),
        (evt.EVT_RELEASED, on_closed, [services]),
        (evt.EVT_ABORTED, on_closed, [services]),
        (evt.EVT_REJECTED, on_rejected, [services]),
        (evt.EVT_C_ECHO, handle_echo, [services]),
        (evt.EVT_C_STORE, handle_store, [services]),
        (evt.EVT_C_FIND, handle_find, [services]),
        (evt.EVT_C_GET, handle_get, [services]),
        (evt.EVT_C_MOVE, handle_move, [services]),
        (evt.EVT_N_ACTION, handle_n_action, [services]),
    ]
