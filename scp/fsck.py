"""``dicom-nncodec fsck``: the index checked against the stored files, and every stored frame read.

Why a separate tool: the node is built so that a crash loses nothing that
was acknowledged (files are renamed into place only when complete, the index
commit comes after, an old file is removed only after the commit that stops
pointing to it), but an operator still needs to see that this holds after a
crash, a disk error or a restore from backup, without trusting the node.

What is checked, for every instance in the index: its file exists, has the
size the index recorded, parses, carries the instance's SOP Instance UID and
transfer syntax, and its pixel data is intact: for the private syntaxes every
frame is decoded and checked against its CRC-32
(``dicom_nncodec.codec.decode_frames``), for the others the pixel data must
be as long as its description says, or its encapsulation must parse.  Then:
files under objects/ that no index row points to (orphans), files left in
tmp/, and the compression queue (pending instances without a queue item).

``--repair`` changes only what it can change safely, and says what it did:
an orphan whose SOP Instance UID the index does not know (a crash between
writing the file and the index commit; never acknowledged, or an index
restored from an older backup) is indexed and queued like a new arrival; an
orphan that is a second copy of an intact indexed instance (a crash between
the commit and removing the superseded file) is removed; an intact orphan of
an instance whose own file is missing or damaged becomes its file; an
unreadable orphan is moved to quarantine/; tmp/ is emptied; lost queue items
are recreated and items a dead worker had claimed are put back (so --repair
also needs every compression worker sharing the folder stopped; they hold the
same lock).  An index
row whose file is missing or damaged is reported, never dropped.  Repair
needs the storage folder to itself: it refuses while a node runs there.

Exit status: 0 when nothing is (or, after repair, remains) wrong, 1 otherwise,
2 for a configuration error.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import TextIO

from pydicom import dcmread
from sqlalchemy.engine import make_url

import dicom_nncodec
from dicom_nncodec import NNCodecLossless

from . import checks, isolation
from . import config as C
from .index import (COMPRESSED, NOT_IMAGE, PENDING, QUEUED, RUNNING, Index, IndexUnavailable, StoredRow,
                    facts_from_dataset)
from .storage import TEMP, Locked, Storage

QUARANTINE = "quarantine"


@dataclass
class Problem:
    kind: str          # missing, size, unreadable, mismatch, corrupt, orphan, leftover, queue
    subject: str       # a SOP Instance UID or a path
    detail: str
    repaired: str = ""


class Fsck:
    def __init__(self, cfg: C.Config, storage: Storage, index: Index, repair: bool):
        self.cfg, self.storage, self.index, self.repair = cfg, storage, index, repair
        self.problems: list[Problem] = []
        self.frames = 0
        self.instances = 0

    def problem(self, kind: str, subject: str, detail: str, repaired: str = "") -> Problem:
        p = Problem(kind, subject, detail, repaired)
        self.problems.append(p)
        return p

    # --- one file --------------------------------------------------------------------------------------

    def verify(self, rel: str, sop_uid: str | None = None, transfer_syntax: str | None = None,
               size: int | None = None):
        """(problem kind, detail) of one stored file, or (None, dataset) when it is intact."""
        path = self.storage.abspath(rel)
        try:
            actual = os.path.getsize(path)
        except FileNotFoundError:
            return "missing", f"{rel}: no such file"
        if size is not None and actual != size:
            return "size", f"{rel}: {actual} bytes, the index says {size}"
        try:
            with isolation.contained(f"reading {rel}"):
                ds = dcmread(path)
            dicom_nncodec.fix_transfer_syntax(ds)
            ts = str(ds.file_meta.TransferSyntaxUID)
            uid = str(ds.SOPInstanceUID)
        except Exception as exc:
            return "unreadable", f"{rel}: {type(exc).__name__}: {exc}"
        if sop_uid is not None and uid != sop_uid:
            return "mismatch", f"{rel} holds SOP Instance UID {uid}"
        if transfer_syntax is not None and ts != transfer_syntax:
            return "mismatch", f"{rel} is in transfer syntax {ts}, the index says {transfer_syntax}"
        detail = self._pixels(ds, ts)
        return ("corrupt", f"{rel}: {detail}") if detail else (None, ds)

    def _pixels(self, ds, ts: str) -> str:
        if "PixelData" not in ds:
            return ""
        if dicom_nncodec.syntax.registered(ts) is not None:
            try:
                with isolation.contained(f"decoding {ds.get('SOPInstanceUID', '')}"):
                    self.frames += dicom_nncodec.dataset.verify(ds, device=self.cfg.device,
                                                                batch_size=self.cfg.batch_size)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return ""
        try:
            with isolation.contained(f"checking {ds.get('SOPInstanceUID', '')}"):
                checks.check_pixel_data(ds, ts, max_pixels=2**62)
        except (checks.StoreRefused, isolation.Panic) as exc:
            return str(exc)
        return ""

    # --- the whole storage -------------------------------------------------------------------------------

    def run(self) -> None:
        rows = self.index.stored()
        self.instances = len(rows)
        damaged: dict[str, StoredRow] = {}
        for row in rows:
            kind, detail = self.verify(row.path, row.sop_uid, row.transfer_syntax, row.stored_bytes)
            if kind is not None:
                self.problem(kind, row.sop_uid, detail)
                damaged[row.sop_uid] = row
        by_uid = {r.sop_uid: r for r in rows}
        by_uid.update({r.original_sop_uid: r for r in rows if r.original_sop_uid})
        referenced = {r.path for r in rows}
        self.orphans = [rel for rel in self.storage.files() if rel not in referenced]
        for rel in self.orphans:
            self._orphan(rel, by_uid, damaged)
        for rel in self.storage.files(TEMP):
            self._leftover(rel)
        self._queue(rows)

    def _orphan(self, rel: str, by_uid: dict[str, StoredRow], damaged: dict[str, StoredRow]) -> None:
        kind, result = self.verify(rel)
        if kind is not None:
            p = self.problem("orphan", rel, f"not in the index and damaged ({kind}: {result.split(': ', 1)[-1]})")
            if self.repair:
                self._quarantine(rel, p)
            return
        ds = result
        uid, ts, size = str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), os.path.getsize(
            self.storage.abspath(rel))
        row = by_uid.get(uid)
        if row is None:
            p = self.problem("orphan", rel, f"{uid} is not in the index (written, but the index commit never came)")
            if self.repair:
                facts = facts_from_dataset(ds, ts)
                state = NOT_IMAGE if not facts.is_image else COMPRESSED if ts == NNCodecLossless else PENDING
                calling = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()[:16]
                self.index.add(facts, rel, size, calling, "keep", state)
                by_uid[uid] = StoredRow(0, uid, "", facts.sop_class_uid, rel, ts, size, state)
                p.repaired = "indexed" + (" and queued" if state == PENDING else "")
        elif row.sop_uid in damaged and uid == row.sop_uid:
            p = self.problem("orphan", rel, f"an intact copy of {uid}, whose indexed file is damaged or missing")
            if self.repair:
                state = COMPRESSED if dicom_nncodec.syntax.registered(ts) else PENDING
                self.index.repoint(row.id, rel, ts, size, state)
                del damaged[uid]
                p.repaired = "the index now points to it"
                for q in self.problems:
                    if q.subject == uid and not q.repaired:
                        q.repaired = f"replaced by {rel}"
        else:
            p = self.problem("orphan", rel, f"a superseded copy of {uid} (stored intact as {row.path})")
            if self.repair and row.sop_uid not in damaged:
                os.unlink(self.storage.abspath(rel))
                p.repaired = "removed"

    def _quarantine(self, rel: str, p: Problem) -> None:
        target = os.path.join(self.storage.root, QUARANTINE, os.path.basename(rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(self.storage.abspath(rel), target)
        p.repaired = f"moved to {QUARANTINE}/"

    def _leftover(self, rel: str) -> None:
        p = self.problem("leftover", rel, "a half-written file (never acknowledged)")
        if self.repair:
            os.unlink(os.path.join(self.storage.root, rel))
            p.repaired = "removed"

    def _queue(self, rows: list[StoredRow]) -> None:
        items = self.index.queue_items()
        queued = {instance_id for _, instance_id, _ in items}
        states = {r.id: r for r in rows}
        for row in rows:
            if row.state == PENDING and row.id not in queued:
                p = self.problem("queue", row.sop_uid, "pending compression but not in the queue")
                if self.repair:
                    self.index.requeue(row.id)
                    p.repaired = "queued again"
        for item_id, instance_id, state in items:
            row = states.get(instance_id)
            if row is not None and row.state != PENDING:
                p = self.problem("queue", row.sop_uid, f"queued although {row.state}")
                if self.repair:
                    self.index.drop_queue_item(item_id)
                    p.repaired = "taken off the queue"
            elif state == RUNNING and self.repair:      # (with the storage to itself: no worker is alive)
                self.problem("queue", row.sop_uid if row else str(instance_id), "claimed by a worker that is gone",
                             f"put back ({QUEUED})")
        if self.repair:
            self.index.recover_queue(everything=True)

    # --- report ------------------------------------------------------------------------------------------

    def report(self, out: TextIO) -> int:
        for p in self.problems:
            line = f"{p.kind:10} {p.subject}: {p.detail}"
            print(line + (f" -> {p.repaired}" if p.repaired else ""), file=out)
        left = [p for p in self.problems if not p.repaired]
        repaired = len(self.problems) - len(left)
        print(f"checked {self.instances} instances ({self.frames} private frames decoded), "
              f"{len(self.orphans)} files not in the index; {len(self.problems)} problems"
              + (f", {repaired} repaired" if self.repair else "") + f", {len(left)} left", file=out)
        return 1 if left else 0


def check(cfg: C.Config, repair: bool = False, out: TextIO | None = None) -> int:
    """fsck the node configured by ``cfg``; the exit status (0 clean, 1 problems left)."""
    out = out or sys.stdout
    storage = Storage(cfg.storage_path, fsync=cfg.fsync)
    url = C.resolved_index_url(cfg)
    shown = make_url(url).render_as_string(hide_password=True)
    print(f"fsck of node {cfg.ae_title}: storage {storage.root}, index {shown}", file=out)
    if not os.path.isdir(storage.root):
        print("nothing stored yet (no storage folder)", file=out)
        return 0
    if repair:
        try:
            storage.lock(exclusive=True)
        except Locked:
            print("a node is running on this storage folder: stop it before fsck --repair", file=out)
            return 1
    try:
        index = Index(url)
        try:
            index.create()
            f = Fsck(cfg, storage, index, repair)
            f.run()
            return f.report(out)
        finally:
            index.dispose()
    except IndexUnavailable as exc:
        print(f"cannot check: {exc}", file=out)
        return 1
    finally:
        storage.unlock()


def main(config_path: str | None, repair: bool) -> int:
    """``dicom-nncodec fsck [--config FILE] [--repair]``."""
    try:
        cfg = C.load(config_path)
    except C.ConfigError as exc:
        print(f"dicom-nncodec: configuration error: {exc}", file=sys.stderr)
        return 2
    return check(cfg, repair)
