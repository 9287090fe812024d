"""Query/Retrieve matching (PS3.4 C.2.2.2) and C-FIND responses, over the index.

Why here and not in the handlers: matching is data-layer logic that C-FIND,
C-GET and C-MOVE share.  Each matching type of the standard is one small
function turning a key's value into an SQL condition on an indexed column:
single value, universal, wildcard (* and ?), list of UIDs, and date/time
range.  Person names match case-insensitively (as Orthanc's default); other
text case-sensitively.  Keys the index has no column for are answered from
the stored header of a representative instance and are not used for matching
(PS3.4 lets an SCP skip matching on optional keys).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from sqlalchemy import and_, exists, false, func, or_, select
from sqlalchemy.orm import Session

from .index import Instance, Patient, Series, Study, normalise_date, normalise_time

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
ORDER = {PATIENT: 0, STUDY: 1, SERIES: 2, IMAGE: 3}
ROOT_LEVELS = {"patient": (PATIENT, STUDY, SERIES, IMAGE), "study": (STUDY, SERIES, IMAGE)}
UNIQUE_KEY = {PATIENT: "PatientID", STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID", IMAGE: "SOPInstanceUID"}

# keyword -> (level, column, kind)
KEYS: dict[str, tuple[str, Any, str]] = {
    "PatientID": (PATIENT, Patient.patient_id, "text"),
    "PatientName": (PATIENT, Patient.patient_name, "pn"),
    "PatientBirthDate": (PATIENT, Patient.birth_date, "date"),
    "PatientSex": (PATIENT, Patient.sex, "text"),
    "StudyInstanceUID": (STUDY, Study.study_uid, "uid"),
    "StudyDate": (STUDY, Study.study_date, "date"),
    "StudyTime": (STUDY, Study.study_time, "time"),
    "AccessionNumber": (STUDY, Study.accession_number, "text"),
    "StudyID": (STUDY, Study.study_id, "text"),
    "StudyDescription": (STUDY, Study.study_description, "text"),
    "ReferringPhysicianName": (STUDY, Study.referring_physician, "pn"),
    "SeriesInstanceUID": (SERIES, Series.series_uid, "uid"),
    "Modality": (SERIES, Series.modality, "text"),
    "SeriesNumber": (SERIES, Series.series_number, "int"),
    "SeriesDescription": (SERIES, Series.series_description, "text"),
    "SeriesDate": (SERIES, Series.series_date, "date"),
    "SeriesTime": (SERIES, Series.series_time, "time"),
    "BodyPartExamined": (SERIES, Series.body_part, "text"),
    "SOPInstanceUID": (IMAGE, Instance.sop_uid, "uid"),
    "SOPClassUID": (IMAGE, Instance.sop_class_uid, "uid"),
    "InstanceNumber": (IMAGE, Instance.instance_number, "int"),
}
COMPUTED_LEVEL = {
    "NumberOfPatientRelatedStudies": PATIENT, "NumberOfPatientRelatedSeries": PATIENT,
    "NumberOfPatientRelatedInstances": PATIENT, "NumberOfStudyRelatedSeries": STUDY,
    "NumberOfStudyRelatedInstances": STUDY, "ModalitiesInStudy": STUDY, "SOPClassesInStudy": STUDY,
    "NumberOfSeriesRelatedInstances": SERIES,
}
ENTITY = {PATIENT: Patient, STUDY: Study, SERIES: Series, IMAGE: Instance}
MAX_VALUES = 1000           # values of one matching key (a list of UIDs, of names)
MAX_VALUE_LENGTH = 1024     # characters of one value (a wildcard pattern is matched by the database)


class QueryError(ValueError):
    """The identifier cannot be answered (status A900 for the handlers); the message says why."""


# --- the matching types (PS3.4 C.2.2.2) --------------------------------------------------------------

def values_of(value) -> list[str]:
    """The key's values as text: a MultiValue or a backslash-separated string is a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        items = [str(v) for v in value]
    else:
        items = str(value).split("\\")
    items = [v.strip() for v in items]
    return [v for v in items if v != ""]


def is_universal(values: list[str]) -> bool:
    """Empty, or nothing but '*': matches everything (C.2.2.2.3, C.2.2.2.4)."""
    return not values or all(v == "*" for v in values)


def single_value(column, value: str, kind: str):
    if kind == "pn":
        return func.upper(column) == value.upper()
    if kind == "int":
        try:
            return column == int(value)
        except ValueError:
            return false()
    return column == value


