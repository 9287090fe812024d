"""pydicom pixel-data backend for the two private transfer syntaxes.

Shaped like pydicom's own backend modules (``DECODER_DEPENDENCIES``,
``is_available``, ``_decode_frame``/``_encode_frame``): the learned codec is
called here, never re-implemented.  pydicom hands over one frame at a time.

Options reaching the encoder through ``ds.compress(uid, **options)``:
``max_error`` (NNCodecLossy: the guaranteed maximum absolute error, 1..255),
``ratio`` (NNCodecLossy: lossy RNN-Conv at this compression ratio, within 10 %),
``device`` (``auto``/``cpu``/``cuda``; default from the environment variable
``DICOM_NNCODEC_DEVICE``, else ``auto``).
"""
from __future__ import annotations

import os

import numpy as np

from . import codec
from .dataset import check_lossy_options
from .pixels import PixelFormat, check_high_bit
from .syntax import PRIVATE_SYNTAXES, NNCodecLossless

DECODER_DEPENDENCIES = {uid: ("numpy", "torch", "constriction") for uid in PRIVATE_SYNTAXES}
ENCODER_DEPENDENCIES = DECODER_DEPENDENCIES


def is_available(uid) -> bool:
    return uid in PRIVATE_SYNTAXES


def default_device() -> str:
    return os.environ.get("DICOM_NNCODEC_DEVICE", "auto")


def _runner_format(runner) -> PixelFormat:
    return PixelFormat(runner.rows, runner.columns, runner.samples_per_pixel, runner.bits_allocated,
                       runner.bits_stored, bool(runner.pixel_representation),
                       str(runner.photometric_interpretation))


def _decode_frame(src: bytes, runner) -> bytes:
    fmt = _runner_format(runner)
    frame = codec.decode_frame(src, fmt, device=runner.get_option("device", default_device()),
                               lossless_only=runner.transfer_syntax == NNCodecLossless)
    if fmt.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)
    return frame.tobytes()


def _encode_frame(src: bytes, runner) -> bytes:
    fmt = _runner_format(runner).validate()
    # pydicom 3.0 hands encoders no High Bit; Dataset.compress checks it before this point (see
    # _register), and a caller of the low-level Encoder API may pass high_bit=... itself
    check_high_bit(runner.get_option("high_bit", None), fmt.bits_stored)
    max_error = int(runner.get_option("max_error", 0) or 0)
    ratio = runner.get_option("ratio", None)
    ratio = None if ratio is None else float(ratio)
    check_lossy_options(runner.transfer_syntax, max_error, ratio)
    itemsize = 1 if fmt.bits_stored <= 8 else 2
    kind = "i" if fmt.signed else "u"
    arr = np.frombuffer(src, dtype=f"<{kind}{itemsize}")
    if fmt.samples_per_pixel == 1:
        frame = arr.reshape(fmt.rows, fmt.columns)
    elif not runner.is_array and runner.planar_configuration == 1:
        frame = np.moveaxis(arr.reshape(3, fmt.rows, fmt.columns), 0, -1)
    else:
        frame = arr.reshape(fmt.rows, fmt.columns, 3)
    return codec.encode_frame(frame, fmt, max_error=max_error, ratio=ratio,
                              device=runner.get_option("device", default_device()))
