"""C-GET and C-MOVE: which instances, which contexts to propose, and what to send for each.

Why here: both services share the selection (the index), the per-instance
transcoding (transcode.py) and the failure accounting; the handlers only
adapt this to pynetdicom's generator protocol.

pynetdicom counts a sub-operation as failed only when sending raises, so an
instance that cannot be sent is yielded as a header-only dataset without File
Meta Information: ``send_c_store`` refuses it before anything goes on the
wire, the count stays exact and its UID lands in the Failed SOP Instance UID
List.  The real cause is logged here and recorded in the index.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

from dicom_nncodec.engine import default_threads

from . import isolation, query, transcode
from .config import Config
from .index import Index, Instance
from .storage import Storage

log = logging.getLogger("scp.retrieve")

MAX_CONTEXTS = 128   # PS3.8: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Item:
    sop_uid: str
    sop_class_uid: str
    path: str
    transfer_syntax: str


class _HideMarkerRefusal(logging.Filter):
    """pynetdicom logs its refusal of an :func:`unsendable` marker at ERROR, which would read as a
    second, misleading failure; the real cause is logged here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "contains no '(0002,0010) Transfer Syntax UID'" not in record.getMessage()


_pynetdicom_log = logging.getLogger("pynetdicom.service_class")
if not any(isinstance(f, _HideMarkerRefusal) for f in _pynetdicom_log.filters):
    _pynetdicom_log.addFilter(_HideMarkerRefusal())


def unsendable(item: Item) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = item.sop_class_uid
    ds.SOPInstanceUID = item.sop_uid
    return ds


class Retrieval:
    def __init__(self, cfg: Config, index: Index, storage: Storage):
        self.cfg, self.index, self.storage = cfg, index, storage

    def select(self, identifier: Dataset, root: str) -> list[Item]:
        """The instances to send (raises query.QueryError for a bad identifier)."""
        with self.index.session() as s:
            return [Item(i.sop_uid, i.sop_class_uid, i.path, i.transfer_syntax)
                    for i in query.retrieve(s, identifier, root)]

    def move_contexts(self, items: list[Item]) -> list[PresentationContext]:
        """Contexts for the C-MOVE sub-association: the SOP classes being sent, each with the
        syntaxes this node can produce.  One context per (class, syntax) lets the destination
        accept several, so the preference here decides; past 128 contexts, one per class."""
        by_class: dict[str, list[str]] = {}
        for it in items:
            by_class.setdefault(it.sop_class_uid, []).append(it.transfer_syntax)
        per_class = {sc: transcode.proposals(ts, self.cfg.retrieve_syntaxes) for sc, ts in by_class.items()}
        if sum(len(v) for v in per_class.values()) <= MAX_CONTEXTS:
            return [build_context(sc, [ts]) for sc, tss in per_class.items() for ts in tss]
        if len(per_class) > MAX_CONTEXTS:
            log.warning("C-MOVE covers %d SOP classes; only %d can be proposed, instances of the others will fail",
                        len(per_class), MAX_CONTEXTS)
        return [build_context(sc, tss) for sc, tss in list(per_class.items())[:MAX_CONTEXTS]]

    def _read(self, item: Item) -> Dataset:
        try:
            return dcmread(self.storage.abspath(item.path))
        except FileNotFoundError:
            # replaced or compressed since it was selected: read what the index points to now
            with self.index.session() as s:
                inst = s.query(Instance).filter(Instance.sop_uid == item.sop_uid).first()
                if inst is None:
                    raise FileNotFoundError("the instance was removed") from None
                return dcmread(self.storage.abspath(inst.path))

    def prepare(self, item: Item, accepted: set, service: str, peer: str) -> Dataset:
        """The dataset to send for ``item``, or an :func:`unsendable` one (failure logged)."""
        try:
            with isolation.contained(f"preparing {item.sop_uid} for {peer}"):
                ds = self._read(item)
                return transcode.for_receiver(ds, accepted, self.cfg.retrieve_syntaxes, self.cfg.device,
                                              self.cfg.batch_size)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("%s sub-operation for %s to %s failed: %s", service, item.sop_uid, peer, reason)
            self.index.record_failure("retrieve", item.sop_uid, f"{service} to {peer}: {reason}")
            return unsendable(item)

    def sub_operations(self, items: list[Item], accepted_for: Callable[[str], set], is_cancelled: Callable[[], bool],
                       service: str, peer: str, workers: int | None = None) -> Iterator[tuple[int, Dataset | None]]:
        """(status, dataset) pairs for pynetdicom: Pending with each dataset, or Cancel.

        Why a pool: decoding is most of the time of a retrieval, and the engine releases the GIL, so
        the instances after the one being sent are read and transcoded in ``workers`` threads while
        it goes on the wire (the first instance leaves as soon as it is ready, not after the last).
        At most twice ``workers`` prepared instances wait in memory; order is kept."""
        workers = max(1, default_threads() if workers is None else workers)
        pending: deque = deque()
        todo = iter(items)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="nncodec-retrieve")

        def top_up() -> None:
            while len(pending) < 2 * workers:
                item = next(todo, None)
                if item is None:
                    return
                pending.append(pool.submit(self.prepare, item, accepted_for(item.sop_class_uid), service, peer))

        try:
            top_up()
            while pending:
                if is_cancelled():
                    log.info("%s from %s cancelled", service, peer)
                    yield 0xFE00, None
                    return
                ds = pending.popleft().result()
                top_up()
                yield 0xFF00, ds
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def accepted_syntaxes(assoc, sop_class_uid: str) -> set:
    """Transfer syntaxes accepted on ``assoc`` for sending ``sop_class_uid`` (this node as Storage SCU)."""
    return {transcode.syntax(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class_uid and cx.as_scu}
