"""The node benchmark (``python -m scp.nodebench``) runs end to end on two tiny generated slices.

Its speeds are not asserted (they depend on the machine); the report's structure is.  DCMTK's dcmsend
and getscu are needed (skipped with a message without them); Orthanc is measured beside the node when
it is installed, and without it the node is measured alone with the verdicts "n/a".
"""
from __future__ import annotations

import json

import pytest

from scp import nodebench


def test_node_bench_reports_its_figures(tmp_path, capsys):
    if not (nodebench.find_dcmtk("dcmsend") and nodebench.find_dcmtk("getscu")):
        pytest.skip("DCMTK's dcmsend and getscu not found (pynetdicom's apps of the same names do not count); "
                    "install the peers: apt-get install dcmtk")
    with_orthanc = nodebench.find_orthanc() is not None
    out = tmp_path / "report.json"
    status = nodebench.main(["--slices", "2", "--size", "32", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["study"]["instances"] == 2 and report["study"]["studies"] == 1
    assert report["study"]["images"] == ["32x32 16-bit signed"]
    assert len(report["machine"]["loadavg_start"]) == 3 and len(report["machine"]["loadavg_end"]) == 3

    systems = [report["node"]] + ([report["orthanc"]] if with_orthanc else [])
    for res in systems:
        assert "error" not in res, res
        assert res["ingest"]["ok"] and res["ingest"]["stored"] == 2
        assert res["ingest"]["seconds"] > 0 and res["ingest"]["instances_per_s"] > 0 and res["ingest"]["mb_per_s"] > 0
        r = res["retrieve"]
        assert r["ok"] and r["seconds"] > 0
        assert r["verified"]["equal"] == 2 and r["verified"]["mismatched"] == r["verified"]["missing"] == 0
        assert r["verified"]["transfer_syntaxes"] == {"Explicit VR Little Endian": 2}
        for phase in (res["ingest"], r):
            assert set(phase["cpu"]) >= {"wall_s", "server_cpu_s", "others_cpu_s", "machine_busy_cpu_s"}
        commands = "\n".join(res["commands"])
        assert "dcmsend -aet BENCHSCU" in commands and "getscu -aet BENCHSCU" in commands
        assert "QueryRetrieveLevel=STUDY" in commands

    node = report["node"]
    assert node["config"]["compression"] == {"workers": 1, "rules": [{"action": "lossless"}]}
    c = node["compression"]
    assert c["ok"] and c["compressed"] == 2 and c["failed"] == 0
    assert 0 <= c["after_ingest_s"] <= c["from_ingest_start_s"]
    assert node["bytes"]["received"] > 0 and node["bytes"]["on_disk_files"] > 0 and node["bytes"]["ratio"] > 0
    assert node["exit_status"] == 0

    d = report["diagnostics"]
    assert d["decode_only"]["instances"] == 2 and d["decode_only"]["seconds"] > 0
    assert d["uncompressed_node"]["retrieve"]["verified"]["equal"] == 2

    targets = report["targets"]
    assert set(targets) == {"ingest", "retrieve"}
    for t in targets.values():
        assert t["verdict"] in (("PASS", "FAIL") if with_orthanc else ("n/a",)), t
    if with_orthanc:
        assert report["orthanc"]["label"].startswith("Orthanc ")
        assert report["orthanc"]["bytes"]["on_disk_files"] > 0
    else:
        assert report["orthanc"] is None and "orthanc_missing" in report

    for line in ("ingest, dcmsend", "backlog compressed, after ingest", "bytes on disk", "retrieve study, getscu",
                 "pixels equal to the originals", "targets:", "commands:", "load average"):
        assert line in text, line
    assert text.count("PASS") + text.count("FAIL") + text.count("n/a  ") >= 2
