"""Background compression over real associations: the rules, verification, failures, restarts, status."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import dicom_nncodec
from dicom_nncodec.dataset import encoded_frames, values
from scp import config as C
from scp import rules as R
from scp import status
from scp.compressor import AboveCeiling, compress_verified, frame_ratios
from scp.index import COMPRESSED, FAILED, KEPT, Index, Instance
from scp.node import Node
from scp.testing import node_config, running_node, send
from .imaging import make_dataset, smooth_image

# every test here runs with an SQLite and with a PostgreSQL index (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("index_backend")

LOSSLESS = str(dicom_nncodec.NNCodecLossless)
LOSSY = str(dicom_nncodec.NNCodecLossy)


def read(name):
    ds = dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    return ds


def rows(node):
    with node.index.session() as s:
        return {i.original_sop_uid or i.sop_uid: i for i in s.query(Instance).all()}


def stored(node, row):
    return dcmread(node.storage.abspath(row.path))


def test_default_rule_compresses_every_supported_image_bit_exactly(tmp_path):
    lossless_in = ["CT_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "MR_small_jpeg_ls_lossless.dcm",
                   "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"]
    lossy_in = ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"]
    unsupported = ["liver_1frame.dcm"]          # 1-bit segmentation
    datasets = {n: read(n) for n in lossless_in + lossy_in + unsupported}
    with running_node(tmp_path / "s") as node:
        assert send(node.port, datasets.values()) == [0] * len(datasets)
        assert node.compressor.wait_idle(120)
        got = rows(node)
        for name, ds in datasets.items():
            row = got[ds.SOPInstanceUID]
            on_disk = stored(node, row)
            if name in lossless_in:
                assert (row.state, row.transfer_syntax) == (COMPRESSED, LOSSLESS), (name, row.state_reason)
                assert on_disk.file_meta.TransferSyntaxUID == LOSSLESS
                assert on_disk.SOPInstanceUID == ds.SOPInstanceUID
                assert np.array_equal(on_disk.pixel_array, ds.pixel_array), name
                assert row.stored_bytes == (tmp_path / "s" / row.path).stat().st_size
            else:
                assert row.state == KEPT and row.transfer_syntax == row.received_transfer_syntax, name
                assert on_disk.PixelData == ds.PixelData
        assert "arrived lossy" in got[datasets["JPEG2000.dcm"].SOPInstanceUID].state_reason
        assert "not supported" in got[datasets["liver_1frame.dcm"].SOPInstanceUID].state_reason
        text = status.report_for(node.cfg)
        assert f"compressed {len(lossless_in)}" in text and "kept 3" in text and "queue    0" in text


def test_rules_keep_near_lossless_and_received_lossy(tmp_path):
    rules = [{"match": {"modality": ["MR"]}, "action": "keep"},
             {"match": {"modality": "CT", "calling_ae": "RESEARCH*"}, "action": {"max_error": 3}},
             {"match": {"received_lossy": True, "photometric": "YBR_FULL"}, "action": "lossless"},
             {"match": {"bits_stored": "1-16"}, "action": "lossless"}]
    mr, ct, ct2, jpeg = read("MR_small.dcm"), read("CT_small.dcm"), read("CT_small.dcm"), read("SC_rgb_jpeg_dcmtk.dcm")
    with running_node(tmp_path / "s", compression={"rules": rules}) as node:
        assert send(node.port, [mr, ct2, jpeg]) == [0, 0, 0]
        assert send(node.port, [ct], calling_ae="RESEARCH1") == [0]
        assert node.compressor.wait_idle(120)
        got = rows(node)
        assert got[mr.SOPInstanceUID].state == KEPT and "kept by rule" in got[mr.SOPInstanceUID].state_reason
        assert got[ct2.SOPInstanceUID].transfer_syntax == LOSSLESS          # not from RESEARCH*: last rule
        assert got[jpeg.SOPInstanceUID].transfer_syntax == LOSSLESS         # received lossy, but a rule asks
        assert np.array_equal(stored(node, got[jpeg.SOPInstanceUID]).pixel_array, jpeg.pixel_array)
        row = got[ct.SOPInstanceUID]
        assert row.transfer_syntax == LOSSY and row.sop_uid != ct.SOPInstanceUID
        near = stored(node, row)
        assert near.SOPInstanceUID == row.sop_uid and near.LossyImageCompression == "01"
        assert near.SourceImageSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
        err = np.abs(near.pixel_array.astype(np.int64) - ct.pixel_array.astype(np.int64)).max()
        assert 0 < err <= 3
        # a second copy under the original UID is recognised as a duplicate of it
        assert send(node.port, [ct], calling_ae="RESEARCH1") == [0]
        assert len(rows(node)) == 4


def test_a_result_that_fails_verification_keeps_the_original(tmp_path, monkeypatch):
    real = dicom_nncodec.decompress

    def corrupting(ds, **kw):
        out = real(ds, **kw)
        data = bytearray(out.PixelData)
        data[10] ^= 0x01
        out.PixelData = bytes(data)
        return out

    ct = read("CT_small.dcm")
    with running_node(tmp_path / "s") as node:
        monkeypatch.setattr(dicom_nncodec, "decompress", corrupting)
        assert send(node.port, [ct]) == [0]
        assert node.compressor.wait_idle(60)
        row = rows(node)[ct.SOPInstanceUID]
        assert row.state == FAILED and "differ" in row.state_reason
        assert stored(node, row).PixelData == ct.PixelData
        st = node.index.stats()
        assert st["failures"] == 1 and st["recent_failures"][0].sop_uid == ct.SOPInstanceUID


def test_bits_above_bits_stored_are_not_silently_dropped(tmp_path):
    ds = read("emri_small.dcm")                 # Bits Stored 12 in 16
    data = np.frombuffer(ds.PixelData, "<u2").copy()
    data[0] |= 0x8000
    ds.PixelData = data.tobytes()
    with running_node(tmp_path / "s") as node:
        assert send(node.port, [ds]) == [0]
        assert node.compressor.wait_idle(60)
        row = rows(node)[ds.SOPInstanceUID]
        assert row.state == KEPT and "above Bits Stored" in row.state_reason
        assert stored(node, row).PixelData == ds.PixelData


def test_the_queue_survives_a_restart(tmp_path):
    datasets = [read("CT_small.dcm"), read("MR_small.dcm"), read("SC_rgb.dcm")]
    cfg = node_config(tmp_path / "s", compression={"workers": 0})
    node = Node(cfg).start()
    assert send(node.port, datasets) == [0, 0, 0]
    node.index.claim()              # as if a worker was killed in the middle of an instance
    node.stop()
    idx = Index(C.resolved_index_url(cfg))
    assert idx.stats()["queue"] == {"queued": 2, "running": 1}
    idx.dispose()
    with running_node(tmp_path / "s") as node:
        assert node.compressor.wait_idle(60)
        got = rows(node)
        assert [got[d.SOPInstanceUID].state for d in datasets] == [COMPRESSED] * 3
        for d in datasets:
            assert np.array_equal(stored(node, got[d.SOPInstanceUID]).pixel_array, d.pixel_array)


def test_stop_finishes_the_instance_in_progress(tmp_path):
    datasets = [read("emri_small.dcm") for _ in range(4)]
    with running_node(tmp_path / "s") as node:
        assert send(node.port, datasets) == [0] * 4
    idx = Index(C.resolved_index_url(node.cfg))
    st = idx.stats()
    idx.dispose()
    assert st["queue"].get("running", 0) == 0            # nothing left claimed
    assert st["by_state"].get("compressed", 0) + st["queue"].get("queued", 0) == 4


def test_a_result_for_a_copy_replaced_meanwhile_is_discarded(tmp_path):
    first = read("CT_small.dcm")
    second = dcmread(get_testdata_file("CT_small.dcm"))
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    second.StudyInstanceUID, second.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    second.StudyDescription = "SECOND"
    with running_node(tmp_path / "s", storage={"duplicates": "replace"}, compression={"workers": 0}) as node:
        assert send(node.port, [first]) == [0]
        job = node.index.claim()                     # a worker starts on the first copy ...
        assert send(node.port, [second]) == [0]      # ... while a corrected copy arrives
        node.compressor.process(job)                 # the stale result must not replace it
        row = rows(node)[first.SOPInstanceUID]
        assert row.transfer_syntax == row.received_transfer_syntax and row.generation == 2
        assert stored(node, row).StudyDescription == "SECOND"
        assert node.index.stats()["queue"] == {"queued": 1}     # the new copy waits for its own turn
        files = list((tmp_path / "s" / "objects").rglob("*.dcm"))
        assert len(files) == 1


# --- ratio rules (lossy, held to the lossy ceilings) -----------------------------------------------------

RATIO_RULES = [{"name": "body CT 7:1", "match": {"modality": "CT", "body_part": ["CHEST", "ABDOMEN"]},
                "action": {"ratio": 7}},
               {"name": "the rest lossless", "action": "lossless"}]


def test_a_ratio_rule_stores_a_lossy_derivative_at_that_ratio(tmp_path):
    ct = read("CT_small.dcm")
    ct.BodyPartExamined = "CHEST"
    with running_node(tmp_path / "s", compression={"rules": RATIO_RULES}) as node:
        assert send(node.port, [ct]) == [0]
        assert node.compressor.wait_idle(300)
        row = rows(node)[ct.SOPInstanceUID]
        assert (row.state, row.transfer_syntax) == (COMPRESSED, LOSSY), row.state_reason
        assert row.sop_uid != ct.SOPInstanceUID and row.original_sop_uid == ct.SOPInstanceUID
        assert "reached" in row.state_reason and "'body CT 7:1' asks 7:1" in row.state_reason
        lossy = stored(node, row)
        assert lossy.SOPInstanceUID == lossy.file_meta.MediaStorageSOPInstanceUID == row.sop_uid
        assert lossy.StudyInstanceUID == ct.StudyInstanceUID and lossy.SeriesInstanceUID == ct.SeriesInstanceUID
        assert lossy.LossyImageCompression == "01" and lossy.ImageType[0] == "DERIVED"
        assert values(lossy, "LossyImageCompressionMethod")[-1] == "NNCODEC_RNN_1"
        assert [(s.ReferencedSOPClassUID, s.ReferencedSOPInstanceUID) for s in lossy.SourceImageSequence] == \
            [(ct.SOPClassUID, ct.SOPInstanceUID)]
        # the ratio reached, counted from the stored frame against the uncompressed size at Bits Allocated
        (frame,) = encoded_frames(lossy)
        reached = ct.Rows * ct.Columns * ct.BitsAllocated // 8 / len(frame)
        assert abs(reached - 7) <= 0.7, reached
        assert float(values(lossy, "LossyImageCompressionRatio")[-1]) == pytest.approx(reached, abs=0.01)
        assert f"ratio {reached:.2f}:1" in row.state_reason
        # it decodes (each frame's CRC checked) through pydicom and through the codec's own path
        assert lossy.pixel_array.shape == ct.pixel_array.shape
        decoded = dicom_nncodec.decompress(stored(node, row)).pixel_array.astype(np.float64)
        assert np.array_equal(decoded, lossy.pixel_array)
        assert np.corrcoef(decoded.ravel(), ct.pixel_array.astype(np.float64).ravel())[0, 1] > 0.9
        # storage commitment for the original UID is refused: the original is not kept
        assert node.commitments.evaluate(ct.SOPClassUID, ct.SOPInstanceUID) == 0x0110


def test_a_ratio_the_codec_cannot_reach_keeps_the_instance_as_received(tmp_path):
    ds = make_dataset(smooth_image(8, 8, 12)[None], 16, 12)      # 128 bytes: 7:1 leaves no room for a header
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    with running_node(tmp_path / "s", compression={"rules": RATIO_RULES}) as node:
        assert send(node.port, [ds]) == [0]
        assert node.compressor.wait_idle(120)
        row = rows(node)[ds.SOPInstanceUID]
        assert (row.state, row.sop_uid) == (KEPT, ds.SOPInstanceUID)
        assert "not supported by the codec at 7:1" in row.state_reason
        assert row.transfer_syntax == row.received_transfer_syntax
        assert stored(node, row).PixelData == ds.PixelData
        assert node.index.stats()["failures"] == 0


def test_a_frame_above_the_ceiling_is_refused_by_the_verification():
    ct = read("CT_small.dcm")
    # a ceiling below what any result within 10 % of 7:1 reaches
    decision = R.Decision(R.RATIO, 0, "r", ratio=7, ceiling=6.2)
    with pytest.raises(AboveCeiling, match="above the 6.2:1 ceiling"):
        compress_verified(ct, decision, "cpu", 8)
    ok = compress_verified(read("CT_small.dcm"), R.Decision(R.RATIO, 0, "r", ratio=7, ceiling=7.8), "cpu", 8)
    assert all(6.3 <= r <= 7.7 for r in frame_ratios(ok))


def test_a_head_ct_under_a_body_ct_ratio_rule_is_compressed_losslessly(tmp_path):
    """The index holds Body Part Examined per series (the last instance's); the compressor checks
    the ceiling again with the stored file's own value."""
    head, chest = read("CT_small.dcm"), read("CT_small.dcm")
    chest.SeriesInstanceUID, chest.StudyInstanceUID = head.SeriesInstanceUID, head.StudyInstanceUID
    head.BodyPartExamined, chest.BodyPartExamined = "HEAD", "CHEST"
    with running_node(tmp_path / "s", compression={"rules": RATIO_RULES, "workers": 0}) as node:
        assert send(node.port, [head, chest]) == [0, 0]
        job = node.index.claim()
        assert (job.sop_uid, job.body_part) == (head.SOPInstanceUID, "CHEST")
        assert node.compressor.process(job)
        row = rows(node)[head.SOPInstanceUID]
        assert (row.state, row.transfer_syntax, row.sop_uid) == (COMPRESSED, LOSSLESS, head.SOPInstanceUID)
        assert "compressed losslessly instead" in row.state_reason
        assert "'body CT 7:1' asks 7:1, above the 5:1 ceiling for CT, body part HEAD" in row.state_reason
        assert np.array_equal(stored(node, row).pixel_array, head.pixel_array)


def test_a_ratio_rule_without_modality_compresses_modalities_without_a_ceiling_losslessly(tmp_path, caplog):
    ds = make_dataset(smooth_image(32, 32, 12)[None], 16, 12)     # Modality OT: no lossy ceiling
    caplog.set_level("INFO", logger="scp.compressor")
    with running_node(tmp_path / "s", compression={"rules": [{"name": "all 4:1", "action": {"ratio": 4}}]}) as node:
        assert send(node.port, [ds]) == [0]
        assert node.compressor.wait_idle(60)
        row = rows(node)[ds.SOPInstanceUID]
        assert (row.state, row.transfer_syntax, row.sop_uid) == (COMPRESSED, LOSSLESS, ds.SOPInstanceUID)
        assert "modality OT has no lossy ceiling" in row.state_reason
        assert np.array_equal(stored(node, row).pixel_array, ds.pixel_array)
    assert any(r.levelname == "WARNING" and ds.SOPInstanceUID in r.getMessage() and "losslessly instead" in
               r.getMessage() for r in caplog.records)
