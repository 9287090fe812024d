"""``dicom-nncodec fsck``: every kind of damage found and named; --repair fixes what is safe and
never drops an index row; the command line around it."""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

import dicom_nncodec
from dicom_nncodec import bitstream as B
from scp import config as C
from scp import fsck
from scp.index import COMPRESSED, PENDING, Index, Instance
from scp.node import Node
from scp.testing import node_config, running_node, send

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name="CT_small.dcm"):
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def run_fsck(cfg, repair=False) -> tuple[int, str]:
    out = io.StringIO()
    return fsck.check(cfg, repair, out), out.getvalue()


def rows(cfg) -> dict[str, Instance]:
    idx = Index(C.resolved_index_url(cfg))
    try:
        with idx.session() as s:
            return {i.sop_uid: i for i in s.query(Instance).all()}
    finally:
        idx.dispose()


def damage_payload(path: str) -> None:
    """Change one payload byte of a private frame and fix the frame CRC: only decoding can tell."""
    ds = dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    h = B.read_header(bytes(frame))
    frame[h.header_size + 10] ^= 0x01
    body = bytes(frame[:h.size - 4])
    frame = body + struct.pack("<I", zlib.crc32(body)) + bytes(frame[h.size:])
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    dicom_nncodec.fix_transfer_syntax(ds)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def stored(tmp_path):
    """A stopped node holding four instances: two compressed, two kept pending (workers 0 later)."""
    datasets = [read(), read("MR_small.dcm"), read(), read("MR_small.dcm")]
    cfg = node_config(tmp_path / "s")
    with running_node(tmp_path / "s") as node:
        assert send(node.port, datasets[:2]) == [0, 0]
        assert node.compressor.wait_idle(60)
    cfg = node_config(tmp_path / "s", compression={"workers": 0})
    with Node(cfg).start() as node:
        assert send(node.port, datasets[2:]) == [0, 0]
    return cfg, datasets


def test_an_intact_storage_is_clean(stored):
    cfg, datasets = stored
    status, text = run_fsck(cfg)
    assert status == 0, text
    assert "checked 4 instances (2 private frames decoded), 0 files not in the index; 0 problems, 0 left" in text


def test_damage_is_found_and_named(stored):
    cfg, (compressed_ct, compressed_mr, native_ct, native_mr) = stored
    got = rows(cfg)
    root = cfg.storage_path
    damage_payload(os.path.join(root, got[compressed_ct.SOPInstanceUID].path))            # pixel CRC
    os.unlink(os.path.join(root, got[compressed_mr.SOPInstanceUID].path))                 # missing
    with open(os.path.join(root, got[native_ct.SOPInstanceUID].path), "r+b") as f:        # truncated
        f.truncate(20000)
    with open(os.path.join(root, "tmp", "0123.part"), "wb") as f:                          # half-written
        f.write(b"\x00" * 100)
    status, text = run_fsck(cfg)
    assert status == 1
    lines = {line.split()[0] + " " + line.split()[1].rstrip(":") for line in text.splitlines()[1:-1]}
    assert lines == {f"corrupt {compressed_ct.SOPInstanceUID}", f"missing {compressed_mr.SOPInstanceUID}",
                     f"size {native_ct.SOPInstanceUID}", "leftover tmp/0123.part"}, text
    assert "BitstreamError" in text                                    # found by decoding, not by the frame CRC
    status, text = run_fsck(cfg, repair=True)
    assert status == 1 and "leftover   tmp/0123.part: a half-written file (never acknowledged) -> removed" in text
    assert len(rows(cfg)) == 4                                          # rows of damaged files are kept


def test_repair_reindexes_orphans_and_reattaches_copies(stored):
    cfg, (compressed_ct, compressed_mr, native_ct, native_mr) = stored
    root = cfg.storage_path
    got = rows(cfg)
    # 1. a file whose index commit never came: a new instance in objects/ the index does not know
    stray = read("emri_small.dcm")
    os.makedirs(os.path.join(root, "objects", "ff", "ff"), exist_ok=True)
    stray.save_as(os.path.join(root, "objects", "ff", "ff", "stray.dcm"), enforce_file_format=True)
    # 2. a superseded copy left beside the intact one (a crash after the commit, before the removal)
    shutil.copy(os.path.join(root, got[native_mr.SOPInstanceUID].path), os.path.join(root, "objects", "ff", "ff",
                                                                                     "old.dcm"))
    # 3. an instance whose file is lost, with an intact copy of it lying around
    lost = os.path.join(root, got[compressed_ct.SOPInstanceUID].path)
    shutil.move(lost, os.path.join(root, "objects", "ff", "ff", "copy.dcm"))
    # 4. a pending instance that lost its queue item; 5. a file nobody can read
    idx = Index(C.resolved_index_url(cfg))
    for item_id, instance_id, _ in idx.queue_items():
        if instance_id == got[native_ct.SOPInstanceUID].id:
            idx.drop_queue_item(item_id)
    idx.dispose()
    with open(os.path.join(root, "objects", "ff", "ff", "junk.dcm"), "wb") as f:
        f.write(b"not dicom")

    status, text = run_fsck(cfg)
    assert status == 1 and text.count("\norphan") == 4 and "pending compression but not in the queue" in text
    status, text = run_fsck(cfg, repair=True)
    assert status == 0, text
    assert "-> indexed and queued" in text and "-> removed" in text and "-> the index now points to it" in text
    assert "-> moved to quarantine/" in text and "-> queued again" in text
    after = rows(cfg)
    assert after[stray.SOPInstanceUID].state == PENDING
    assert after[compressed_ct.SOPInstanceUID].path == os.path.join("objects", "ff", "ff", "copy.dcm")
    assert after[compressed_ct.SOPInstanceUID].state == COMPRESSED
    assert not os.path.exists(os.path.join(root, "objects", "ff", "ff", "old.dcm"))
    assert os.listdir(os.path.join(root, "quarantine")) == ["junk.dcm"]
    assert run_fsck(cfg)[0] == 0
    with running_node(cfg.storage_path) as node:                          # the queue picks them up
        assert node.compressor.wait_idle(60)
        assert node.index.stats()["by_state"] == {"compressed": 5}
        assert np.array_equal(dcmread(node.storage.abspath(rows(cfg)[stray.SOPInstanceUID].path)).pixel_array,
                              stray.pixel_array)


def test_repair_refuses_while_a_node_runs(tmp_path):
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        assert send(node.port, [read()]) == [0]
        status, text = run_fsck(node.cfg, repair=True)
        assert status == 1 and "stop it before fsck --repair" in text
        assert run_fsck(node.cfg)[0] == 0                                 # a plain check is fine
    assert run_fsck(node.cfg, repair=True)[0] == 0


def test_command_line(tmp_path, capsys):
    from dicom_nncodec.cli import main
    cfg = tmp_path / "n.yaml"
    cfg.write_text(f"storage: {{path: {tmp_path / 's'}}}\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dicom_nncodec.cli", "fsck", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nothing stored yet" in r.stdout
    (tmp_path / "s" / "tmp").mkdir(parents=True)
    (tmp_path / "s" / "tmp" / "x.part").write_bytes(b"x")
    assert main(["fsck", "--config", str(cfg)]) == 1 and "leftover" in capsys.readouterr().out
    assert main(["fsck", "--config", str(cfg), "--repair"]) == 0 and "-> removed" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: {duplicates: overwrite}\n")
    for command in ("fsck", "status"):
        assert main([command, "--config", str(bad)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "dicom-nncodec: configuration error: storage.duplicates: must be one of keep, replace, reject, "
            "not 'overwrite'"]
