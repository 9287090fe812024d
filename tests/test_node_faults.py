"""Faults lose nothing: the node killed with SIGKILL at every crash point and at random moments during
ingest and background compression, restarted each time; a full or unwritable disk.

After each kill, fsck of the dead node's storage may find only what a crash is allowed to leave
(files no index row points to, half-written files in tmp/, items a worker had claimed), never a
missing, short or damaged file; after the last restart every acknowledged instance comes back
bit-exact, the queue has drained, and fsck --repair leaves nothing wrong."""
from __future__ import annotations

import errno
import io
import os
import random
import subprocess
import threading
import time

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_GET

from scp import fsck
from scp.config import load
from scp.index import Index
from scp.testing import CommitmentSCU, NodeProcess, free_port, get, running_node, send
from tests.imaging import make_dataset, smooth_image

STUDY = generate_uid()
ALLOWED_AFTER_A_CRASH = {"orphan", "leftover", "queue"}


class Archive:
    """What was sent, and which C-STOREs were acknowledged."""

    def __init__(self, rows=48, cols=48):
        self.rows, self.cols = rows, cols
        self.sent: dict[str, np.ndarray] = {}
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        self.n = 0

    def new(self, size=None) -> Dataset:
        with self.lock:
            self.n += 1
            seed = self.n
        rows, cols = size or (self.rows, self.cols)
        pixels = smooth_image(rows, cols, 12, seed=seed)
        ds = make_dataset(pixels[None], 16, 12)
        ds.StudyInstanceUID = STUDY
        ds.PatientID = "FAULTS"
        with self.lock:
            self.sent[ds.SOPInstanceUID] = pixels
        return ds

    def send(self, port: int, datasets, stop: threading.Event | None = None, node: NodeProcess | None = None) -> int:
        """Send on one association until done, refused or cut off; the number acknowledged."""
        ae = AE(ae_title="MODALITY")
        ae.dimse_timeout = 8
        ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="NNCODEC")
        except Exception:
            return 0
        if not assoc.is_established:
            return 0
        if node is not None:
            threading.Thread(target=self._wake_when_dead, args=(node, assoc), daemon=True).start()
        n = 0
        try:
            for ds in datasets:
                if stop is not None and stop.is_set():
                    break
                try:
                    status = assoc.send_c_store(ds)
                except Exception:
                    break
                if status.get("Status") == 0:
                    with self.lock:
                        self.acked.add(ds.SOPInstanceUID)
                    n += 1
                elif not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return n

    @staticmethod
    def _wake_when_dead(node: NodeProcess, assoc) -> None:
        """pynetdicom waits dimse_timeout for the response of a peer that is gone: end that wait at once."""
        while assoc.is_established and node.alive:
            time.sleep(0.05)
        if not node.alive:
            assoc.dimse.msg_queue.put((None, None))


def write_config(tmp_path, port: int, **extra) -> str:
    path = tmp_path / "node.yaml"
    text = (f"bind: 127.0.0.1\nport: {port}\n"
            f"storage: {{path: {tmp_path / 'store'}, min_free_mb: 0, duplicates: replace}}\n"
            "compression: {device: cpu, workers: 1, poll_seconds: 0.2, batch_size: 4}\n"
            "limits: {shutdown_grace_seconds: 5, acse_timeout: 10, dimse_timeout: 20, network_timeout: 20}\n"
            f"logging: {{file: {tmp_path / 'node.log'}}}\n")
    path.write_text(text)
    return str(path)


def fsck_problems(cfg, repair=False) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = fsck.check(cfg, repair, out)
    return status, out.getvalue().splitlines()[1:-1]


def retrieve_all(port: int) -> dict[str, np.ndarray]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = STUDY
    final, received = get(port, ident, STUDY_GET, [SecondaryCaptureImageStorage], [ExplicitVRLittleEndian],
                          calling_ae="VIEWER")
    assert final.Status == 0 and final.get("NumberOfFailedSuboperations", 0) == 0
    return {ds.SOPInstanceUID: ds.pixel_array for _, ds in received}


# (crash point, what to send, who may trigger it)
SCENARIO = [
    ("ingest.renamed:3", "new", 5),          # a file in objects/ that the index never learnt about
    ("ingest.indexed:2", "new", 4),          # indexed, the sender never heard back
    ("ingest.staged:2", "new", 4),           # received and checked, not yet renamed into objects/
    ("compress.written:3", "new", 6),        # the compressed copy written, the index still on the original
    ("compress.switched:3", "new", 6),       # the index switched, the original not yet removed
    ("ingest.replaced", "resend", 2),        # a corrected copy indexed, the superseded one not yet removed
    ("commit.recorded", "commit", 5),        # a storage commitment request recorded, the N-ACTION not answered
]
RANDOM_KILLS = 6


