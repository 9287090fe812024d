"""Lossy compression ceilings: the highest compression ratio allowed per modality (and body part).

Why a separate module: the ceilings come from clinical guidance (the German
radiology society's consensus, RöFo 2009, which the Strahlenschutzkommission
told sites in 2011 not to exceed), not from the codec, and they are needed in
two places: at start-up, where a ``ratio`` rule that could meet an instance
with a lower ceiling is refused, and for each instance at compression time,
where an instance whose own modality and body part allow less than the rule
asks is compressed losslessly instead.  Both use the functions here, so the
two checks cannot disagree.

A modality absent from the table has no ceiling: the guidance gives no
number for it, so lossy compression by ratio is not allowed for it at all
(unless a rule explicitly overrides the ceilings).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class ModalityCeiling:
    """The ceiling for one modality: ``ratio`` for any body part, lower ones for the
    body parts in ``body_parts`` (upper-case Body Part Examined values)."""
    ratio: float
    body_parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ceilings:
    """Modality (upper-case) -> its ceiling."""
    by_modality: dict[str, ModalityCeiling] = field(default_factory=dict)


@dataclass(frozen=True)
class Limit:
    """A ceiling that applies, and where it comes from (``where``, e.g. "CT, body part HEAD").
    ``ratio`` None: the modality has no ceiling, so lossy compression by ratio is not allowed."""
    ratio: float | None
    where: str

    def allows(self, ratio: float) -> bool:
        return self.ratio is not None and ratio <= self.ratio

    def describe(self) -> str:
        if self.ratio is None:
            return f"{self.where} has no lossy ceiling"
        return f"the {ratio_text(self.ratio)} ceiling for {self.where}"


def ratio_text(r: float) -> str:
    """8.0 -> "8:1", 7.5 -> "7.5:1"."""
    return f"{r:g}:1"


def for_instance(ceilings: Ceilings, modality: str, body_part: str) -> Limit:
    """The ceiling for an instance with this Modality and Body Part Examined.  Without Body Part
    Examined the instance may be any body part, so the strictest of its modality applies (a CT
    without it may be a head CT)."""
    modality, body_part = modality.strip().upper(), body_part.strip().upper()
    entry = ceilings.by_modality.get(modality)
    if entry is None:
        return Limit(None, f"modality {modality or '(none)'}")
    if body_part in entry.body_parts:
        return Limit(entry.body_parts[body_part], f"{modality}, body part {body_part}")
    if not body_part and entry.body_parts and min(entry.body_parts.values()) < entry.ratio:
        return Limit(min(entry.body_parts.values()), f"{modality} without Body Part Examined")
    return Limit(entry.ratio, modality)


def for_rule(ceilings: Ceilings, modalities: tuple[str, ...] | None,
             body_parts: tuple[str, ...] | None) -> Limit:
    """The strictest ceiling among the instances a rule's ``modality`` and ``body_part``
    patterns (upper-case, None: the key is absent) could select.

    A rule without a modality key could meet any modality: the strictest ceiling of the
    table applies (instances of modalities without one are caught per instance).  A modality
    named without wildcards that has no ceiling, or a pattern that matches no modality in
    the table, gives a Limit without a ratio: such a rule cannot be allowed."""
    if modalities is None and not ceilings.by_modality:
        return Limit(None, "every modality (the rule has no modality match)")
    candidates: list[str] = []
    for pattern in modalities if modalities is not None else ("*",):
        if not _WILDCARDS & set(pattern):
            if pattern not in ceilings.by_modality:
                return Limit(None, f"modality {pattern}")
            candidates.append(pattern)
            continue
        found = [m for m in ceilings.by_modality if fnmatch.fnmatchcase(m, pattern)]
        if not found:
            return Limit(None, f"modality {pattern}")
        candidates += found
    limits = []
    for modality in dict.fromkeys(candidates):
        entry = ceilings.by_modality[modality]
        limits += [Limit(r, f"{modality}, body part {bp}") for bp, r in entry.body_parts.items()
                   if body_parts is None or any(fnmatch.fnmatchcase(bp, p) for p in body_parts)]
        # the modality's general ceiling, unless the rule names only body parts with their own ceilings
        if body_parts is None or any(_WILDCARDS & set(p) or p not in entry.body_parts for p in body_parts):
            limits.append(Limit(entry.ratio, modality))
    if modalities is None:
        limits = [Limit(lim.ratio, f"{lim.where} (the rule has no modality match, so it may meet any modality)")
                  for lim in limits]
    return min(limits, key=lambda lim: lim.ratio)
