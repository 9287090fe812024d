"""The load benchmark runs end to end (its figures are not asserted: they depend on the machine)."""
from __future__ import annotations

import json

from scp import loadbench


def test_loadbench_runs_clean_with_bounded_memory(tmp_path, capsys):
    out = tmp_path / "figures.json"
    status = loadbench.main(["--senders", "3", "--retrievers", "2", "--seconds", "6", "--size", "64",
                             "--max-rss-mb", "4096", "--json", str(out)])
    text = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert status == 0, text
    assert figures["failures"] == 0 and figures["instances"] > 10 and figures["gets"] > 0
    assert figures["finds"] == figures["gets"] or figures["finds"] >= figures["gets"]
    assert 0 < figures["rss_mb"]["start"] <= figures["rss_mb"]["peak"] <= 4096
    assert figures["node_exit"] == 0
    for line in ("stored", "retrieved", "failures   0", "node RSS"):
        assert line in text
