"""The dicom-nncodec command as a user runs it (in-process through main(), and once as a real process)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (ExplicitVRLittleEndian, HTJ2KLossless, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless)

from dicom_nncodec import NNCodecLossless, NNCodecLossy
from dicom_nncodec.cli import main
from dicom_nncodec.syntax import JPEGXLLossless

from .imaging import make_dataset, smooth_image


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), src / "a" / "mr.dcm")
    shutil.copy(get_testdata_file("rtstruct.dcm"), src / "a" / "b" / "rtstruct.dcm")      # not an image
    make_dataset(smooth_image(10, 12, 12)[None], 16, 12).save_as(src / "a" / "b" / "gen.dcm", enforce_file_format=True)
    return src


def test_compress_mirrors_tree_verifies_and_decompresses(tree, tmp_path, capsys):
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert main(["compress", str(tree), "-o", str(out)]) == 0
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()} == before, "inputs untouched"
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(tree) for p in tree.rglob("*") if p.is_file())
    assert (out / "a" / "b" / "rtstruct.dcm").read_bytes() == (tree / "a" / "b" / "rtstruct.dcm").read_bytes()
    for rel in ("ct.dcm", "a/mr.dcm", "a/b/gen.dcm"):
        c, o = dcmread(out / rel), dcmread(tree / rel)
        assert c.file_meta.TransferSyntaxUID == NNCodecLossless
        assert c.SOPInstanceUID == o.SOPInstanceUID
        np.testing.assert_array_equal(c.pixel_array, o.pixel_array)
    assert main(["verify", str(out)]) == 0
    assert main(["info", str(out / "a" / "mr.dcm")]) == 0
    text = capsys.readouterr().out
    assert "nnc-lossless" in text and "frame 10:" in text and "ratio" in text

    for name, uid in [("explicit", ExplicitVRLittleEndian), ("implicit", ImplicitVRLittleEndian),
                      ("jpeg-ls", JPEGLSLossless), ("jpeg2000", JPEG2000Lossless), ("rle", RLELossless),
                      ("jpegxl", JPEGXLLossless), ("htj2k", HTJ2KLossless)]:
        dec = tmp_path / f"dec-{name}"
        assert main(["decompress", str(out / "ct.dcm"), str(out / "a" / "mr.dcm"), "-o", str(dec), "-t", name]) == 0
        for rel in ("ct.dcm", "a/mr.dcm"):
            d = dcmread(dec / Path(rel).name)
            assert d.file_meta.TransferSyntaxUID == uid
            np.testing.assert_array_equal(d.pixel_array, dcmread(tree / rel).pixel_array)


def test_near_lossless_cli(tree, tmp_path):
    out = tmp_path / "nl"
    assert main(["compress", str(tree / "ct.dcm"), "-o", str(out / "ct.dcm"), "--max-error", "2"]) == 0
    c = dcmread(out / "ct.dcm")
    assert c.file_meta.TransferSyntaxUID == NNCodecLossy
    assert np.abs(c.pixel_array.astype(int) - dcmread(tree / "ct.dcm").pixel_array).max() <= 2


def test_failures_are_reported_per_file_and_exit_nonzero(tree, tmp_path, capsys):
    (tree / "broken.dcm").write_bytes(b"DICM" * 10)
    ct = dcmread(tree / "ct.dcm")
    ct.BitsAllocated = 32                            # inconsistent with its pixel data
    ct.save_as(tree / "bad32.dcm")
    out = tmp_path / "out"
    assert main(["compress", str(tree), "-o", str(out), "-j", "2"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken.dcm" in err
    assert (out / "ct.dcm").exists(), "the good files are still written"


def test_verify_detects_corruption(tree, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    main(["compress", str(tree / "ct.dcm"), "-o", str(out)])       # into an existing folder
    f = out / "ct.dcm"
    data = bytearray(f.read_bytes())
    data[-200] ^= 0x40
    f.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_output_must_not_overwrite_input(tree):
    assert main(["compress", str(tree), "-o", str(tree)]) == 2


def test_missing_input(tmp_path):
    assert main(["compress", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dicom_nncodec.cli", "info", get_testdata_file("CT_small.dcm")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not a dicom-nncodec image" in r.stdout