def _like_pattern(value: str) -> str:
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def wildcard(column, value: str, kind: str):
    if kind == "pn":
        return func.upper(column).like(_like_pattern(value.upper()), escape="\\")
    return column.like(_like_pattern(value), escape="\\")


def uid_list(column, values: list[str]):
    return column.in_(values) if len(values) > 1 else column == values[0]


def date_time_range(column, value: str, kind: str):
    """``A-B``, ``A-`` or ``-B`` (inclusive).  A time upper bound covers all of its last unit
    (1030 includes 10:30:59)."""
    norm = normalise_date if kind == "date" else normalise_time
    lo, _, hi = value.partition("-")
    lo, hi = norm(lo), norm(hi)
    conds = []
    if lo:
        conds.append(column >= lo)
    if hi:
        conds.append(column <= (hi + "~" if kind == "time" else hi))
    conds.append(column != "")
    return and_(*conds)


def condition(column, kind: str, value):
    """The SQL condition for one key, or None for universal matching."""
    values = values_of(value)
    if is_universal(values):
        return None
    if kind == "uid":
        return uid_list(column, values)
    parts = []
    for v in values:
        if kind in ("date", "time") and "-" in v:
            parts.append(date_time_range(column, v, kind))
        elif kind in ("text", "pn") and ("*" in v or "?" in v):
            parts.append(wildcard(column, v, kind))
        else:
            if kind == "date":
                v = normalise_date(v)
            elif kind == "time":
                v = normalise_time(v)
            parts.append(single_value(column, v, kind))
    return parts[0] if len(parts) == 1 else or_(*parts)


def modalities_in_study(value):
    """ModalitiesInStudy matches a study with at least one series of a listed modality."""
    cond = condition(Series.modality, "text", value)
    if cond is None:
        return None
    return exists(select(Series.id).where(Series.study_pk == Study.id, cond))


# --- queries -----------------------------------------------------------------------------------------

def check_level(identifier: Dataset, root: str, *, retrieve: bool = False) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in ROOT_LEVELS[root]:
        raise QueryError(f"Query/Retrieve Level {level!r} is not valid in the {root.title()} Root model")
    if retrieve and not values_of(identifier.get(UNIQUE_KEY[level])):
        raise QueryError(f"a retrieve at {level} level needs {UNIQUE_KEY[level]}")
    return level


def _select(level: str):
    if level == PATIENT:
        return select(Patient)
    if level == STUDY:
        return select(Study).join(Study.patient)
    if level == SERIES:
        return select(Series).join(Series.study).join(Study.patient)
    return select(Instance).join(Instance.series).join(Series.study).join(Study.patient)


def _check_key(elem) -> None:
    """A matching key this node can answer: no sequence, a bounded number of bounded values."""
    if elem.VR == "SQ":
        raise QueryError(f"{elem.keyword} must not be a sequence")
    values = values_of(elem.value)
    if len(values) > MAX_VALUES:
        raise QueryError(f"{elem.keyword} has {len(values)} values (at most {MAX_VALUES})")
    if any(len(v) > MAX_VALUE_LENGTH for v in values):
        raise QueryError(f"a value of {elem.keyword} is longer than {MAX_VALUE_LENGTH} characters")


def conditions(identifier: Dataset, level: str) -> list:
    """Conditions for every key at ``level`` and above (keys below the level are ignored)."""
    out = []
    for elem in identifier:
        kw = elem.keyword
        if kw in KEYS or kw == "ModalitiesInStudy":
            _check_key(elem)
        if kw in KEYS:
            key_level, column, kind = KEYS[kw]
            if ORDER[key_level] <= ORDER[level]:
                cond = condition(column, kind, elem.value)
                if cond is not None:
                    out.append(cond)
        elif kw == "ModalitiesInStudy" and level == STUDY:
            cond = modalities_in_study(elem.value)
            if cond is not None:
                out.append(cond)
    return out


def match(s: Session, identifier: Dataset, level: str, limit: int = 0) -> list:
    """The entities at ``level`` that match ``identifier``."""
    stmt = _select(level).where(*conditions(identifier, level)).order_by(ENTITY[level].id)
    if limit:
        stmt = stmt.limit(limit)
    return list(s.scalars(stmt))


