"""The node's configuration: the shipped default, overlaying, and start-up errors that name the key."""
from __future__ import annotations

import os

import pytest
import yaml

from scp import config as C
from scp import node, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_file_and_packaged_copy_are_identical():
    with open(os.path.join(ROOT, "config", "nncodec.yaml"), encoding="utf-8") as f:
        assert f.read() == C.default_text()


def test_defaults_run_out_of_the_box():
    cfg = C.load(None)
    assert (cfg.ae_title, cfg.port, cfg.duplicates, cfg.device) == ("NNCODEC", 11112, "keep", "auto")
    assert cfg.access == {"echo": "any", "store": "any", "find": "peers", "get": "peers", "move": "peers"}
    assert [r.action for r in cfg.rules] == ["lossless"]
    assert C.resolved_index_url(cfg).startswith("sqlite:///") and cfg.peers == ()


def test_user_file_is_laid_over_the_defaults(tmp_path):
    p = tmp_path / "n.yaml"
    p.write_text("""
ae_title: ROUTER
storage: {path: /data/x, duplicates: replace}
peers:
  - {name: pacs, ae_title: PACS, host: 10.1.2.3, port: 104, allow: [find, move]}
compression:
  rules:
    - match: {modality: [mg], bits_stored: "9-12", sop_class: [CTImageStorage]}
      action: keep
    - action: {max_error: 3}
retrieve: {transfer_syntaxes: [ExplicitVRLittleEndian, 1.2.840.10008.1.2]}
""")
    cfg = C.load(str(p))
    assert cfg.ae_title == "ROUTER" and cfg.port == 11112 and cfg.fsync is True
    assert cfg.storage_path == "/data/x" and cfg.duplicates == "replace"
    assert cfg.rules[0].match == {"modality": ("MG",), "bits_stored": ((9, 12),),
                                  "sop_class": ("1.2.840.10008.5.1.4.1.1.2",)}
    assert (cfg.rules[1].action, cfg.rules[1].max_error) == ("max_error", 3)
    assert C.allowed(cfg, "PACS", "move") and not C.allowed(cfg, "PACS", "store")
    assert C.allowed(cfg, "ANYONE", "store") and not C.allowed(cfg, "ANYONE", "find")


