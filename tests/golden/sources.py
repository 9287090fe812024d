"""Inputs of the golden bitstreams: pydicom's bundled files and generated images, rebuilt identically."""
from __future__ import annotations

from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicom_nncodec.dataset import frames_of
from dicom_nncodec.pixels import PixelFormat

from ..imaging import smooth_image


def _file(name, count=None):
    def frames():
        return frames_of(dcmread(get_testdata_file(name)))[:count]
    return frames, PixelFormat.from_dataset(dcmread(get_testdata_file(name), stop_before_pixels=True))


def _generated():
    return [smooth_image(37, 53, 10, signed=True, seed=7)]


_GENERATED_FMT = PixelFormat(37, 53, 1, 16, 10, True, "MONOCHROME2")


def _sparse():
    """A 12-bit image using one value in 16: coded with the version-2 value map."""
    return [(smooth_image(61, 47, 8, seed=11) * 16).astype("uint16")]


_SPARSE_FMT = PixelFormat(61, 47, 1, 16, 12, False, "MONOCHROME2")

# name: (frames, pixel format, encoder options, model id)
SOURCES = {
    "ct_small_16s": (*_file("CT_small.dcm"), {}, "nnc-lossless-1"),
    "emri_small_12u_3frames": (*_file("emri_small.dcm", 3), {}, "nnc-lossless-1"),
    "sc_rgb_8u": (*_file("SC_rgb.dcm"), {}, "nnc-lossless-1"),
    "generated_37x53_10s": (_generated, _GENERATED_FMT, {}, "nnc-lossless-1"),
    "ct_small_near_lossless_3": (*_file("CT_small.dcm"), {"max_error": 3}, "nnc-lossless-1"),
    "ct_small_16s_nolstm": (*_file("CT_small.dcm"), {}, "nnc-lossless-1-nolstm"),
    "ct_small_16s_v2": (*_file("CT_small.dcm"), {}, "nnc-lossless-2"),
    "emri_small_12u_3frames_v2": (*_file("emri_small.dcm", 3), {}, "nnc-lossless-2"),
    "sc_rgb_8u_v2": (*_file("SC_rgb.dcm"), {}, "nnc-lossless-2"),
    "generated_37x53_10s_v2": (_generated, _GENERATED_FMT, {}, "nnc-lossless-2"),
    "generated_sparse_61x47_12u_v2": (_sparse, _SPARSE_FMT, {}, "nnc-lossless-2"),
    "ct_small_lossy_ratio_8": (*_file("CT_small.dcm"), {"ratio": 8}, "nnc-lossy-1"),
    "emri_small_lossy_3frames_ratio_6": (*_file("emri_small.dcm", 3), {"ratio": 6}, "nnc-lossy-1"),
    "sc_rgb_lossy_ratio_12": (*_file("SC_rgb.dcm"), {"ratio": 12}, "nnc-lossy-1"),
    "generated_37x53_10s_lossy_ratio_3": (_generated, _GENERATED_FMT, {"ratio": 3}, "nnc-lossy-1"),
}


def is_lossy(options: dict) -> bool:
    """Frames from the RNN-Conv mode: their encoder is float, so only their decoding is guaranteed."""
    return "ratio" in options
