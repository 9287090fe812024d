"""The node's configuration: the shipped default, overlaying, and start-up errors that name the key."""
from __future__ import annotations

import os

import pytest

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
    ("compression: {rules: [{action: lossy}]}", "compression.rules[0].action", "one of lossless, keep"),
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