def retrieve(s: Session, identifier: Dataset, root: str) -> list[Instance]:
    """The instances under every entity the C-GET/C-MOVE identifier matches."""
    level = check_level(identifier, root, retrieve=True)
    stmt = _select(IMAGE).where(*conditions(identifier, level)).order_by(Instance.id)
    return list(s.scalars(stmt))


# --- C-FIND responses --------------------------------------------------------------------------------

@dataclass
class _Entity:
    level: str
    row: Any

    def chain(self) -> dict[str, Any]:
        """The row and its ancestors by level."""
        out: dict[str, Any] = {}
        row = self.row
        for lvl in (IMAGE, SERIES, STUDY, PATIENT)[3 - ORDER[self.level]:]:
            out[lvl] = row
            row = {IMAGE: lambda r: r.series, SERIES: lambda r: r.study, STUDY: lambda r: r.patient,
                   PATIENT: lambda r: None}[lvl](row)
        return out


def _instances_under(level: str, row):
    q = select(Instance).join(Instance.series).join(Series.study)
    if level == PATIENT:
        return q.where(Study.patient_pk == row.id)
    if level == STUDY:
        return q.where(Series.study_pk == row.id)
    if level == SERIES:
        return q.where(Instance.series_pk == row.id)
    return q.where(Instance.id == row.id)


def computed(s: Session, keyword: str, level: str, row):
    if keyword == "ModalitiesInStudy":
        return sorted(m for m in s.scalars(select(Series.modality).where(Series.study_pk == row.id).distinct()) if m)
    if keyword == "SOPClassesInStudy":
        return sorted(s.scalars(select(Instance.sop_class_uid).join(Instance.series)
                                .where(Series.study_pk == row.id).distinct()))
    if keyword.endswith("RelatedStudies"):
        return s.scalar(select(func.count(Study.id)).where(Study.patient_pk == row.id))
    if keyword.endswith("RelatedSeries"):
        q = select(func.count(Series.id)).join(Series.study)
        return s.scalar(q.where(Study.patient_pk == row.id) if level == PATIENT else q.where(Series.study_pk == row.id))
    if keyword.endswith("RelatedInstances"):
        return s.scalar(select(func.count()).select_from(_instances_under(level, row).subquery()))
    raise KeyError(keyword)


def _column_value(row, column):
    v = getattr(row, column.key)
    return "" if v is None else v


def response(s: Session, identifier: Dataset, level: str, row) -> Dataset:
    """The C-FIND response for one matching entity: every requested key, with a value when known."""
    ds = Dataset()
    chain = _Entity(level, row).chain()
    header: Dataset | None = None
    unique = UNIQUE_KEY[level]
    keys = [e for e in identifier if e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")]
    if unique not in identifier:
        keys.append(None)
    for elem in keys:
        kw = elem.keyword if elem is not None else unique
        vr = elem.VR if elem is not None else dictionary_VR(kw)
        value: Any = None
        if kw in KEYS and ORDER[KEYS[kw][0]] <= ORDER[level]:
            value = _column_value(chain[KEYS[kw][0]], KEYS[kw][1])
        elif kw in COMPUTED_LEVEL and COMPUTED_LEVEL[kw] == level:
            value = computed(s, kw, level, row)
        elif elem is not None and kw and vr != "SQ":
            if header is None:
                first = s.scalars(_instances_under(level, row).order_by(Instance.id).limit(1)).first()
                header = _header(first)
            if elem.tag in header:
                ds[elem.tag] = header[elem.tag]
                continue
        if elem is None:
            setattr(ds, kw, value)
            continue
        if vr == "SQ":
            ds.add_new(elem.tag, vr, [])
        elif value is None or value == "":
            ds.add_new(elem.tag, vr, None)
        else:
            ds.add_new(elem.tag, vr, [str(v) for v in value] if isinstance(value, list) else str(value))
    if any(isinstance(e.value, str) and not e.value.isascii() for e in ds if e.VR != "SQ") or any(
            not str(e.value).isascii() for e in ds if e.VR == "PN" and e.value):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    return ds


def _header(inst: Instance | None) -> Dataset:
    if inst is None:
        return Dataset()
    try:
        return Dataset.from_json(json.loads(inst.header or "{}"))
    except Exception:
        return Dataset()


def find(s: Session, identifier: Dataset, root: str, limit: int = 0) -> Iterator[Dataset]:
    """C-FIND: responses for every match (``limit`` 0 = all)."""
    level = check_level(identifier, root)
    for row in match(s, identifier, level, limit):
        yield response(s, identifier, level, row)
