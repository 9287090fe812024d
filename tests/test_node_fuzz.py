"""Seeded, bounded fuzzing of the Storage SCP (issue 14): hostile C-STOREs of every kind the generator in
:mod:`scp.fuzz` makes, over real associations to a node with a compression worker.

Afterwards the node answers C-ECHO, no thread died (the compression worker is alive and was never
restarted by the watchdog, the commitment thread runs, threading.enumerate() still lists them), the
compression queue drained, every request got a C-STORE response, and every instance answered 0x0000
comes back through C-GET in the syntax it was sent in: byte for byte when stored as received, with the
same elements and pixels when the node compressed it.  The longer run is ``python -m scp.fuzz``.
"""
from __future__ import annotations

import threading

from scp import fuzz

COUNT, SEED = 160, 20240614


def test_the_generator_is_seeded_and_covers_every_mutation():
    a, b = fuzz.cases(40, 5), fuzz.cases(40, 5)
    assert [c.data for c in a] == [c.data for c in b]
    kinds = {c.mutation for c in fuzz.cases(COUNT, SEED)}
    assert set(fuzz.MUTATIONS) <= kinds
    syntaxes = {c.transfer_syntax for c in fuzz.cases(COUNT, SEED)}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"} <= syntaxes


def test_a_seeded_fuzz_run_leaves_the_node_whole_and_every_acknowledged_instance_returnable(tmp_path):
    result = fuzz.run_in_process(str(tmp_path / "store"), COUNT, SEED, workers=1, drain_timeout=120)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result.items()))
    assert result["sent"] == COUNT and result["unanswered"] == 0, result
    assert result["accepted"] > 20 and result["refused"] > 20, result      # (the run reached both sides)
    assert result["returned_wrong"] == [], result["returned_wrong"]
    assert result["returned_exact"] + result["returned_equivalent"] == result["accepted"]
    assert result["echo_after"] and result["queue_drained"]
    assert result["workers_alive"] == 1 and result["worker_restarts"] == 0 and result["commitment_thread_alive"]
    assert {"nncodec-compress-0", "nncodec-compress-watchdog", "nncodec-commitment"} <= set(result["node_threads"])
    assert not [t for t in threading.enumerate()                                      # and stopped cleanly
                if t.name.startswith(("nncodec-compress", "nncodec-commitment"))]
