"""The index: patients, studies, series and instances, the compression queue and the failure log.

Why a database and not the file tree: C-FIND needs matching over four levels,
the queue must survive restarts, and ingest, compression and retrieval run in
different threads (one per association, plus the workers) and must see one
consistent state.  Each call opens its own short session.  SQLite (the default)
runs in WAL mode with a busy timeout, and writes are serialised by a lock in
this process; PostgreSQL works through the same code.

A queue item may carry a due time (a rule's compression delay, fixed at
receipt): it is not claimed before then, and the due time survives restarts
because it lives in the queue row.

Every change that moves a stored file is one transaction guarded by the
instance's ``generation`` counter: a compression result for a copy that was
replaced meanwhile is thrown away instead of overwriting the newer copy.

Several processes (nodes and ``dicom-nncodec worker`` processes, on one or
several machines) may share one index.  A compression worker claims a queue
item with a *lease*: its owner name and a time until which no other worker
takes it.  It renews the lease while it codes; a worker that dies stops
renewing, and once the lease has run out any worker takes the item again.
Only the holder of the lease may switch the instance to its result.  On
PostgreSQL the claim is ``SELECT ... FOR UPDATE SKIP LOCKED`` (competing
workers pass over each other's candidate rows instead of waiting); on SQLite,
which has one writer at a time, the same statement is a compare-and-set
``UPDATE ... WHERE`` the item is still claimable.  Lease times come from the
database server's clock on PostgreSQL, so workers on other machines need not
agree on the time.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import threading
from dataclasses import dataclass

from sqlalchemy import (BigInteger, ForeignKey, Integer, String, Text, and_, create_engine, event, func, inspect,
                        or_, select, text, update)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from . import owners

# Instance states
PENDING = "pending"          # waiting in the compression queue
COMPRESSED = "compressed"    # stored in a private syntax (by this node or by the sender)
KEPT = "kept"                # stored as received, by a rule or because the codec cannot take it
FAILED = "failed"            # compression failed; stored as received, reason recorded
NOT_IMAGE = "not_image"      # no pixel data: nothing to compress

# Queue states
QUEUED = "queued"
RUNNING = "running"

# Failure stage of a compression worker thread that ended and was replaced (shown by status)
WATCHDOG = "watchdog"

# Seconds a claimed queue item stays reserved to its worker without renewal (compression.lease_seconds)
LEASE_SECONDS = 60.0
# Claims of one item by workers that died on it before it is recorded as failed (a poison instance)
MAX_ATTEMPTS = 3


class IndexUnavailable(RuntimeError):
    """The index database cannot be used: its driver is missing, the URL is wrong, or the server
    cannot be reached.  The message names the database (without password) and the reason."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(16), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    studies: Mapped[list["Study"]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_date: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(32), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(256), default="")
    series_date: Mapped[str] = mapped_column(String(16), default="")
    series_time: Mapped[str] = mapped_column(String(32), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # the UID it arrived with, when near-lossless compression gave it a new one
    original_sop_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(String(256))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    received_transfer_syntax: Mapped[str] = mapped_column(String(64))
    received_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    columns: Mapped[int] = mapped_column(Integer, default=0)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    bits_stored: Mapped[int] = mapped_column(Integer, default=0)
    photometric: Mapped[str] = mapped_column(String(32), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[_dt.datetime] = mapped_column(default=_now)
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    # top-level attributes (no pixel data, bulk data or sequences) as DICOM JSON, for C-FIND return keys
    header: Mapped[str] = mapped_column(Text, default="{}")
    series: Mapped[Series] = relationship(back_populates="instances")


class QueueItem(Base):
    __tablename__ = "compression_queue"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"), unique=True)
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    enqueued_at: Mapped[_dt.datetime] = mapped_column(default=_now)
    started_at: Mapped[_dt.datetime | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # compression delay (a rule's `after`): not claimed before this time (UTC); NULL: due at once
    due_at: Mapped[_dt.datetime | None] = mapped_column(nullable=True, index=True)
    # lease of a claimed (running) item: who codes it, and until when nobody else may take it
    lease_owner: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_until: Mapped[_dt.datetime | None] = mapped_column(nullable=True)


class Commitment(Base):
    """A Storage Commitment request (PS3.4 J) until its N-EVENT-REPORT is delivered or given up."""
    __tablename__ = "commitment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    references: Mapped[str] = mapped_column(Text)         # JSON: [[SOP Class UID, SOP Instance UID], ...]
    requested_at: Mapped[_dt.datetime] = mapped_column(default=_now)
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)   # pending, delivered, given_up
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[_dt.datetime] = mapped_column(default=_now)


class Failure(Base):
    __tablename__ = "failure"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[_dt.datetime] = mapped_column(default=_now, index=True)
    stage: Mapped[str] = mapped_column(String(16))        # store, compress, retrieve, watchdog
    sop_uid: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text)


@dataclass
class InstanceFacts:
    """What the index keeps of one received instance (values already decoded to text)."""
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    series_date: str
    series_time: str
    body_part: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int
    columns: int
    frames: int
    bits_stored: int
    photometric: str
    transfer_syntax: str
    is_image: bool
    header: str


@dataclass
class IngestResult:
    outcome: str            # stored, replaced, kept_existing, rejected
    instance_id: int
    superseded_path: str | None = None
    queued: bool = False


@dataclass(frozen=True)
class StoredRow:
    id: int
    sop_uid: str
    original_sop_uid: str
    sop_class_uid: str
    path: str
    transfer_syntax: str
    stored_bytes: int
    state: str


@dataclass(frozen=True)
class CommitmentRequest:
    id: int
    transaction_uid: str
    calling_ae: str
    references: list
    requested_at: _dt.datetime
    attempts: int


@dataclass(frozen=True)
class Kept:
    """What storage commitment needs to know about one stored instance."""
    sop_uid: str
    sop_class_uid: str
    path: str
    stored_bytes: int
    state: str
    transfer_syntax: str
    received_transfer_syntax: str
    modality: str
    calling_ae: str
    bits_stored: int
    photometric: str
    body_part: str = ""


@dataclass
class Job:
    """One claimed queue item with what the rules and the worker need."""
    queue_id: int
    instance_id: int
    generation: int
    path: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    calling_ae: str
    bits_stored: int
    photometric: str
    transfer_syntax: str
    received_transfer_syntax: str
    body_part: str = ""
    owner: str = ""         # the lease owner (scp.owners.name)


def _to_int(v) -> int | None:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword, "")
    if v is None:
        return ""
    if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)) and not hasattr(v, "family_name"):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def normalise_date(v: str) -> str:
    return v.replace(".", "").strip()