def test_sigkill_at_every_crash_point_and_at_random_loses_nothing(tmp_path):
    port = free_port()
    config_path = write_config(tmp_path, port)
    scu = CommitmentSCU("SENDER")
    scu_port = scu.listen()
    with open(config_path, "a") as f:
        f.write(f"peers: [{{ae_title: VIEWER, host: 127.0.0.1, port: 1}}, "
                f"{{ae_title: SENDER, host: 127.0.0.1, port: {scu_port}}}]\n"
                "commitment: {retry_seconds: 0.5}\n")
    cfg = load(config_path)
    archive = Archive()
    rng = random.Random(20240601)
    kills = 0

    def check_dead_storage():
        status, lines = fsck_problems(cfg)
        kinds = {line.split()[0] for line in lines}
        assert kinds <= ALLOWED_AFTER_A_CRASH, "\n".join(lines)

    for crash_at, what, count in SCENARIO:
        node = NodeProcess(config_path, port, crash_at=crash_at).start()
        if what == "commit":                         # answered only after the restart, on a new association
            committed = sorted(archive.acked)[:count]
            transaction = generate_uid()
            asking = threading.Thread(target=scu.ask, args=(port, [(SecondaryCaptureImageStorage, uid)
                                                                   for uid in committed], transaction),
                                      kwargs={"keep_open": False}, daemon=True)
            asking.start()
            assert node.wait(60) == -9, f"{crash_at} was not reached"
            kills += 1
            check_dead_storage()
            continue
        if what == "new":
            batch = [archive.new() for _ in range(count)]
        else:                                        # the same SOP Instance UIDs again, pixels unchanged
            batch = []
            for uid in sorted(archive.acked)[:count]:
                ds = make_dataset(archive.sent[uid][None], 16, 12)
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
                ds.StudyInstanceUID, ds.PatientID, ds.StudyDescription = STUDY, "FAULTS", "CORRECTED"
                batch.append(ds)
        archive.send(port, batch, node=node)
        assert node.wait(60) == -9, f"{crash_at} was not reached"        # it killed itself at the point
        kills += 1
        check_dead_storage()

    for _ in range(RANDOM_KILLS):                   # ingest and compression running, killed at any moment
        node = NodeProcess(config_path, port).start()
        stop = threading.Event()
        sender = threading.Thread(target=lambda: archive.send(port, (archive.new() for _ in range(200)), stop, node))
        sender.start()
        time.sleep(rng.uniform(0.2, 2.0))
        node.kill()
        kills += 1
        stop.set()
        sender.join(60)
        check_dead_storage()

    node = NodeProcess(config_path, port).start()   # the last start: everything comes back
    try:
        idx = Index(f"sqlite:///{tmp_path / 'store' / 'index.sqlite'}")
        deadline = time.monotonic() + 120
        while idx.queue_length() and time.monotonic() < deadline:
            time.sleep(0.3)
        stats = idx.stats()
        idx.dispose()
        assert stats["queue"] == {} and set(stats["by_state"]) == {"compressed"}, stats
        back = retrieve_all(port)
        assert archive.acked <= set(back)
        for uid in archive.acked:
            assert np.array_equal(back[uid], archive.sent[uid]), uid
        for uid, pixels in back.items():                     # also what was stored but never acknowledged
            assert np.array_equal(pixels, archive.sent[uid]), uid
        deadline = time.monotonic() + 30
        while not any(info.TransactionUID == transaction for _, info, _ in scu.reports) and time.monotonic() < deadline:
            time.sleep(0.1)
        (report,) = [info for _, info, _ in scu.reports if info.TransactionUID == transaction]
        assert sorted(i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence) == committed
    finally:
        assert node.stop() == 0
        scu.stop()
    status, lines = fsck_problems(cfg, repair=True)
    assert status == 0 and all("->" in line for line in lines), "\n".join(lines)
    assert fsck_problems(cfg) == (0, [])
    print(f"\nSIGKILL fault injections: {kills}; acknowledged instances: {len(archive.acked)}; "
          f"sent: {len(archive.sent)}")
    assert kills == len(SCENARIO) + RANDOM_KILLS and len(archive.acked) > 20


# --- a full disk, an unwritable folder -----------------------------------------------------------------

