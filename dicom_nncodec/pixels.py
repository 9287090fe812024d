"""Turning DICOM pixel data into unsigned integer planes for the coder, and back.

Why: the learned coder sees only planes of unsigned integers in [0, 2**bits).
Every DICOM detail (signedness, bits above High Bit, colour models, the
container size) is handled here, once, for the pydicom plugin, the command
line, training and the node alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedPixelData

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
COLOUR_RCT = ("RGB",)           # coded after the reversible colour transform of JPEG 2000
COLOUR_DIRECT = ("YBR_FULL",)   # already decorrelated: each component coded as it is

TRANSFORM_NONE = 0
TRANSFORM_RCT = 1


@dataclass(frozen=True)
class PixelFormat:
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str

    @classmethod
    def from_dataset(cls, ds, *, for_encoding: bool = False) -> "PixelFormat":
        """The pixel description of ``ds``.  ``for_encoding`` also refuses layouts the encoder would
        alter (High Bit other than Bits Stored - 1); decoding never needs that check."""
        missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
                   if k not in ds]
        if missing:
            raise UnsupportedPixelData(f"dataset lacks {', '.join(missing)}")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedPixelData("float pixel data is not supported")
        fmt = cls(int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated),
                  int(ds.get("BitsStored", ds.BitsAllocated)), bool(ds.get("PixelRepresentation", 0)),
                  str(ds.PhotometricInterpretation).strip())
        if for_encoding:
            check_high_bit(ds.get("HighBit"), fmt.bits_stored)
        return fmt

    def validate(self) -> "PixelFormat":
        if self.bits_allocated == 1:
            raise UnsupportedPixelData("1-bit pixel data (Bits Allocated 1) is not supported")
        if self.bits_allocated not in (8, 16):
            raise UnsupportedPixelData(f"Bits Allocated {self.bits_allocated} is not supported (8 or 16 only)")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise UnsupportedPixelData(f"Bits Stored {self.bits_stored} is not within Bits Allocated "
                                       f"{self.bits_allocated}")
        if self.rows < 1 or self.columns < 1 or self.rows > 65535 or self.columns > 65535:
            raise UnsupportedPixelData(f"image size {self.rows}x{self.columns} is not supported")
        if self.samples_per_pixel == 1:
            if self.photometric not in GRAYSCALE:
                raise UnsupportedPixelData(f"Photometric Interpretation {self.photometric!r} with one sample "
                                           "is not supported")
        elif self.samples_per_pixel == 3:
            if self.photometric not in COLOUR_RCT + COLOUR_DIRECT:
                raise UnsupportedPixelData(f"Photometric Interpretation {self.photometric!r} is not supported "
                                           "(RGB and YBR_FULL are)")
            if self.signed:
                raise UnsupportedPixelData("signed colour pixel data is not supported")
        else:
            raise UnsupportedPixelData(f"Samples per Pixel {self.samples_per_pixel} is not supported")
        return self

    @property
    def transform(self) -> int:
        return TRANSFORM_RCT if self.photometric in COLOUR_RCT else TRANSFORM_NONE

    def coding_transform(self, max_error: int) -> int:
        """The colour transform used for coding: the RCT only when lossless, because
        its inverse would spread a per-component error bound over other components."""
        return self.transform if not max_error else TRANSFORM_NONE

    def plane_bits(self, transform: int) -> list[int]:
        b = self.bits_stored
        if self.samples_per_pixel == 1:
            return [b]
        return [b, b + 1, b + 1] if transform == TRANSFORM_RCT else [b, b, b]

    @property
    def frame_bytes(self) -> int:
        """Uncompressed size of one frame at Bits Allocated: the numerator of every compression ratio
        (the codec's lossy target, Lossy Image Compression Ratio, the benchmarks, ``info``)."""
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated // 8

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")


def check_high_bit(high_bit, bits_stored: int) -> None:
    """Only the usual layout (High Bit = Bits Stored - 1: the stored bits are the low ones) is
    supported; any other would be silently altered by masking, so it is refused."""
    if high_bit is not None and int(high_bit) != bits_stored - 1:
        raise UnsupportedPixelData(f"High Bit {int(high_bit)} with Bits Stored {bits_stored} is not supported "
                                   f"(only High Bit = Bits Stored - 1)")


def to_planes(frame: np.ndarray, fmt: PixelFormat, transform: int | None = None) -> np.ndarray:
    """One frame (rows, cols) or (rows, cols, 3), any integer dtype -> (planes, rows, cols) int32.

    Bits above Bits Stored are ignored; signed values become offset binary, which
    for B-bit two's complement is a flip of bit B-1."""
    b = fmt.bits_stored
    mask = (1 << b) - 1
    x = np.asarray(frame)
    if x.dtype.kind not in "iu":
        raise UnsupportedPixelData(f"pixel array of dtype {x.dtype} is not supported (integers only)")
    x = x.astype(np.int64, copy=False)
    expected = (fmt.rows, fmt.columns) if fmt.samples_per_pixel == 1 else (fmt.rows, fmt.columns, 3)
    if x.shape != expected:
        raise UnsupportedPixelData(f"frame shape {x.shape} does not match the pixel description {expected}")
    x = x & mask
    if fmt.signed:
        x = x ^ (1 << (b - 1))
    if fmt.samples_per_pixel == 1:
        return x[None].astype(np.int32)
    r, g, bl = x[..., 0], x[..., 1], x[..., 2]
    if (fmt.transform if transform is None else transform) == TRANSFORM_RCT:
        y = (r + 2 * g + bl) >> 2
        return np.stack([y, bl - g + (1 << b), r - g + (1 << b)]).astype(np.int32)
    return np.stack([r, g, bl]).astype(np.int32)


def from_planes(planes: np.ndarray, fmt: PixelFormat, transform: int | None = None) -> np.ndarray:
    """Inverse of to_planes: returns the frame in the dtype of Bits Allocated and Pixel Representation,
    signed values sign-extended."""
    b = fmt.bits_stored
    p = planes.astype(np.int64)
    if fmt.samples_per_pixel == 1:
        x = p[0]
        if fmt.signed:
            x = x - (1 << (b - 1))
        return x.astype(fmt.dtype)
    if (fmt.transform if transform is None else transform) == TRANSFORM_RCT:
        y, cb, cr = p[0], p[1] - (1 << b), p[2] - (1 << b)
        g = y - ((cb + cr) >> 2)
        x = np.stack([cr + g, g, cb + g], -1)
    else:
        x = np.moveaxis(p, 0, -1)
    return x.astype(fmt.dtype)