@pytest.mark.parametrize("text, path, reason", [
    ("prot: 104", "prot", "unknown key"),
    ("port: abc", "port", "whole number"),
    ("port: 70000", "port", "between"),
    ("storage: {duplicates: overwrite}", "storage.duplicates", "one of keep, replace, reject"),
    ("storage: {pth: x}", "storage.pth", "unknown key"),
    ("access: {find: everyone}", "access.find", "one of any, peers"),
    ("compression: {device: gpu}", "compression.device", "one of auto, cpu, cuda"),
    ("compression: {rules: [{action: lossy}]}", "compression.rules[0].action",
     "one of lossless, jpegxl, htj2k, smallest, keep"),
    ("compression: {rules: [{action: jpegxl, after: 7x}]}", "compression.rules[0].after",
     "a number with a unit: d (days), h (hours), m (minutes) or s"),
    ("compression: {rules: [{action: lossless, after: 7}]}", "compression.rules[0].after", "e.g. 7d or 12h"),
    ("compression: {rules: [{action: keep, after: 7d}]}", "compression.rules[0].after", "not to action keep"),
    ("compression: {rules: [{action: {max_error: 0}}]}", "compression.rules[0].action.max_error", "between 1"),
    ("compression: {rules: [{match: {modaliy: CT}, action: keep}]}", "compression.rules[0].match.modaliy",
     "unknown key"),
    ("compression: {rules: [{match: {sop_class: [NoSuchStorage]}, action: keep}]}",
     "compression.rules[0].match.sop_class", "unknown SOP Class"),
    ("peers: [{ae_title: A, host: h}]", "peers[0].port", "is required"),
    ("peers: [{ae_title: 'WAY_TOO_LONG_AE_TITLE', host: h, port: 1}]", "peers[0].ae_title", "AE title"),
    ("peers: [{ae_title: A, host: h, port: 1, allow: [echo, push]}]", "peers[0].allow[1]", "one of"),
    ("retrieve: {transfer_syntaxes: [JPEGBaseline8Bit]}", "retrieve.transfer_syntaxes[0]", "losslessly"),
    ("retrieve: {transfer_syntaxes: [Nonsense]}", "retrieve.transfer_syntaxes[0]", "unknown transfer syntax"),
    ("limits: {dimse_timeout: -1}", "limits.dimse_timeout", "at least"),
    ("ae_title: [", "line", "not valid YAML"),
])
def test_a_wrong_key_or_value_names_the_key_and_the_reason(tmp_path, text, path, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load(str(p))
    assert path in str(info.value) and reason in str(info.value)


def test_serve_prints_one_line_and_returns_2_on_a_config_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("storage: {duplicates: sometimes}\n")
    assert node.serve(str(p)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "storage.duplicates" in err[0]


def test_status_before_anything_was_stored(tmp_path):
    p = tmp_path / "n.yaml"
    p.write_text(f"storage: {{path: {tmp_path / 'store'}}}\n")
    text = status.report(str(p))
    assert "NNCODEC" in text and "nothing stored yet" in text


# --- lossy ceilings and ratio rules -------------------------------------------------------------------

DRG_CEILINGS = {"CT": (8, {"HEAD": 5, "BRAIN": 5, "SKULL": 5, "HEADNECK": 5}), "CR": (10, {}), "DX": (10, {}),
                "MG": (15, {}), "MR": (7, {}), "RF": (6, {}), "XA": (6, {})}


def ceilings_of(cfg):
    return {m: (c.ratio, c.body_parts) for m, c in cfg.lossy_ceilings.by_modality.items()}


def rules_config(tmp_path, rules, **compression):
    p = tmp_path / "n.yaml"
    p.write_text(yaml.safe_dump({"compression": {"rules": rules, **compression}}))
    return C.load(str(p))


def test_default_ceilings_are_the_drg_consensus_and_no_rule_is_lossy():
    cfg = C.load(None)
    assert ceilings_of(cfg) == DRG_CEILINGS
    assert all(r.action == "lossless" for r in cfg.rules) and cfg.warnings == ()
    assert "RöFo 2009" in C.default_text() and "Strahlenschutzkommission" in C.default_text()


def test_the_commented_examples_in_the_default_file_are_valid_rules(tmp_path):
    lines = C.default_text().splitlines()
    start = lines.index("#  Examples:") + 1
    example = []
    for line in lines[start:]:
        if not line.startswith("#    "):
            break
        example.append(line[1:])
    rules = yaml.safe_load("\n".join(example))
    assert any(isinstance(r["action"], dict) and "ratio" in r["action"] for r in rules)
    cfg = rules_config(tmp_path, rules)
    assert [r.action for r in cfg.rules] == ["keep", "jpegxl", "max_error", "ratio", "ratio", "lossless"]
    assert cfg.warnings == ()


def test_ratio_rules_within_their_ceilings_are_accepted(tmp_path):
    cfg = rules_config(tmp_path, [
        {"name": "body CT", "match": {"modality": "ct", "body_part": ["chest", "ABDOMEN"]}, "action": {"ratio": 8}},
        {"name": "head CT", "match": {"modality": "CT", "body_part": "HEAD"}, "action": {"ratio": 5}},
        {"name": "radiographs", "match": {"modality": ["CR", "DX"]}, "action": {"ratio": 9.5}},
        {"name": "M* is MG or MR", "match": {"modality": "M*"}, "action": {"ratio": 7}},
        {"name": "anything", "action": {"ratio": 5}},
        {"action": "lossless"}])
    assert [(r.action, r.ratio) for r in cfg.rules[:5]] == [("ratio", 8.0), ("ratio", 5.0), ("ratio", 9.5),
                                                            ("ratio", 7.0), ("ratio", 5.0)]
    assert cfg.rules[0].match == {"modality": ("CT",), "body_part": ("CHEST", "ABDOMEN")}
    assert cfg.warnings == ()


@pytest.mark.parametrize("rule, words", [
    # CT without a body part could be a head: the head ceiling applies
    ({"name": "all CT", "match": {"modality": "CT"}, "action": {"ratio": 8}},
     ["'all CT'", "8:1", "5:1", "CT, body part HEAD"]),
    ({"name": "chest and wildcard", "match": {"modality": "CT", "body_part": ["CHEST", "H*"]}, "action": {"ratio": 6}},
     ["'chest and wildcard'", "6:1", "5:1", "CT, body part HEAD"]),
    ({"name": "radiographs", "match": {"modality": ["CR", "DX"]}, "action": {"ratio": 12}},
     ["'radiographs'", "12:1", "10:1", "CR"]),
    ({"name": "MG and MR", "match": {"modality": ["MG", "MR"]}, "action": {"ratio": 10}},
     ["'MG and MR'", "10:1", "7:1", "MR"]),
    # no modality: any modality, so the strictest ceiling of the table
    ({"name": "everything", "action": {"ratio": 6}},
     ["'everything'", "6:1", "5:1", "CT, body part HEAD", "no modality match"]),
    # a modality the guidance gives no number for
    ({"name": "ultrasound", "match": {"modality": ["US"]}, "action": {"ratio": 3}},
     ["'ultrasound'", "modality US", "no lossy ceiling"]),
    ({"name": "nuclear and MR", "match": {"modality": ["MR", "NM"]}, "action": {"ratio": 2}},
     ["'nuclear and MR'", "modality NM", "no lossy ceiling"]),
    ({"name": "U-something", "match": {"modality": ["U*"]}, "action": {"ratio": 2}},
     ["'U-something'", "modality U*", "no lossy ceiling"]),
])
def test_a_ratio_rule_above_a_ceiling_it_could_meet_is_refused_at_start_up(tmp_path, rule, words):
    with pytest.raises(C.ConfigError) as info:
        rules_config(tmp_path, [{"action": "keep", "match": {"modality": "SR"}}, rule])
    message = str(info.value)
    assert info.value.path == "compression.rules[1].action.ratio"
    for word in words + ["allow_above_ceiling"]:
        assert word in message, (word, message)


def test_allow_above_ceiling_accepts_the_rule_with_a_warning_logged_at_start_up(tmp_path, caplog):
    rules = [{"name": "teleradiology 12:1", "match": {"modality": ["CT", "US"]}, "action": {"ratio": 12},
              "allow_above_ceiling": True},
             {"name": "within", "match": {"modality": "MR"}, "action": {"ratio": 6}, "allow_above_ceiling": True}]
    cfg = rules_config(tmp_path, rules)
    assert [r.allow_above_ceiling for r in cfg.rules] == [True, True]
    assert len(cfg.warnings) == 2
    assert "'teleradiology 12:1'" in cfg.warnings[0] and "allow_above_ceiling" in cfg.warnings[0]
    assert "'within'" in cfg.warnings[1] and "not checked" in cfg.warnings[1]
    from scp.testing import running_node
    caplog.set_level("WARNING", logger="scp.node")
    with running_node(tmp_path / "s", compression={"rules": rules, "workers": 0}):
        pass
    logged = [r.getMessage() for r in caplog.records if r.name == "scp.node" and r.levelname == "WARNING"]
    assert any("'teleradiology 12:1'" in m for m in logged) and any("'within'" in m for m in logged)


def test_a_user_file_changes_adds_and_removes_single_ceilings(tmp_path):
    cfg = rules_config(tmp_path, [{"match": {"modality": "US"}, "action": {"ratio": 8}}],
                       lossy_ceilings={"us": 12, "MR": 6, "XA": None,
                                       "CT": {"ratio": 8, "body_part": {"head": 5, "Kopf": 5, "SCHAEDEL": 5}}})
    expected = dict(DRG_CEILINGS, US=(12, {}), MR=(6, {}), CT=(8, {"HEAD": 5, "KOPF": 5, "SCHAEDEL": 5}))
    del expected["XA"]
    assert ceilings_of(cfg) == expected
    with pytest.raises(C.ConfigError, match="modality XA.*no lossy ceiling"):
        rules_config(tmp_path, [{"match": {"modality": "XA"}, "action": {"ratio": 2}}], lossy_ceilings={"XA": None})


@pytest.mark.parametrize("text, path, reason", [
    ("compression: {rules: [{action: {ratio: 1}}]}", "compression.rules[0].action.ratio", "greater than 1"),
    ("compression: {rules: [{action: {ratio: 0.5}}]}", "compression.rules[0].action.ratio", "greater than 1"),
    ("compression: {rules: [{action: {ratio: '8'}}]}", "compression.rules[0].action.ratio", "a number"),
    ("compression: {rules: [{action: {ratio: true}}]}", "compression.rules[0].action.ratio", "a number"),
    ("compression: {rules: [{action: {ratio: .nan}}]}", "compression.rules[0].action.ratio", "a number"),
    ("compression: {rules: [{action: {ratio: 5, max_error: 2}}]}", "compression.rules[0].action",
     "exclude each other"),
    ("compression: {rules: [{action: {ratio: 5, quality: 2}}]}", "compression.rules[0].action.quality",
     "unknown key"),
    ("compression: {rules: [{action: lossless, allow_above_ceiling: true}]}",
     "compression.rules[0].allow_above_ceiling", "only to a rule with action {ratio: R}"),
    ("compression: {rules: [{action: {ratio: 5}, allow_above_ceiling: yes please}]}",
     "compression.rules[0].allow_above_ceiling", "true or false"),
    ("compression: {rules: [{match: {body_part: ''}, action: keep}]}", "compression.rules[0].match.body_part",
     "must not be empty"),
    ("compression: {lossy_ceilings: [CT]}", "compression.lossy_ceilings", "must be a mapping"),
    ("compression: {lossy_ceilings: {CT: 1}}", "compression.lossy_ceilings.CT", "greater than 1"),
    ("compression: {lossy_ceilings: {CT: high}}", "compression.lossy_ceilings.CT", "a number"),
    ("compression: {lossy_ceilings: {'C*': 8}}", "compression.lossy_ceilings", "without wildcards"),
    ("compression: {lossy_ceilings: {CT: {ratio: 8, body_part: {'HE*': 5}}}}",
     "compression.lossy_ceilings.CT.body_part", "without wildcards"),
    ("compression: {lossy_ceilings: {CT: {ratio: 8, body_part: [HEAD]}}}",
     "compression.lossy_ceilings.CT.body_part", "must be a mapping"),
    ("compression: {lossy_ceilings: {CT: {ratio: 8, body_part: {HEAD: 0}}}}",
     "compression.lossy_ceilings.CT.body_part.HEAD", "greater than 1"),
    ("compression: {lossy_ceilings: {CT: {body_part: {HEAD: 5}}}}", "compression.lossy_ceilings.CT.ratio",
     "is required"),
    ("compression: {lossy_ceilings: {CT: {ratio: 8, head: 5}}}", "compression.lossy_ceilings.CT.head",
     "unknown key"),
    ("compression: {lossy_ceilings: {ct: 8, CT: 7}}", "compression.lossy_ceilings", "given twice"),
])
def test_wrong_ratio_and_ceiling_values_name_the_key(tmp_path, text, path, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load(str(p))
    assert path in str(info.value) and reason in str(info.value), str(info.value)


@pytest.mark.parametrize("after, seconds", [("7d", 7 * 86400), ("12h", 12 * 3600), ("30m", 1800), ("45s", 45),
                                            ("1.5h", 5400)])
def test_compression_delay_units(after, seconds):
    cfg = C.load_dict({"compression": {"rules": [{"action": "jpegxl", "after": after}, {"action": "smallest"}]}})
    assert [(r.action, r.after) for r in cfg.rules] == [("jpegxl", seconds), ("smallest", 0.0)]