def test_injected_enospc_fails_the_c_store_cleanly_and_a_retry_succeeds(tmp_path, monkeypatch, caplog):
    archive = Archive()
    first, second = archive.new(), archive.new()
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 1}]
    with running_node(tmp_path / "s", peers=peers, compression={"workers": 0}) as node:
        assert send(node.port, [first]) == [0]
        real_stage = node.storage.stage

        def full(content):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(node.storage, "stage", full)
        assert send(node.port, [second]) == [0xA700]
        monkeypatch.setattr(node.storage, "stage", real_stage)

        real_add = node.index.add

        def index_full(*args, **kwargs):
            from sqlalchemy.exc import OperationalError
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        monkeypatch.setattr(node.index, "add", index_full)
        assert send(node.port, [second]) == [0xA700]
        monkeypatch.setattr(node.index, "add", real_add)

        assert os.listdir(tmp_path / "s" / "tmp") == []
        assert node.index.stats()["instances"] == 1
        assert send(node.port, [second]) == [0]                     # the sender retries
        back = retrieve_all_in_process(node.port, first.StudyInstanceUID)
        assert np.array_equal(back[first.SOPInstanceUID], archive.sent[first.SOPInstanceUID])
    messages = [r.getMessage() for r in caplog.records]
    assert any("storage file system is full" in m and "0xA700" in m for m in messages)
    assert any("database or disk is full" in m for m in messages)
    assert fsck_problems(node.cfg) == (0, [])


def retrieve_all_in_process(port: int, study: str) -> dict[str, np.ndarray]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    final, received = get(port, ident, STUDY_GET, [SecondaryCaptureImageStorage], [ExplicitVRLittleEndian],
                          calling_ae="VIEWER")
    assert final.Status == 0
    return {ds.SOPInstanceUID: ds.pixel_array for _, ds in received}


def test_compression_on_a_full_disk_waits_instead_of_failing(tmp_path, monkeypatch, caplog):
    archive = Archive()
    ds = archive.new()
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        assert send(node.port, [ds]) == [0]

        def full(content):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(node.storage, "write", full)
        job = node.index.claim()
        assert node.compressor.process(job) is False
        assert node.index.stats()["by_state"] == {"pending": 1} and node.index.stats()["queue"] == {"queued": 1}
        monkeypatch.undo()
        assert node.compressor.process(node.index.claim()) is True
        assert node.index.stats()["by_state"] == {"compressed": 1}
    assert any("put back in the queue" in r.getMessage() for r in caplog.records)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def remount(mount, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True, capture_output=True)


def read_only(folder, on: bool) -> None:
    """Make ``folder`` read-only (a read-only bind mount over itself) or writable again."""
    if on:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
    else:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


def test_a_really_full_and_a_read_only_file_system(small_disk, caplog):
    archive = Archive(256, 256)                      # 128 KiB each: the 6 MB fill up after about 40
    peers = [{"ae_title": "VIEWER", "host": "127.0.0.1", "port": 1}]
    with running_node(small_disk / "s", peers=peers, compression={"workers": 0}) as node:
        statuses, datasets = [], []
        while len(statuses) < 80 and statuses[-3:] != [0xA700] * 3:
            datasets.append(archive.new())
            statuses += send(node.port, datasets[-1:])
        assert 0xA700 in statuses and statuses[0] == 0
        acked = [d for d, s in zip(datasets, statuses) if s == 0]
        refused = [d for d, s in zip(datasets, statuses) if s != 0]
        assert os.listdir(small_disk / "s" / "tmp") == []
        remount(small_disk, "size=64m")                                   # room again: the sender retries
        assert send(node.port, refused) == [0] * len(refused)
        read_only(small_disk / "s" / "tmp", True)                        # the folder received data lands in
        late = archive.new()
        try:
            assert send(node.port, [late]) == [0xA700]
        finally:
            read_only(small_disk / "s" / "tmp", False)
        assert send(node.port, [late]) == [0]
        back = retrieve_all_in_process(node.port, STUDY)
        for d in acked + refused + [late]:
            assert np.array_equal(back[d.SOPInstanceUID], archive.sent[d.SOPInstanceUID])
    messages = [r.getMessage() for r in caplog.records]
    assert any("full" in m and "0xA700" in m for m in messages)
    assert any("cannot be written" in m and "0xA700" in m for m in messages)
    assert fsck_problems(node.cfg) == (0, [])


def test_min_free_mb_refuses_before_the_disk_is_full(small_disk, caplog):
    archive = Archive(256, 256)
    with running_node(small_disk / "s", storage={"min_free_mb": 4}, compression={"workers": 0}) as node:
        statuses = send(node.port, [archive.new() for _ in range(30)])
        assert statuses[0] == 0 and statuses[-1] == 0xA700
        assert node.storage.free_mb() >= 3.5
    assert any("storage.min_free_mb" in r.getMessage() for r in caplog.records)
