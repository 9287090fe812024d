"""``import dicom_nncodec`` stays light for pydicom users: no torch (and no numba) until a frame needs
them, and a format-version-2 frame decodes without torch at all."""
from __future__ import annotations

import subprocess
import sys

import dicom_nncodec
from pydicom import dcmread
from pydicom.data import get_testdata_file


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_and_reading_a_header_load_neither_torch_nor_numba(tmp_path):
    path = tmp_path / "ct.dcm"
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.compress(dicom_nncodec.NNCodecLossless)
    ds.save_as(path)
    loaded = _run(f"import sys, dicom_nncodec; from pydicom import dcmread; ds = dcmread({str(path)!r}); "
                  "ds.Rows; print(sorted(m for m in ('torch', 'numba') if m in sys.modules))")
    assert loaded == "[]"


def test_a_version_2_frame_decodes_without_torch(tmp_path):
    path = tmp_path / "ct.dcm"
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.compress(dicom_nncodec.NNCodecLossless)
    ds.save_as(path)
    loaded = _run(f"import sys, dicom_nncodec; from pydicom import dcmread; "
                  f"a = dcmread({str(path)!r}).pixel_array; print(int(a.sum()), 'torch' in sys.modules)")
    total, torch_loaded = loaded.split()
    assert int(total) == int(dcmread(get_testdata_file("CT_small.dcm")).pixel_array.sum())
    assert torch_loaded == "False"
