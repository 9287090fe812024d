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


# name: (frames, pixel format, max_error, model id)
SOURCES = {
    "ct_small_16s": (*_file("CT_small.dcm"), 0, "nnc-lossless-1"),
    "emri_small_12u_3frames": (*_file("emri_small.dcm", 3), 0, "nnc-lossless-1"),
    "sc_rgb_8u": (*_file("SC_rgb.dcm"), 0, "nnc-lossless-1"),
    "generated_37x53_10s": (_generated, PixelFormat(37, 53, 1, 16, 10, True, "MONOCHROME2"), 0, "nnc-lossless-1"),
    "ct_small_near_lossless_3": (*_file("CT_small.dcm"), 3, "nnc-lossless-1"),
    "ct_small_16s_nolstm": (*_file("CT_small.dcm"), 0, "nnc-lossless-1-nolstm"),
}
