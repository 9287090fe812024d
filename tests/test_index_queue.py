"""The compression queue's leases, on SQLite and on a real PostgreSQL server (each test runs on both).

What must hold for several nodes and ``dicom-nncodec worker`` processes sharing one index: an item is
claimed by one worker at a time, also by competing processes; a lease renewed stays with its worker; a
lease that ran out is taken by another worker, and the first one's result is then discarded; items of
workers of this host that died go back at once, those of other hosts only when their lease ran out; an
instance that worker after worker dies on is recorded as failed; an index made by the previous version
gets the lease columns; a database that cannot be used is a clear error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from scp import owners
from scp.index import (FAILED, MAX_ATTEMPTS, PENDING, QUEUED, RUNNING, Index, IndexUnavailable, InstanceFacts,
                       QueueItem)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER = "another-host.example:4242"        # a worker on another machine (never judged gone here)


@pytest.fixture
def index(index_url, tmp_path):
    url = index_url or f"sqlite:///{tmp_path / 'index.sqlite'}"
    idx = Index(url)
    idx.create()
    yield idx
    idx.dispose()


def facts(n: int) -> InstanceFacts:
    return InstanceFacts(
        patient_id="P1", patient_name="TEST^QUEUE", birth_date="", sex="", study_uid="1.2.3.1", study_date="",
        study_time="", accession_number="", study_id="", study_description="", referring_physician="",
        series_uid="1.2.3.1.1", modality="CT", series_number=1, series_description="", series_date="",
        series_time="", body_part="", sop_uid=f"1.2.3.1.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=n, rows=8, columns=8, frames=1, bits_stored=12, photometric="MONOCHROME2",
        transfer_syntax="1.2.840.10008.1.2.1", is_image=True, header="{}")


def queue(idx: Index, n: int) -> list[int]:
    return [idx.add(facts(i), f"objects/{i}.dcm", 100, "SCU", "keep", PENDING).instance_id for i in range(n)]


def items(idx: Index) -> dict[int, QueueItem]:
    with idx.session() as s:
        return {q.instance_pk: q for q in s.query(QueueItem)}


def test_competing_processes_claim_every_item_exactly_once(index):
    """Four processes claim from one queue as fast as they can: no item twice, none left."""
    queue(index, 60)
    script = (
        "import json, sys\n"
        "from scp.index import Index\n"
        "idx = Index(sys.argv[1]); got = []\n"
        "while True:\n"
        "    job = idx.claim(sys.argv[2], 60)\n"
        "    if job is None: break\n"
        "    got.append(job.instance_id)\n"
        "print(json.dumps(got))\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script, index.url, f"{OTHER}:p{k}-0"], env=env,
                              stdout=subprocess.PIPE, text=True) for k in range(4)]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed.append(json.loads(out))
    every = [i for c in claimed for i in c]
    assert len(every) == 60 and len(set(every)) == 60
    assert {q.state for q in items(index).values()} == {RUNNING}
    assert index.claim("late:1:x-0") is None


def test_a_lease_that_ran_out_goes_to_another_worker_and_the_first_result_is_discarded(index):
    (instance,) = queue(index, 1)
    first = index.claim(f"{OTHER}:a-0", lease_seconds=1)
    assert first is not None and first.instance_id == instance and first.owner == f"{OTHER}:a-0"
    assert index.claim(f"{OTHER}:b-0") is None             # held
    time.sleep(1.3)
    second = index.claim(f"{OTHER}:b-0", lease_seconds=60)
    assert second is not None and second.instance_id == instance
    assert index.renew([first, second], 60) == {second.queue_id}
    done, remove = index.finish_compressed(first, "objects/first.dcm", "1.2.3", 10, None, None)
    assert (done, remove) == (False, "objects/first.dcm")   # the stale worker's file is thrown away
    assert items(index)[instance].lease_owner == second.owner
    done, remove = index.finish_compressed(second, "objects/second.dcm", "1.2.3", 10, None, None)
    assert (done, remove) == (True, "objects/0.dcm")
    assert index.queue_length() == 0 and index.stored()[0].path == "objects/second.dcm"


def test_a_renewed_lease_stays_with_its_worker(index):
    queue(index, 1)
    job = index.claim(f"{OTHER}:a-0", lease_seconds=1)
    for _ in range(5):
        time.sleep(0.4)
        assert index.renew([job], 1) == {job.queue_id}
        assert index.claim(f"{OTHER}:b-0") is None


def test_release_puts_an_item_back_without_counting_an_attempt(index):
    (instance,) = queue(index, 1)
    for _ in range(MAX_ATTEMPTS + 2):
        job = index.claim(f"{OTHER}:a-0")
        index.release(job)
    q = items(index)[instance]
    assert (q.state, q.attempts, q.lease_owner, q.lease_until) == (QUEUED, 0, "", None)


def test_claims_of_dead_workers_of_this_host_go_back_at_start_others_wait_for_their_lease(index):
    a, b, c = queue(index, 3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    index.claim(f"{owners.host()}:{dead}:x-0")               # a process of this host that has ended
    index.claim(f"{OTHER}:y-0")                              # a process of another host
    index.claim(owners.name("not-running", 0))               # a stopped compressor of this process
    assert index.recover_queue() == 2
    states = {k: (q.state, q.lease_owner) for k, q in items(index).items()}
    assert states == {a: (QUEUED, ""), b: (RUNNING, f"{OTHER}:y-0"), c: (QUEUED, "")}
    owners.alive("running", True)
    try:
        index.claim(owners.name("running", 0))
        assert index.recover_queue() == 0                    # a compressor of this process that runs
    finally:
        owners.alive("running", False)
    assert index.recover_queue(everything=True) == 2         # fsck --repair, with the storage to itself


def test_an_instance_that_workers_keep_dying_on_is_recorded_as_failed(index):
    (instance,) = queue(index, 1)
    for k in range(MAX_ATTEMPTS):
        assert index.claim(f"{OTHER}:w{k}-0", lease_seconds=0.2) is not None
        time.sleep(0.3)
    assert index.claim(f"{OTHER}:last-0") is None
    assert index.queue_length() == 0
    row = index.stored()[0]
    assert row.state == FAILED
    st = index.stats()
    assert st["failures"] == 1 and "3 compression workers stopped while on it" in st["recent_failures"][0][3]


def test_an_index_made_before_leases_gets_their_columns(index):
    queue(index, 1)
    with index.engine.begin() as conn:
        for col in ("lease_owner", "lease_until"):
            conn.execute(text(f"ALTER TABLE compression_queue DROP COLUMN {col}"))
    index.dispose()
    again = Index(index.url)
    try:
        again.create()
        job = again.claim(f"{OTHER}:a-0")
        assert job is not None and items(again)[job.instance_id].lease_owner == f"{OTHER}:a-0"
    finally:
        again.dispose()


def test_a_database_that_cannot_be_used_is_a_clear_error(index_url):
    if not index_url:
        url = "sqlite:////nonexistent-folder/for/sure/index.sqlite"
    else:
        from sqlalchemy.engine import make_url
        u = make_url(index_url)
        url = u.set(port=1, password="secret").render_as_string(hide_password=False)
    idx = Index(url)
    with pytest.raises(IndexUnavailable) as exc:
        idx.create()
    message = str(exc.value)
    assert "OperationalError" in message and "secret" not in message
    with pytest.raises(IndexUnavailable, match="No module named 'nosuchdriver'|Can't load plugin"):
        Index("postgresql+nosuchdriver://u@127.0.0.1/x")


def test_the_compressor_renews_the_leases_of_the_jobs_in_hand(index, tmp_path, caplog):
    from scp.compressor import Compressor
    from scp.storage import Storage
    from scp.testing import node_config
    cfg = node_config(tmp_path / "s", compression={"lease_seconds": 3})
    queue(index, 2)
    comp = Compressor(cfg, index, Storage(str(tmp_path / "s")))
    job = index.claim(comp.owner(0), cfg.lease_seconds)
    lost = index.claim(comp.owner(1), 0.5)
    comp._current.update({0: job, 1: lost})
    time.sleep(2)
    assert index.claim(f"{OTHER}:b-0", 60).instance_id == lost.instance_id     # its lease ran out: taken
    comp.renew()
    time.sleep(2)                   # 4 s after the claim: held only because it was renewed
    assert index.claim(f"{OTHER}:c-0") is None
    assert any("ran out and another worker took it" in r.getMessage() and lost.sop_uid in r.getMessage()
               for r in caplog.records)