def normalise_time(v: str) -> str:
    return v.replace(":", "").strip()


_SKIP_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}


def header_json(ds) -> str:
    """The instance's top-level attributes that a C-FIND may be asked to return."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    small = Dataset()
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None:     # deferred (large): never returned
            continue
        try:
            elem = ds[tag]
        except Exception:
            continue
        if elem.tag.group in (0x0002, 0x7FE0) or elem.VR in _SKIP_VRS or elem.tag.is_private:
            continue
        try:
            if len(str(elem.value)) > 1024:
                continue
        except Exception:
            continue
        small.add(elem)
    try:
        return json.dumps(small.to_json_dict())
    except Exception:
        return "{}"


def _int32(v) -> int | None:
    n = _to_int(v)
    return n if n is not None and -2**31 <= n < 2**31 else None


def _clip(facts: "InstanceFacts") -> "InstanceFacts":
    """Text cut to the index's column sizes (values longer than their VR allows would otherwise fail
    the insert on PostgreSQL, again on every retry of the sender)."""
    for name, size in _TEXT_COLUMNS.items():
        value = getattr(facts, name)
        if len(value) > size:
            setattr(facts, name, value[:size])
    return facts


def facts_from_dataset(ds, transfer_syntax: str) -> InstanceFacts:
    """Index facts from a dataset read without its pixel data (an image is what has Rows and Columns)."""
    image = "Rows" in ds and "Columns" in ds
    return _clip(InstanceFacts(
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
        birth_date=normalise_date(_text(ds, "PatientBirthDate")), sex=_text(ds, "PatientSex"),
        study_uid=_text(ds, "StudyInstanceUID"), study_date=normalise_date(_text(ds, "StudyDate")),
        study_time=normalise_time(_text(ds, "StudyTime")), accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"), study_description=_text(ds, "StudyDescription"),
        referring_physician=_text(ds, "ReferringPhysicianName"),
        series_uid=_text(ds, "SeriesInstanceUID"), modality=_text(ds, "Modality").upper(),
        series_number=_int32(ds.get("SeriesNumber")), series_description=_text(ds, "SeriesDescription"),
        series_date=normalise_date(_text(ds, "SeriesDate")), series_time=normalise_time(_text(ds, "SeriesTime")),
        body_part=_text(ds, "BodyPartExamined"),
        sop_uid=_text(ds, "SOPInstanceUID"), sop_class_uid=_text(ds, "SOPClassUID"),
        instance_number=_int32(ds.get("InstanceNumber")),
        rows=_int32(ds.get("Rows")) or 0, columns=_int32(ds.get("Columns")) or 0,
        frames=_int32(ds.get("NumberOfFrames", 1)) or 1,
        bits_stored=_int32(ds.get("BitsStored", ds.get("BitsAllocated", 0))) or 0,
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=str(transfer_syntax), is_image=image, header=header_json(ds)))


_TEXT_COLUMNS = {
    "patient_id": 64, "patient_name": 324, "birth_date": 16, "sex": 16, "study_uid": 64, "study_date": 16,
    "study_time": 32, "accession_number": 64, "study_id": 64, "study_description": 256, "referring_physician": 324,
    "series_uid": 64, "modality": 16, "series_description": 256, "series_date": 16, "series_time": 32,
    "body_part": 64, "sop_uid": 64, "sop_class_uid": 64, "photometric": 32, "transfer_syntax": 64,
}


class Index:
    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
            if url.startswith("postgresql"):     # (a server that drops packets would hold start-up for minutes)
                kwargs["connect_args"] = {"connect_timeout": 15}
        try:
            self.engine = create_engine(url, **kwargs)
        except (ImportError, SQLAlchemyError, ValueError) as exc:     # no driver, or a URL it cannot read
            hint = (" (install the database driver; for postgresql+psycopg: pip install 'dicom-nncodec[postgres]')"
                    if isinstance(exc, ImportError) else "")
            raise IndexUnavailable(f"index {self.shown_url}: {_reason(exc)}{hint}") from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer; serialising writes here avoids "database is locked" on upgrade.
        self._write_lock = threading.RLock() if self.is_sqlite else None

    @property
    def shown_url(self) -> str:
        """The URL with its password hidden (for messages and logs)."""
        try:
            from sqlalchemy.engine import make_url
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "(unreadable URL)"

    # --- plumbing ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Create missing tables and add columns a newer version introduced (several processes may start
        at once on one PostgreSQL database: they take turns).  Raises :class:`IndexUnavailable` when the
        database cannot be reached."""
        try:
            with self.engine.begin() as conn:
                if not self.is_sqlite:
                    conn.execute(text("SELECT pg_advisory_xact_lock(7423019)"))    # (any constant of this product)
                Base.metadata.create_all(conn)
                _add_missing_columns(conn)
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index {self.shown_url}: {_reason(exc)}") from None

    def check(self) -> None:
        """Connect once; :class:`IndexUnavailable` with the reason when the database cannot be reached."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index {self.shown_url}: {_reason(exc)}") from None

    def dispose(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        """A read session (callers close it; ``with index.session() as s``)."""
        return self._session()

    @contextlib.contextmanager
    def writing(self):
        """A session whose work is committed as one transaction (rolled back on error)."""
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self._session() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # --- ingest -----------------------------------------------------------------------------------

    def existing(self, sop_uid: str) -> Instance | None:
        with self.session() as s:
            return s.scalars(select(Instance).where(
                (Instance.sop_uid == sop_uid) | (Instance.original_sop_uid == sop_uid))).first()

    def add(self, f: InstanceFacts, path: str, size: int, calling_ae: str, policy: str,
            state: str, reason: str = "", delay: float = 0.0) -> IngestResult:
        """Record a durably written file.  ``policy`` decides about a second copy of a SOP Instance UID;
        ``state`` is PENDING (queue it), COMPRESSED, KEPT or NOT_IMAGE, ``reason`` its state reason;
        a queued instance is due ``delay`` seconds after now."""
        for attempt in range(3):
            try:
                with self.writing() as s:
                    return self._add(s, f, path, size, calling_ae, policy, state, reason, delay)
            except IntegrityError:   # a concurrent insert of the same patient/study/series (PostgreSQL)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _add(self, s: Session, f: InstanceFacts, path, size, calling_ae, policy, state, reason="",
             delay: float = 0.0) -> IngestResult:
        inst = s.scalars(select(Instance).where(
            (Instance.sop_uid == f.sop_uid) | (Instance.original_sop_uid == f.sop_uid))).first()
        if inst is not None and policy != "replace":
            return IngestResult("kept_existing" if policy == "keep" else "rejected", inst.id)
        patient = s.scalars(select(Patient).where(Patient.patient_id == f.patient_id)).first()
        if patient is None:
            patient = Patient(patient_id=f.patient_id)
            s.add(patient)
        patient.patient_name, patient.birth_date, patient.sex = f.patient_name, f.birth_date, f.sex
        study = s.scalars(select(Study).where(Study.study_uid == f.study_uid)).first()
        if study is None:
            study = Study(study_uid=f.study_uid, patient=patient)
            s.add(study)
        study.study_date, study.study_time = f.study_date, f.study_time
        study.accession_number, study.study_id = f.accession_number, f.study_id
        study.study_description, study.referring_physician = f.study_description, f.referring_physician
        series = s.scalars(select(Series).where(Series.series_uid == f.series_uid)).first()
        if series is None:
            series = Series(series_uid=f.series_uid, study=study)
            s.add(series)
        series.modality, series.series_number = f.modality, f.series_number
        series.series_description, series.series_date = f.series_description, f.series_date
        series.series_time, series.body_part = f.series_time, f.body_part
        outcome, superseded = "stored", None
        if inst is None:
            inst = Instance(sop_uid=f.sop_uid, generation=1, path=path)
            s.add(inst)
        else:
            outcome, superseded = "replaced", inst.path
            inst.generation = inst.generation + 1
            inst.sop_uid, inst.original_sop_uid = f.sop_uid, ""
        inst.series = series
        inst.path = path
        inst.sop_class_uid, inst.instance_number = f.sop_class_uid, f.instance_number
        inst.transfer_syntax = inst.received_transfer_syntax = f.transfer_syntax
        inst.received_bytes = inst.stored_bytes = size
        inst.rows, inst.columns, inst.frames = f.rows, f.columns, f.frames
        inst.bits_stored, inst.photometric = f.bits_stored, f.photometric
        received = _now()
        inst.calling_ae, inst.received_at = calling_ae, received
        inst.state, inst.state_reason, inst.header = state, reason[:2000], f.header
        s.flush()
        queued = state == PENDING
        item = s.scalars(select(QueueItem).where(QueueItem.instance_pk == inst.id)).first()
        if queued:
            if item is None:
                item = QueueItem(instance_pk=inst.id, generation=inst.generation)
                s.add(item)
            else:
                item.generation, item.state, item.started_at = inst.generation, QUEUED, None
                item.lease_owner, item.lease_until, item.attempts = "", None, 0
            item.due_at = received + _dt.timedelta(seconds=delay) if delay > 0 else None
        elif item is not None:
            s.delete(item)
        return IngestResult(outcome, inst.id, superseded, queued)

    # --- the compression queue -----------------------------------------------------------------------

    def recover_queue(self, everything: bool = False) -> int:
        """Items claimed by workers of this host that no longer run go back to the queue at once
        (``everything``: all claimed items, for fsck --repair, which has the storage to itself).
        Items of workers on other hosts wait until their lease runs out."""
        with self.writing() as s:
            running = s.execute(select(QueueItem.id, QueueItem.lease_owner).where(QueueItem.state == RUNNING)).all()
            gone = [qid for qid, owner in running if everything or owners.gone(owner)]
            if not gone:
                return 0
            return s.execute(update(QueueItem).where(QueueItem.id.in_(gone), QueueItem.state == RUNNING)
                             .values(state=QUEUED, started_at=None, lease_owner="", lease_until=None)).rowcount

    # --- leases: claiming, renewing and giving back queue items ------------------------------------------

    def _clock(self):
        """Now, as lease times are kept: the database server's UTC clock on PostgreSQL (workers on other
        machines may disagree about the time), this machine's on SQLite (one machine)."""
        return _now() if self.is_sqlite else func.timezone("UTC", func.now())

    def _claimable(self):
        return or_(and_(QueueItem.state == QUEUED, _due(_now())),
                   and_(QueueItem.state == RUNNING,
                        or_(QueueItem.lease_until.is_(None), QueueItem.lease_until < self._clock())))

    def claim(self, owner: str = "", lease_seconds: float = LEASE_SECONDS) -> Job | None:
        """Take the oldest claimable item (queued, or running under a lease that ran out) for ``owner``
        until ``lease_seconds`` from now, or None.  An item whose workers died on it ``MAX_ATTEMPTS``
        times is recorded as failed instead (the instance is kept as received)."""
        lease = _dt.timedelta(seconds=lease_seconds)
        with self.writing() as s:
            for _ in range(5):
                item = s.scalars(select(QueueItem).where(self._claimable()).order_by(QueueItem.id).limit(1)
                                 .with_for_update(skip_locked=True)).first()
                if item is None:
                    return None
                if item.state == RUNNING and item.attempts >= MAX_ATTEMPTS:
                    self._poisoned(s, item)
                    continue
                # compare-and-set (what keeps two SQLite processes apart; on PostgreSQL the row is locked)
                n = s.execute(update(QueueItem).where(QueueItem.id == item.id, self._claimable())
                              .values(state=RUNNING, started_at=_now(), attempts=QueueItem.attempts + 1,
                                      lease_owner=owner, lease_until=self._clock() + lease)).rowcount
                if not n:
                    continue
                inst = s.get(Instance, item.instance_pk)
                series = s.get(Series, inst.series_pk)
                return Job(item.id, inst.id, item.generation, inst.path, inst.sop_uid, inst.sop_class_uid,
                           series.modality if series else "", inst.calling_ae, inst.bits_stored,
                           inst.photometric, inst.transfer_syntax, inst.received_transfer_syntax,
                           series.body_part if series else "", owner)
            return None

    def _poisoned(self, s: Session, item: QueueItem) -> None:
        inst = s.get(Instance, item.instance_pk)
        reason = f"{item.attempts} compression workers stopped while on it (last: {item.lease_owner or '?'})"
        if inst is not None and inst.generation == item.generation:
            inst.state, inst.state_reason = FAILED, reason
        s.add(Failure(stage="compress", sop_uid=inst.sop_uid if inst else "", reason=reason))
        s.delete(item)
        s.flush()

    def renew(self, jobs: list[Job], lease_seconds: float = LEASE_SECONDS) -> set[int]:
        """Extend the leases of ``jobs``; the queue ids of those still held (a job missing from the
        answer was taken over by another worker after its lease ran out, or finished by fsck)."""
        held: set[int] = set()
        if not jobs:
            return held
        lease = _dt.timedelta(seconds=lease_seconds)
        with self.writing() as s:
            for job in jobs:
                if s.execute(update(QueueItem).where(QueueItem.id == job.queue_id, QueueItem.state == RUNNING,
                                                     QueueItem.lease_owner == job.owner)
                             .values(lease_until=self._clock() + lease)).rowcount:
                    held.add(job.queue_id)
        return held

    def release(self, job: Job) -> None:
        """Put a claimed item back (shutdown before it was done, or nothing can be written now); a claim
        given back is not counted as an attempt."""
        with self.writing() as s:
            s.execute(update(QueueItem).where(QueueItem.id == job.queue_id, QueueItem.state == RUNNING,
                                              QueueItem.lease_owner == job.owner)
                      .values(state=QUEUED, started_at=None, lease_owner="", lease_until=None,
                              attempts=QueueItem.attempts - 1))

    def _finish(self, s: Session, job: Job) -> Instance | None:
        """The instance if ``job`` is still current (same generation, and its worker still holds the
        lease); the queue item is removed when it belongs to this generation and lease."""
        item = s.scalars(select(QueueItem).where(QueueItem.id == job.queue_id).with_for_update()).first()
        if item is None or item.lease_owner != job.owner:
            return None          # another worker took it over (this one's lease ran out) or finished it
        inst = s.get(Instance, job.instance_id)
        if item.generation == job.generation:
            s.delete(item)       # (a newer copy re-queued the item under its own generation: leave that)
        if inst is None or inst.generation != job.generation:
            return None
        return inst

    def finish_compressed(self, job: Job, path: str, transfer_syntax: str, size: int,
                          new_sop_uid: str | None, header: str | None, note: str = "") -> tuple[bool, str]:
        """Switch the instance to its compressed file.  Returns (done, path to remove):
        the old file when done, else the new one (the instance changed meanwhile).  ``note``
        (e.g. the ratio a lossy rule reached) is kept as the instance's state reason."""
        with self.writing() as s:
            inst = self._finish(s, job)
            if inst is None:
                return False, path
            old = inst.path
            inst.path, inst.transfer_syntax, inst.stored_bytes = path, transfer_syntax, size
            inst.state, inst.state_reason = COMPRESSED, note[:2000]
            inst.generation += 1
            if new_sop_uid and new_sop_uid != inst.sop_uid:
                inst.original_sop_uid, inst.sop_uid = inst.sop_uid, new_sop_uid
            if header is not None:
                inst.header = header
            return True, old

    def finish_unchanged(self, job: Job, state: str, reason: str) -> None:
        """The instance stays as stored: KEPT (by rule or unsupported) or FAILED (reason logged)."""
        with self.writing() as s:
            inst = self._finish(s, job)
            if inst is not None:
                inst.state, inst.state_reason = state, reason[:2000]
            if state == FAILED:
                s.add(Failure(stage="compress", sop_uid=job.sop_uid, reason=reason[:2000]))

    def queue_length(self, due_only: bool = False) -> int:
        """Queue items (``due_only``: leaving out those a compression delay still holds back)."""
        with self.session() as s:
            query = select(func.count()).select_from(QueueItem)
            if due_only:
                query = query.where(_due(_now()))
            return s.scalar(query) or 0

    # --- fsck -----------------------------------------------------------------------------------------

    def stored(self) -> list["StoredRow"]:
        """Every instance with what fsck compares against its file."""
        with self.session() as s:
            return [StoredRow(i.id, i.sop_uid, i.original_sop_uid, i.sop_class_uid, i.path, i.transfer_syntax,
                              i.stored_bytes, i.state) for i in s.scalars(select(Instance).order_by(Instance.id))]

    def queue_items(self) -> list[tuple[int, int, str]]:
        """(queue item id, instance id, state) of every queue item."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(select(QueueItem.id, QueueItem.instance_pk, QueueItem.state))]

    def requeue(self, instance_id: int) -> None:
        """Queue a pending instance again (its queue item was lost)."""
        with self.writing() as s:
            inst = s.get(Instance, instance_id)
            if inst is not None and s.scalars(select(QueueItem).where(QueueItem.instance_pk == instance_id)).first() \
                    is None:
                s.add(QueueItem(instance_pk=instance_id, generation=inst.generation))

    def drop_queue_item(self, item_id: int) -> None:
        with self.writing() as s:
            item = s.get(QueueItem, item_id)
            if item is not None:
                s.delete(item)

    def repoint(self, instance_id: int, path: str, transfer_syntax: str, size: int, state: str) -> None:
        """Point an instance whose file is lost or damaged at another intact copy of it (fsck --repair);
        a PENDING one is queued."""
        with self.writing() as s:
            inst = s.get(Instance, instance_id)
            inst.path, inst.transfer_syntax, inst.stored_bytes = path, transfer_syntax, size
            inst.state, inst.state_reason = state, "re-attached by fsck --repair"
            inst.generation += 1
            item = s.scalars(select(QueueItem).where(QueueItem.instance_pk == instance_id)).first()
            if item is not None:
                s.delete(item)
            if state == PENDING:
                s.flush()
                s.add(QueueItem(instance_pk=instance_id, generation=inst.generation))

    # --- storage commitment -------------------------------------------------------------------------

    def add_commitment(self, transaction_uid: str, calling_ae: str, references: list) -> None:
        """Record a request (a repeated Transaction UID starts that request over)."""
        with self.writing() as s:
            c = s.scalars(select(Commitment).where(Commitment.transaction_uid == transaction_uid)).first()
            if c is None:
                c = Commitment(transaction_uid=transaction_uid)
                s.add(c)
            c.calling_ae, c.references, c.requested_at = calling_ae, json.dumps(references), _now()
            c.state, c.attempts, c.next_attempt_at = PENDING, 0, _now()

    def due_commitments(self) -> list[CommitmentRequest]:
        with self.session() as s:
            rows = s.scalars(select(Commitment).where(Commitment.state == PENDING,
                                                      Commitment.next_attempt_at <= _now()).order_by(Commitment.id))
            return [CommitmentRequest(c.id, c.transaction_uid, c.calling_ae, json.loads(c.references), c.requested_at,
                                      c.attempts) for c in rows]

    def commitment_attempted(self, cid: int, state: str, retry_at: _dt.datetime | None = None) -> None:
        with self.writing() as s:
            c = s.get(Commitment, cid)
            if c is not None:
                c.state, c.attempts = state, c.attempts + 1
                if retry_at is not None:
                    c.next_attempt_at = retry_at

    def commitments(self) -> dict[str, str]:
        """Transaction UID -> state (for status and tests)."""
        with self.session() as s:
            return dict(s.execute(select(Commitment.transaction_uid, Commitment.state)).all())

    def kept(self, sop_uid: str) -> tuple[Kept | None, bool]:
        """The stored instance ``sop_uid`` and False; (None, True) when it was replaced by a near-lossless
        derivative with a new UID; (None, False) when it is unknown."""
        with self.session() as s:
            row = s.execute(select(Instance, Series.modality, Series.body_part)
                            .join(Series, Instance.series_pk == Series.id)
                            .where(Instance.sop_uid == sop_uid)).first()
            if row is None:
                replaced = s.scalar(select(func.count()).select_from(Instance)
                                    .where(Instance.original_sop_uid == sop_uid)) or 0
                return None, bool(replaced)
            i, modality, body_part = row
            return Kept(i.sop_uid, i.sop_class_uid, i.path, i.stored_bytes, i.state, i.transfer_syntax,
                        i.received_transfer_syntax, modality, i.calling_ae, i.bits_stored, i.photometric,
                        body_part), False

    # --- failures and statistics ----------------------------------------------------------------------

    def record_failure(self, stage: str, sop_uid: str, reason: str) -> None:
        try:
            with self.writing() as s:
                s.add(Failure(stage=stage, sop_uid=(sop_uid or "")[:64], reason=reason[:2000]))
        except Exception:   # the log line is already written; never fail the caller over this
            pass

    def stats(self) -> dict:
        with self.session() as s:
            n, rx, disk = s.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.received_bytes), 0),
                                           func.coalesce(func.sum(Instance.stored_bytes), 0))).one()
            by_state = dict(s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
            queue = dict(s.execute(select(QueueItem.state, func.count()).group_by(QueueItem.state)).all())
            counts = {name: s.scalar(select(func.count()).select_from(model)) or 0
                      for name, model in (("patients", Patient), ("studies", Study), ("series", Series))}
            commitments = dict(s.execute(select(Commitment.state, func.count()).group_by(Commitment.state)).all())
            delayed, next_due = _delayed(s)
            nfail = s.scalar(select(func.count()).select_from(Failure)) or 0
            restarts, last_restart = s.execute(select(func.count(Failure.id), func.max(Failure.at))
                                               .where(Failure.stage == WATCHDOG)).one()
            recent = s.execute(select(Failure.at, Failure.stage, Failure.sop_uid, Failure.reason)
                               .order_by(Failure.id.desc()).limit(10)).all()
        return {"instances": n, "received_bytes": int(rx), "stored_bytes": int(disk), "by_state": by_state,
                "queue": queue, "delayed": delayed or 0, "next_due": next_due, "commitments": commitments, "failures": nfail, "recent_failures": recent,
                "worker_restarts": restarts or 0, "last_worker_restart": last_restart, **counts}


def _due(now: _dt.datetime):
    """Queue items whose compression delay (if any) has passed."""
    return or_(QueueItem.due_at.is_(None), QueueItem.due_at <= now)


def _delayed(s: Session) -> tuple[int, _dt.datetime | None]:
    """(queue items a compression delay still holds back, the earliest time one falls due; UTC)."""
    n, first = s.execute(select(func.count(QueueItem.id), func.min(QueueItem.due_at))
                         .where(QueueItem.due_at > _now())).one()
    return n or 0, first


def _reason(exc: BaseException) -> str:
    """The first line of what the driver said (without SQLAlchemy's statement dump and links)."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {first[0] if first else ''}".rstrip(": ")


def _add_missing_columns(conn) -> None:
    """Add the columns a newer version of this module declares to tables an older one created
    (nullable or with a server default, so existing rows stay valid)."""
    insp = inspect(conn)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable and col.server_default is None:
                raise IndexUnavailable(f"table {table.name} lacks column {col.name}, which cannot be added "
                                       f"to existing rows")
            sql = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(dialect=conn.dialect)}"
            if col.server_default is not None:
                sql += f" DEFAULT '{col.server_default.arg}'"
            conn.execute(text(sql))


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")       # an acknowledged instance is in the index after a power cut
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA case_sensitive_like=ON")  # DICOM wildcard matching is case-sensitive (PN aside)
    cur.close()
    # SQLite's built-in upper() changes ASCII letters only; person names are matched case-insensitively
    # by upper-casing both sides, so the column must be upper-cased the way Python upper-cases the key
    dbapi_conn.create_function("upper", 1, _unicode_upper, deterministic=True)


def _unicode_upper(value):
    return value.upper() if isinstance(value, str) else value
