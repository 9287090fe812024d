"""Which compression an instance gets: the first matching rule of ``compression.rules``.

Why a separate module: the decision depends only on facts the index already
holds (modality, SOP class, sending AE title, bits stored, photometric
interpretation, how it arrived), so it can be tested and explained without a
codec, a file or a network.  An instance that arrived lossy-compressed is
left alone unless a rule asks for it with ``received_lossy: true``:
re-encoding decoded JPEG pixels gains nothing and a second lossy step loses more.
"""
from __future__ import annotations

from dataclasses import dataclass

import pydicom.uid as U

from dicom_nncodec import NNCodecLossy

from .config import Rule, text_matches

KEEP, LOSSLESS, MAX_ERROR = "keep", "lossless", "max_error"

LOSSY_SYNTAXES = frozenset(str(u) for u in (
    U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLSNearLossless, U.JPEG2000, U.HTJ2K,
    U.JPEG2000MC, U.MPEG2MPML, U.MPEG2MPHL, U.MPEG4HP41, U.MPEG4HP41BD, U.MPEG4HP422D, U.MPEG4HP423D,
    U.MPEG4HP42STEREO, U.HEVCMP51, U.HEVCM10P51, NNCodecLossy))


@dataclass(frozen=True)
class Facts:
    modality: str
    sop_class: str
    calling_ae: str
    bits_stored: int
    photometric: str
    received_transfer_syntax: str

    @property
    def received_lossy(self) -> bool:
        return self.received_transfer_syntax in LOSSY_SYNTAXES


@dataclass(frozen=True)
class Decision:
    action: str
    max_error: int
    rule: str


def matches(rule: Rule, f: Facts) -> bool:
    m = rule.match
    if m.get("received_lossy", False) != f.received_lossy:
        return False
    if "modality" in m and not text_matches(m["modality"], f.modality.upper()):
        return False
    if "sop_class" in m and f.sop_class not in m["sop_class"]:
        return False
    if "calling_ae" in m and not text_matches(m["calling_ae"], f.calling_ae.strip()):
        return False
    if "photometric" in m and not text_matches(m["photometric"], f.photometric.upper()):
        return False
    if "bits_stored" in m and not any(lo <= f.bits_stored <= hi for lo, hi in m["bits_stored"]):
        return False
    return True


def decide(rules: tuple[Rule, ...], f: Facts) -> Decision:
    for rule in rules:
        if matches(rule, f):
            return Decision(rule.action, rule.max_error, rule.name)
    reason = "arrived lossy-compressed" if f.received_lossy else "no rule matches"
    return Decision(KEEP, 0, reason)
