"""``dicom-nncodec bench`` on a few tiny generated images and one pydicom test file.

Not a timing test: no speed thresholds.  What is checked is that every codec
runs on the same frames, that every lossless result is verified (a corrupted
decode becomes an error row and a non-zero exit status), that non-images and
lossy-derived images are skipped and counted, and that the table, the JSON
and the plot are produced.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_nncodec import baselines, bench

ALL_BASELINES = [b.name for b in baselines.available_baselines()[0]]


def _write(path, frames: np.ndarray, *, bits_stored: int, signed: bool = False, modality: str = "OT",
           photometric: str = "MONOCHROME2", lossy: bool = False) -> None:
    frames = np.asarray(frames)
    multi = frames.ndim == (4 if photometric == "RGB" else 3)
    first = frames[0] if multi else frames
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "BENCH"
    ds.Rows, ds.Columns = first.shape[:2]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if multi:
        ds.NumberOfFrames = len(frames)
    if lossy:
        ds.LossyImageCompression = "01"
    data = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ct/gen: signed 12-bit; mr/gen: 3-frame 12-bit and an RGB frame; plus a lossy-derived image, a
    non-DICOM file, and pydicom's CT_small.dcm in its own folder."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:40, :48]
    smooth = (np.sin(x / 7.0) * 600 + np.cos(y / 5.0) * 400).astype(np.int64)
    (root / "ct" / "gen").mkdir(parents=True)
    (root / "mr" / "gen").mkdir(parents=True)
    (root / "pydicom").mkdir()
    _write(root / "ct" / "gen" / "signed.dcm", (smooth + rng.integers(-8, 8, smooth.shape)).astype(np.int16),
           bits_stored=12, signed=True, modality="CT")
    _write(root / "mr" / "gen" / "multi.dcm",
           np.stack([(smooth + 1000 + 40 * k + rng.integers(0, 16, smooth.shape)) for k in range(3)]).astype(np.uint16),
           bits_stored=12, modality="MR")
    rgb = np.stack([x * 5, y * 6, (x + y) * 2], -1) + rng.integers(0, 4, (40, 48, 3))
    _write(root / "mr" / "gen" / "colour.dcm", rgb.astype(np.uint8), bits_stored=8, modality="MR", photometric="RGB")
    _write(root / "ct" / "gen" / "lossy.dcm", smooth.astype(np.int16), bits_stored=12, signed=True, modality="CT",
           lossy=True)
    (root / "mr" / "gen" / "README.txt").write_text("not a DICOM file\n")
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "pydicom" / "CT_small.dcm")
    return root


def test_bench_runs_verifies_and_reports(data, tmp_path):
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "bench.png", tmp_path / "bench.json"
    res = bench.run([data], plot=plot, json_path=out, repeat=1, max_frames=2)

    assert res["errors"] == []
    objs = res["_objects"]
    assert sorted(o.group for o in objs) == sorted(["ct/gen", "mr/gen", "mr/gen", f"{data.name}/pydicom"])
    for o in objs:  # every codec coded and verified every image, and wrote a file
        assert set(o.codecs) == {bench.OURS, *ALL_BASELINES}
        assert all(m.status == "ok" and m.bytes > 0 for m in o.codecs.values()), o
        assert all(f.status == "ok" and f.bytes > 0 for f in o.files.values()), o
        assert o.uncompressed_file_bytes > max(f.bytes for f in o.files.values())
    multi = next(o for o in objs if o.path.endswith("multi.dcm"))
    assert (multi.frames, multi.frames_total) == (2, 3)      # --max-frames 2 of 3

    assert res["skipped"] == {"lossy-derived image (Lossy Image Compression 01)": [str(data / "ct/gen/lossy.dcm")],
                              "not a DICOM Part 10 file": [str(data / "mr/gen/README.txt")]}
    ov = res["overall"]["codecs"]
    assert ov["jpegls"]["rel_jpegls"] == pytest.approx(1.0)
    assert ov[bench.OURS]["file_rel_jpegls"] > 0 and ov[bench.OURS]["rel_jxl_e7"] > 0
    assert res["targets"]["objects"] == 4 and len(res["targets"]["targets"]) == 6

    table = bench.format_table(res)
    for text in ("== ct/gen", "== mr/gen", "== overall", "NNCodec", "JPEG-LS", "JXL-e7", "targets", "skipped 2"):
        assert text in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    js = json.loads(out.read_text())
    assert len(js["objects"]) == 4 and js["overall"]["objects"] == 4


def test_cli_main_prints_table(data, capsys):
    rc = bench.main([str(data / "ct"), "--repeat", "1", "--codecs", "jpegls,jxl-e7", "--no-files",
                     "--group-by", "modality", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "== CT: 1 images" in out and "JXL-e7" in out and "J2K" not in out


def test_unknown_codec_is_refused(data, capsys):
    assert bench.main([str(data), "--codecs", "webp", "-q"]) == 2
    assert "unknown codec" in capsys.readouterr().err


def test_baseline_mismatch_is_an_error_row(data, monkeypatch, capsys):
    def corrupt(data_, bits, signed, threads):
        x = baselines._ic.jpeg2k_decode(data_, numthreads=threads).copy()
        x.flat[0] ^= 1
        return x

    monkeypatch.setattr(baselines, "_j2k_decode", corrupt)
    rc = bench.main([str(data / "ct"), "--repeat", "1", "--codecs", "j2k", "--no-files", "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "ERROR  j2k" in out and "MISMATCH" in out and "1 ERROR(S)" in out


def test_our_mismatch_is_an_error_row(data, monkeypatch):
    from dicom_nncodec import codec

    real = codec.decode_frames

    def corrupt(datas, fmt=None, **kw):
        out = [f.copy() for f in real(datas, fmt, **kw)]
        out[-1].flat[-1] ^= 1
        return out

    monkeypatch.setattr(codec, "decode_frames", corrupt)
    res = bench.run([data / "mr"], repeat=1, codecs=["jpegls"], files=False)
    bad = [e for e in res["errors"] if e["codec"] == bench.OURS]
    assert len(bad) == 2 and all("MISMATCH" in e["message"] for e in bad)
    assert "ERROR  nncodec" in bench.format_table(res)


def test_adapters_round_trip_signed_and_colour():
    rng = np.random.default_rng(3)
    cases = [(rng.integers(-2048, 2048, (17, 23)).astype(np.int16), 12, True),
             (rng.integers(0, 1 << 15, (17, 23)).astype(np.uint16), 15, False),
             (rng.integers(0, 256, (17, 23, 3)).astype(np.uint8), 8, False)]
    bls, notes = baselines.available_baselines()
    assert [b.name for b in bls] == [n for n in baselines.BASELINE_NAMES if n in ALL_BASELINES]
    for b in bls:
        for arr, bits, signed in cases:
            back = b.decode(b.encode(arr, bits, signed), bits, signed)
            assert back.shape == arr.shape and np.array_equal(back.astype(np.int64), arr.astype(np.int64)), b.name


def test_helpers():
    assert bench.select_frames(10, 4) == [0, 3, 6, 9]
    assert bench.select_frames(2, 5) == [0, 1]
    from dicom_nncodec.pixels import PixelFormat
    fmt = PixelFormat(1, 3, 1, 16, 12, True, "MONOCHROME2")
    got = bench.normalise(np.array([[0x0FFF, 0xF800, 0x07FF]], np.uint16).view(np.int16), fmt)
    assert got.tolist() == [[-1, -2048, 2047]]


@pytest.mark.parametrize("lossy", [False, True])
def test_plot_without_matplotlib_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys, lossy):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(1))
    argv = [str(data / "ct"), "--plot", str(tmp_path / "p.png"), "-q"] + (["--lossy"] if lossy else [])
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2 and not ran
    assert "--plot needs matplotlib" in capsys.readouterr().err
