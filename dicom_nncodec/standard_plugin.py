"""pydicom pixel-data backend for JPEG XL and HTJ2K, through imagecodecs (libjxl, OpenJPH).

Why here: pydicom 3.0 can neither encode nor decode JPEG XL and cannot encode
HTJ2K, but the node stores and sends both.  Shaped like pydicom's own backend
modules (``DECODER_DEPENDENCIES``, ``is_available``, ``_decode_frame`` /
``_encode_frame``); imagecodecs is imported only when a frame is coded.

Lossless only: JPEG XL with ``lossless=True`` at effort 7 (option ``effort``),
HTJ2K with the reversible 5/3 wavelet.  Signed pixels (Pixel Representation 1):
JPEG XL has no signed samples, so, as DICOM does for JPEG-LS, the stored bit
pattern of Bits Stored bits is coded as an unsigned number and sign-extended
again after decoding; the bit depth written into the JPEG XL codestream is Bits
Stored.  JPEG 2000 codes signed samples natively.  Colour images are coded
component by component without a colour transform, so Photometric
Interpretation RGB stays true of the decoded pixels.
"""
from __future__ import annotations

import numpy as np
import pydicom.uid as U

from .syntax import JPEG_XL_SYNTAXES, JPEGXLLossless

HTJ2K_SYNTAXES = (U.HTJ2KLossless, U.HTJ2KLosslessRPCL, U.HTJ2K)
ENCODED_HERE = (JPEGXLLossless, U.HTJ2KLossless)
DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs") for uid in JPEG_XL_SYNTAXES + HTJ2K_SYNTAXES}
ENCODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs") for uid in ENCODED_HERE}

JPEG_XL_EFFORT = 7           # libjxl's default; 9 buys < 1 % for 3x the time (see README)
# Photometric Interpretations these encoders write unchanged (PS3.5 Table 8.2.15-1 for JPEG XL)
_PHOTOMETRIC = {1: ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"), 3: ("RGB",)}


def is_available(uid) -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    if uid in JPEG_XL_SYNTAXES:
        return bool(getattr(imagecodecs.JPEGXL, "available", True))
    return uid in HTJ2K_SYNTAXES and bool(getattr(imagecodecs.HTJ2K, "available", True))


def _frame_array(src: bytes, runner, signed: bool) -> np.ndarray:
    """One frame from pydicom's encoder input (1 or 2 bytes per sample by Bits Stored) as
    rows x columns (x samples), colour-by-pixel."""
    bits, spp = runner.bits_stored, runner.samples_per_pixel
    if bits > 16:
        raise ValueError(f"Bits Stored {bits}: JPEG XL and HTJ2K are used here for up to 16 bits")
    photometric = str(runner.photometric_interpretation)
    if photometric not in _PHOTOMETRIC.get(spp, ()):
        raise ValueError(f"{spp} samples per pixel with Photometric Interpretation {photometric} "
                         f"is not coded as JPEG XL or HTJ2K here")
    itemsize = 1 if bits <= 8 else 2
    arr = np.frombuffer(src, dtype=f"<{'i' if signed else 'u'}{itemsize}")
    if spp == 1:
        return arr.reshape(runner.rows, runner.columns)
    if not runner.is_array and runner.planar_configuration == 1:
        return np.moveaxis(arr.reshape(spp, runner.rows, runner.columns), 0, -1)
    return arr.reshape(runner.rows, runner.columns, spp)


def _set_colour_by_pixel(runner) -> None:
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)


def _encode_frame(src: bytes, runner) -> bytes:
    import imagecodecs
    if runner.transfer_syntax == JPEGXLLossless:
        bits = runner.bits_stored
        frame = _frame_array(src, runner, signed=False)
        frame = np.ascontiguousarray(frame & np.asarray((1 << bits) - 1, dtype=frame.dtype))
        effort = int(runner.get_option("effort", JPEG_XL_EFFORT))
        return imagecodecs.jpegxl_encode(frame, lossless=True, effort=effort, bitspersample=bits,
                                         usecontainer=False)
    if runner.transfer_syntax == U.HTJ2KLossless:
        signed = bool(runner.pixel_representation)
        frame = _frame_array(src, runner, signed=signed)
        if signed:          # sign-extend from Bits Stored (bits above it may hold anything)
            shift = 8 * frame.dtype.itemsize - runner.bits_stored
            frame = (frame << shift) >> shift
        return imagecodecs.htj2k_encode(np.ascontiguousarray(frame), reversible=True, rgb=False)
    raise ValueError(f"cannot encode {runner.transfer_syntax.name} here")


def _decode_frame(src: bytes, runner) -> bytes:
    import imagecodecs
    if runner.transfer_syntax in HTJ2K_SYNTAXES:
        arr = imagecodecs.htj2k_decode(src)
    else:
        arr = imagecodecs.jpegxl_decode(src)
    signed = bool(runner.pixel_representation)
    itemsize = runner.bits_allocated // 8
    out = np.asarray(arr).astype(f"<{'i' if signed else 'u'}{itemsize}")
    if signed and runner.transfer_syntax in JPEG_XL_SYNTAXES:
        shift = 8 * itemsize - runner.bits_stored       # the coded bit pattern, sign-extended again
        out = (out << shift) >> shift
    _set_colour_by_pixel(runner)
    return out.tobytes()
