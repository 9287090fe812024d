"""The compression decision: which rule matches, and how a ``ratio`` rule is held to the lossy ceilings
of the instance (no codec, no files: facts and the shipped default ceilings)."""
from __future__ import annotations

import pydicom.uid as U
import pytest

from scp import ceilings as CL
from scp import config as C
from scp import rules as R

CEILINGS = C.load(None).lossy_ceilings
EXPLICIT = str(U.ExplicitVRLittleEndian)


def facts(modality="CT", body_part="", calling_ae="SCANNER", received=EXPLICIT, bits_stored=12):
    return R.Facts(modality, "1.2.840.10008.5.1.4.1.1.2", calling_ae, bits_stored, "MONOCHROME2", received, body_part)


def rule(action="ratio", ratio=0.0, allow=False, name="r", **match):
    return C.Rule(name, {k: tuple(v) if isinstance(v, list) else v for k, v in match.items()}, action,
                  ratio=ratio, allow_above_ceiling=allow)


@pytest.mark.parametrize("modality, body_part, expected", [
    ("CT", "HEAD", (5, "CT, body part HEAD")),
    ("ct", " brain ", (5, "CT, body part BRAIN")),
    ("CT", "SKULL", (5, "CT, body part SKULL")),
    ("CT", "CHEST", (8, "CT")),
    ("CT", "", (5, "CT without Body Part Examined")),
    ("CR", "CHEST", (10, "CR")),
    ("DX", "HAND", (10, "DX")),
    ("MG", "BREAST", (15, "MG")),
    ("MR", "HEAD", (7, "MR")),
    ("RF", "", (6, "RF")),
    ("XA", "HEART", (6, "XA")),
    ("US", "ABDOMEN", (None, "modality US")),
    ("", "", (None, "modality (none)")),
])
def test_ceiling_of_an_instance(modality, body_part, expected):
    limit = CL.for_instance(CEILINGS, modality, body_part)
    assert (limit.ratio, limit.where) == expected


def test_a_ratio_rule_within_the_instances_ceiling_keeps_its_ratio_and_carries_the_ceiling():
    rules = (rule(ratio=7, modality=["CT"], body_part=["CHEST", "ABDOMEN"]), rule("lossless", name="rest"))
    d = R.decide(rules, facts("CT", "chest"), CEILINGS)
    assert (d.action, d.ratio, d.ceiling, d.rule, d.note) == (R.RATIO, 7.0, 8.0, "r", "")
    assert d.lossy
    # a CT without Body Part Examined does not match a rule that names body parts: the next rule decides
    d = R.decide(rules, facts("CT", ""), CEILINGS)
    assert (d.action, d.rule, d.lossy) == (R.LOSSLESS, "rest", False)


def test_an_instance_whose_ceiling_is_lower_than_the_rule_asks_is_compressed_losslessly():
    # such a rule is refused at start-up; the per-instance check still holds if one gets through
    # (here built directly), or if the file's attributes differ from what the index holds
    rules = (rule(ratio=8, modality=["CT"]),)
    d = R.decide(rules, facts("CT", "HEAD"), CEILINGS)
    assert (d.action, d.ratio, d.rule, d.lossy) == (R.LOSSLESS, 0.0, "r", False)
    assert "losslessly instead" in d.note and "8:1" in d.note and "5:1 ceiling for CT, body part HEAD" in d.note
    assert R.decide(rules, facts("CT", "PELVIS"), CEILINGS).action == R.RATIO


def test_a_rule_without_modality_meets_modalities_without_a_ceiling_losslessly():
    rules = (rule(ratio=4.5),)          # accepted at start-up: 4.5 is below every ceiling
    assert C.load_dict({"compression": {"rules": [{"action": {"ratio": 4.5}}]}}).rules[0].ratio == 4.5
    for modality, ceiling in (("CT", 5.0), ("MR", 7.0), ("MG", 15.0)):
        d = R.decide(rules, facts(modality, "HEAD"), CEILINGS)
        assert (d.action, d.ceiling) == (R.RATIO, ceiling)
    for modality in ("US", "NM", "OT", "SM"):
        d = R.decide(rules, facts(modality), CEILINGS)
        assert d.action == R.LOSSLESS and f"modality {modality} has no lossy ceiling" in d.note


def test_allow_above_ceiling_skips_the_per_instance_check():
    rules = (rule(ratio=12, allow=True, modality=["CT", "US"]),)
    for f in (facts("CT", "HEAD"), facts("US")):
        d = R.decide(rules, f, CEILINGS)
        assert (d.action, d.ratio, d.ceiling, d.note) == (R.RATIO, 12.0, None, "")


def test_cap_repeats_the_check_with_the_stored_files_attributes():
    d = R.decide((rule(ratio=7, modality=["CT"], body_part=["CHEST"]),), facts("CT", "CHEST"), CEILINGS)
    assert R.cap(d, CEILINGS, "CT", "CHEST") == d
    head = R.cap(d, CEILINGS, "CT", "HEAD")              # the file says head, the index said chest
    assert head.action == R.LOSSLESS and "CT, body part HEAD" in head.note
    assert R.cap(d, CEILINGS, "US", "").action == R.LOSSLESS
    for other in (R.Decision(R.LOSSLESS, 0, "x"), R.Decision(R.MAX_ERROR, 2, "x"), R.Decision(R.KEEP, 0, "x")):
        assert R.cap(other, CEILINGS, "US", "") == other     # only ratio rules have ceilings


def test_body_part_matching_is_case_insensitive_with_wildcards():
    rules = (rule("keep", name="legs", body_part=["LEG*", "KNEE"]), rule("lossless", name="rest"))
    assert R.decide(rules, facts("CR", "knee"), CEILINGS).rule == "legs"
    assert R.decide(rules, facts("CR", "LEG_LEFT"), CEILINGS).rule == "legs"
    assert R.decide(rules, facts("CR", "HAND"), CEILINGS).rule == "rest"
    assert R.decide((rule("keep", body_part=["*"]),), facts("CR", ""), CEILINGS).action == R.KEEP


def test_received_lossy_instances_are_left_alone_by_ratio_rules_too():
    rules = (rule(ratio=7, modality=["CT"], body_part=["CHEST"]),)
    d = R.decide(rules, facts("CT", "CHEST", received=str(U.JPEGBaseline8Bit)), CEILINGS)
    assert (d.action, d.rule) == (R.KEEP, "arrived lossy-compressed")


@pytest.mark.parametrize("modalities, body_parts, expected", [
    (None, None, 5.0),
    (("CT",), None, 5.0),
    (("CT",), ("CHEST",), 8.0),
    (("CT",), ("HEAD", "BRAIN"), 5.0),
    (("CT",), ("*",), 5.0),
    (("CR", "DX"), None, 10.0),
    (("MG",), None, 15.0),
    (("M?",), None, 7.0),
    (("RF", "MG"), None, 6.0),
    (("US",), None, None),
    (("CT", "OT"), ("CHEST",), None),
])
def test_strictest_ceiling_a_rule_could_meet(modalities, body_parts, expected):
    assert CL.for_rule(CEILINGS, modalities, body_parts).ratio == expected
