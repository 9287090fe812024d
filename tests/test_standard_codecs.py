"""JPEG XL and HTJ2K lossless through pydicom (the imagecodecs backend): bit-exact for every pixel layout
the node stores, signed data included, written to a file and read back as any pydicom user would."""
from __future__ import annotations

import copy
import io

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, HTJ2KLossless

import dicom_nncodec  # noqa: F401  (registers the coders)
from dicom_nncodec.syntax import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless, by_keyword
from scp import config as C
from .imaging import make_dataset, smooth_image

RNG = np.random.default_rng(12)


def _ct_signed16():
    """CT-like signed 16-bit: air at -1024, tissue around 40, padding at -2000, noise (many negatives)."""
    img = smooth_image(48, 40, 12, signed=True, seed=3).astype(np.int32) - 1024
    img[:4] = -2000
    return img.astype(np.int16)


# name, frames, bits allocated, bits stored, signed, photometric, samples
LAYOUTS = [
    ("CT signed 16 of 16", _ct_signed16()[None], 16, 16, True, "MONOCHROME2", 1),
    ("signed 12 of 16", RNG.integers(-2048, 2048, (2, 40, 36)), 16, 12, True, "MONOCHROME2", 1),
    ("unsigned 16, full range", RNG.integers(0, 65536, (1, 40, 36)), 16, 16, False, "MONOCHROME2", 1),
    ("unsigned 12 of 16, MONOCHROME1", RNG.integers(0, 4096, (1, 40, 36)), 16, 12, False, "MONOCHROME1", 1),
    ("unsigned 8", RNG.integers(0, 256, (3, 40, 36)), 8, 8, False, "MONOCHROME2", 1),
    ("signed 8", RNG.integers(-128, 128, (1, 40, 36)), 8, 8, True, "MONOCHROME2", 1),
    ("RGB 8", RNG.integers(0, 256, (2, 40, 36, 3)), 8, 8, False, "RGB", 3),
]


def _roundtrip(ds, syntax):
    ds.compress(syntax, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


@pytest.mark.parametrize("syntax", [JPEGXLLossless, HTJ2KLossless], ids=["jpegxl", "htj2k"])
@pytest.mark.parametrize("name, frames, ba, bs, signed, photometric, samples", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_lossless_bit_exact(syntax, name, frames, ba, bs, signed, photometric, samples):
    ds = make_dataset(frames, ba, bs, signed=signed, photometric=photometric, samples=samples)
    original = ds.pixel_array.copy()
    uid = ds.SOPInstanceUID
    back = _roundtrip(ds, syntax)
    assert back.file_meta.TransferSyntaxUID == syntax and back.SOPInstanceUID == uid
    assert back.pixel_array.dtype == original.dtype
    assert np.array_equal(back.pixel_array, original), name
    if signed:
        assert (original < 0).any()             # the case under test really has negative values
    back.decompress()
    assert np.array_equal(back.pixel_array, original)


def test_rgb_stored_plane_by_plane_comes_back_colour_by_pixel():
    frames = RNG.integers(0, 256, (1, 20, 24, 3))
    ds = make_dataset(frames, 8, 8, photometric="RGB", samples=3)
    original = ds.pixel_array.copy()
    ds.PlanarConfiguration = 1
    ds.PixelData = np.moveaxis(original, -1, 0).astype(np.uint8).tobytes()
    for syntax in (JPEGXLLossless, HTJ2KLossless):
        back = _roundtrip(copy.deepcopy(ds), syntax)
        assert back.PlanarConfiguration == 0 and np.array_equal(back.pixel_array, original)


def test_signed_jpeg_xl_codes_the_stored_bit_pattern_at_bits_stored():
    """JPEG XL has no signed samples: the codestream holds the Bits Stored two's-complement pattern
    (as DICOM does for JPEG-LS); any JPEG XL decoder gets those numbers, the DICOM reader sign-extends."""
    frames = RNG.integers(-2048, 2048, (1, 16, 16))
    ds = make_dataset(frames, 16, 12, signed=True)
    ds.compress(JPEGXLLossless, generate_instance_uid=False)
    raw = imagecodecs.jpegxl_decode(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1))
    assert np.array_equal(raw, frames[0] & 0xFFF)


def test_htj2k_decodes_with_either_plugin():
    ds = make_dataset(_ct_signed16()[None], 16, 16, signed=True)
    original = ds.pixel_array.copy()
    ds.compress(HTJ2KLossless, generate_instance_uid=False)
    for plugin in ("imagecodecs", ""):
        arr = pydicom.pixels.pixel_array(ds, decoding_plugin=plugin)
        assert np.array_equal(arr, original), plugin or "pydicom's default"


def test_unsupported_layout_is_refused_not_mangled():
    ds = make_dataset(RNG.integers(0, 256, (1, 8, 8, 3)), 8, 8, photometric="YBR_FULL", samples=3)
    with pytest.raises(Exception, match="YBR_FULL"):
        ds.compress(JPEGXLLossless, generate_instance_uid=False)


def test_jpeg_xl_uids_are_transfer_syntaxes_and_configurable():
    for uid, keyword in ((JPEGXLLossless, "JPEGXLLossless"), (JPEGXLJPEGRecompression, "JPEGXLJPEGRecompression"),
                         (JPEGXL, "JPEGXL")):
        fresh = UID(str(uid))
        assert fresh.is_transfer_syntax and fresh.is_compressed and not fresh.is_implicit_VR
        assert by_keyword(keyword) == uid and fresh.keyword == keyword
    cfg = C.load_dict({"retrieve": {"transfer_syntaxes": ["JPEGXLLossless", "HTJ2KLossless",
                                                          "ExplicitVRLittleEndian"]}})
    assert cfg.retrieve_syntaxes[:2] == (JPEGXLLossless, HTJ2KLossless)
    with pytest.raises(C.ConfigError, match="cannot be produced losslessly"):
        C.load_dict({"retrieve": {"transfer_syntaxes": ["JPEGXL"]}})
