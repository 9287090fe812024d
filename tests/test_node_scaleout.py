"""Scale-out: two nodes and two compression workers on one PostgreSQL index and one storage folder.

Everything is real: a throwaway PostgreSQL server, the nodes and workers as the programs an operator
runs (``dicom-nncodec serve`` / ``worker``), DCMTK's dcmsend and storescu sending to both nodes at once,
and getscu retrieving.  The nodes run no compression of their own (``compression.workers: 0``); one
worker SIGKILLs itself in the middle of a job (after coding it, before writing anything: the crash
point ``compress.coded``), and the other must take that job once its lease has run out.  Then every
acknowledged instance must come back bit-exact from either node, be stored once, the queue must be
empty, no instance may have been coded by two workers, and fsck must find nothing wrong.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scp.index import Index, Instance
from scp.nodebench import find_dcmtk
from scp.testing import NodeProcess, WorkerProcess, free_port, wait_until

LEASE = 3


@pytest.fixture(scope="module")
def tools():
    found = {name: find_dcmtk(name) for name in ("dcmsend", "storescu", "getscu", "findscu")}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        pytest.skip(f"DCMTK not found ({', '.join(missing)}): apt-get install dcmtk")
    return found


def make_folder(folder, study: str, patient: str, copies: int) -> dict[str, np.ndarray]:
    """Explicit VR Little Endian files (what storescu sends without conversion) made from pydicom's
    CT and MR test files with fresh UIDs; SOP Instance UID -> pixels."""
    os.makedirs(folder)
    pixels, series = {}, (generate_uid(), generate_uid())
    for k in range(copies):
        for name in ("CT_small.dcm", "MR_small.dcm"):
            ds = dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.PatientID, ds.SeriesInstanceUID = study, patient, series[k % 2]
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(os.path.join(folder, f"{len(pixels):03}.dcm"), enforce_file_format=True)
            pixels[str(ds.SOPInstanceUID)] = ds.pixel_array.copy()
    return pixels


def write_config(path, **cfg) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
    return r


def test_two_nodes_two_workers_one_postgresql_and_a_killed_worker(tmp_path, postgres_url, tools):
    storage = tmp_path / "storage"            # shared by both nodes and both workers
    common = {"storage": {"path": str(storage), "min_free_mb": 0}, "index": {"url": postgres_url},
              "compression": {"device": "cpu", "poll_seconds": 0.2, "lease_seconds": LEASE, "workers": 0},
              "peers": [{"ae_title": "GETSCU", "host": "127.0.0.1", "port": 1}],
              "limits": {"shutdown_grace_seconds": 10, "acse_timeout": 15, "dimse_timeout": 60,
                         "network_timeout": 60}}
    ports = [free_port(), free_port()]
    nodes = [NodeProcess(write_config(tmp_path / f"node{n}.yaml", ae_title=f"NODE{n}", bind="127.0.0.1",
                                      port=ports[n], **common), ports[n]) for n in (0, 1)]
    worker_cfgs = [write_config(tmp_path / f"worker{n}.yaml", **dict(common, compression=dict(
        common["compression"], workers=1))) for n in range(3)]
    studies = {"A": generate_uid(), "B": generate_uid()}
    sent = {}
    sent.update(make_folder(tmp_path / "to0", studies["A"], "SCALE-A", 6))
    sent.update(make_folder(tmp_path / "to1", studies["B"], "SCALE-B", 6))
    workers = []
    try:
        for node in nodes:
            node.start()
        # worker 0 dies at its second job, after coding it, before writing anything
        workers.append(WorkerProcess(worker_cfgs[0], crash_at="compress.coded:2").start())
        # both nodes receive at once: dcmsend to one, storescu to the other
        sends = [[tools["dcmsend"], "-v", "-aet", "SENDER0", "-aec", "NODE0", "+sd", "+r", "127.0.0.1", ports[0],
                  tmp_path / "to0"],
                 [tools["storescu"], "-v", "-aet", "SENDER1", "-aec", "NODE1", "+sd", "+r", "127.0.0.1", ports[1],
                  tmp_path / "to1"]]
        results: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(sends[i]))) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(r is not None for r in results)
        assert workers[0].wait(120) == -signal.SIGKILL          # killed in the middle of its second job
        idx = Index(postgres_url)
        try:
            with idx.session() as s:
                assert s.query(Instance).count() == len(sent)       # every acknowledged instance, once
            dead = f":{workers[0].proc.pid}:"
            held = [i for i in idx.queue_items() if i[2] == "running"]
            assert len(held) == 1                                   # the dead worker's job, still leased
            with idx.engine.connect() as conn:
                from sqlalchemy import text
                owner = conn.execute(text("SELECT lease_owner FROM compression_queue WHERE state = 'running'")
                                     ).scalar()
            assert dead in owner
            workers.append(WorkerProcess(worker_cfgs[1]).start())
            workers.append(WorkerProcess(worker_cfgs[2]).start())
            wait_until(lambda: idx.queue_length() == 0, 300, "the queue to drain")
            with idx.session() as s:
                states = [i.state for i in s.query(Instance)]
            assert states == ["compressed"] * len(sent)
        finally:
            idx.dispose()

        # every instance back bit-exact from either node (a node answers for what the other received)
        for n, node in enumerate(nodes):
            out = tmp_path / f"got{n}"
            out.mkdir()
            for study in studies.values():
                run([tools["getscu"], "-S", "-aet", "GETSCU", "-aec", f"NODE{n}", "-od", out,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", ports[n]])
            got = {}
            for name in os.listdir(out):
                ds = dcmread(out / name)
                got[str(ds.SOPInstanceUID)] = ds.pixel_array
            assert sorted(got) == sorted(sent), f"node {n} returned {len(got)} of {len(sent)}"
            for uid, pixels in sent.items():
                assert np.array_equal(got[uid], pixels), uid
            for study in studies.values():
                r = run([tools["findscu"], "-v", "-S", "-aet", "GETSCU", "-aec", f"NODE{n}", "-k",
                         "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                         "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", ports[n]])
                assert re.findall(r"\[(\d+)\][^\n]*NumberOfStudyRelatedInstances", r.stdout + r.stderr) == ["12"]
    finally:
        for w in workers:
            w.stop(60)
        for node in nodes:
            node.stop(60)
    # no instance coded twice: each "compressed <uid>" appears once over both workers' logs
    logs = "".join(open(w.stderr_path, encoding="utf-8", errors="replace").read() for w in workers)
    coded = re.findall(r"compressed (\S+) \(lossless\)", logs)
    assert len(coded) == len(set(coded)) == len(sent)
    r = run([sys.executable, "-m", "dicom_nncodec.cli", "fsck", "--config", tmp_path / "node0.yaml"])
    assert re.search(rf"checked {len(sent)} instances .*; 0 problems", r.stdout), r.stdout
