"""Which compression an instance gets: the first matching rule of ``compression.rules``.

A rule's ``after`` delays the action: the instance is served as received until
receipt + ``after``; the due time is fixed (and kept in the queue) when the
instance arrives.

Why a separate module: the decision depends only on facts the index already
holds (modality, body part, SOP class, sending AE title, bits stored,
photometric interpretation, how it arrived), so it can be tested and explained
without a codec, a file or a network.  An instance that arrived lossy-compressed
is left alone unless a rule asks for it with ``received_lossy: true``:
re-encoding decoded JPEG pixels gains nothing and a second lossy step loses more.

A ``ratio`` rule is also held to the lossy ceiling of the instance's modality
and body part (``compression.lossy_ceilings``): where the ceiling is lower than
the rule asks, or the modality has none, the instance is compressed losslessly
instead.  Start-up already refuses rules that could meet such instances; this
per-instance check is the second line, and :func:`cap` lets the compressor
repeat it with the attributes of the stored file itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pydicom.uid as U

from dicom_nncodec import NNCodecLossless, NNCodecLossy
from dicom_nncodec.syntax import JPEGXL as JPEGXLSyntax, JPEGXLJPEGRecompression, JPEGXLLossless

from . import ceilings as CL
from .config import Rule, text_matches

KEEP, LOSSLESS, MAX_ERROR, RATIO = "keep", "lossless", "max_error", "ratio"
JPEGXL, HTJ2K, SMALLEST = "jpegxl", "htj2k", "smallest"
# the lossless actions, each bit-exact: the syntax an action stores in (SMALLEST: one of two)
LOSSLESS_SYNTAXES = {LOSSLESS: (str(NNCodecLossless),), JPEGXL: (str(JPEGXLLossless),),
                     HTJ2K: (str(U.HTJ2KLossless),), SMALLEST: (str(NNCodecLossless), str(JPEGXLLossless))}

LOSSY_SYNTAXES = frozenset(str(u) for u in (
    U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLSNearLossless, U.JPEG2000, U.HTJ2K,
    U.JPEG2000MC, U.MPEG2MPML, U.MPEG2MPHL, U.MPEG4HP41, U.MPEG4HP41BD, U.MPEG4HP422D, U.MPEG4HP423D,
    U.MPEG4HP42STEREO, U.HEVCMP51, U.HEVCM10P51, NNCodecLossy, JPEGXLSyntax, JPEGXLJPEGRecompression))


@dataclass(frozen=True)
class Facts:
    modality: str
    sop_class: str
    calling_ae: str
    bits_stored: int
    photometric: str
    received_transfer_syntax: str
    body_part: str = ""

    @property
    def received_lossy(self) -> bool:
        return self.received_transfer_syntax in LOSSY_SYNTAXES


@dataclass(frozen=True)
class Decision:
    """What to do with one instance.  ``rule`` names the rule that decided (or why none did);
    ``ratio`` is R for RATIO, and ``ceiling`` the highest ratio any frame of the result may
    reach (None: not limited); ``check_ceilings`` False: the rule says ``allow_above_ceiling``,
    so no ceiling applies; ``note`` says why the rule's own action was replaced (empty when it
    was not); ``after``: seconds from receipt before the action is due (the rule's ``after``)."""
    action: str
    max_error: int
    rule: str
    ratio: float = 0.0
    ceiling: float | None = None
    check_ceilings: bool = True
    note: str = ""
    after: float = 0.0

    @property
    def is_lossless(self) -> bool:
        """The result holds exactly the stored pixels (checked bit-exact before it replaces them)."""
        return self.action in LOSSLESS_SYNTAXES

    def done_by(self, transfer_syntax: str) -> bool:
        """An instance stored in ``transfer_syntax`` already is what this lossless action makes."""
        return transfer_syntax in LOSSLESS_SYNTAXES.get(self.action, ())

    @property
    def lossy(self) -> bool:
        """The result replaces the original by a derived instance with a new SOP Instance UID."""
        return self.action in (MAX_ERROR, RATIO)


def matches(rule: Rule, f: Facts) -> bool:
    m = rule.match
    if m.get("received_lossy", False) != f.received_lossy:
        return False
    if "modality" in m and not text_matches(m["modality"], f.modality.upper()):
        return False
    if "body_part" in m and not text_matches(m["body_part"], f.body_part.strip().upper()):
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


def decide(rules: tuple[Rule, ...], f: Facts, ceilings: CL.Ceilings) -> Decision:
    """The first matching rule's action, a ``ratio`` held to the instance's lossy ceiling."""
    for rule in rules:
        if matches(rule, f):
            decision = Decision(rule.action, rule.max_error, rule.name, rule.ratio,
                                check_ceilings=not rule.allow_above_ceiling, after=rule.after)
            return cap(decision, ceilings, f.modality, f.body_part)
    reason = "arrived lossy-compressed" if f.received_lossy else "no rule matches"
    return Decision(KEEP, 0, reason)


def cap(decision: Decision, ceilings: CL.Ceilings, modality: str, body_part: str) -> Decision:
    """``decision`` for an instance with this Modality and Body Part Examined: a RATIO above
    their ceiling (or for a modality without one) becomes lossless; one within it carries the
    ceiling, so that the compressor can check the ratio it reaches."""
    if decision.action != RATIO or not decision.check_ceilings:
        return decision
    limit = CL.for_instance(ceilings, modality, body_part)
    if not limit.allows(decision.ratio):
        over = "but" if limit.ratio is None else "above"
        return lossless_instead(decision, f"rule {decision.rule!r} asks {CL.ratio_text(decision.ratio)}, "
                                          f"{over} {limit.describe()}")
    ceiling = limit.ratio if decision.ceiling is None else min(decision.ceiling, limit.ratio)
    return replace(decision, ceiling=ceiling)


def lossless_instead(decision: Decision, why: str) -> Decision:
    """Lossless compression in place of a lossy action, saying why."""
    return Decision(LOSSLESS, 0, decision.rule, note=f"compressed losslessly instead: {why}")
