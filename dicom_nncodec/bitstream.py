"""Frame container, format versions 1 and 2 (specified in conformance/PRIVATE_TRANSFER_SYNTAX.md).

Both versions share this layout; the version says how the payloads are coded
(1: the torch pyramid and the constriction range coder; 2: the compiled engine
with adaptive tables and rANS, lossless only).

No torch and no model here: only packing, unpacking and the integrity checks,
so a corrupt, truncated or foreign frame is refused before any decoding work.

All integers little-endian::

    magic "NNCF" | version u8 | mode u8 | max_error u16
    model_id_len u8 | model_id ASCII | weights digest 32 bytes (SHA-256)
    rows u16 | columns u16 | samples_per_pixel u8 | bits_allocated u8 | bits_stored u8
    pixel_representation u8 | colour_transform u8 | planes u8
    pixel_crc u32 | payload_len u32 x planes | payloads | frame_crc u32 [| one 0x00 pad byte]

``pixel_crc`` is the CRC-32 of the decoded frame as pydicom returns it (pixel-
interleaved, little-endian, in the Bits Allocated container, signed values
sign-extended); ``frame_crc`` is the CRC-32 of every byte before it.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import BitstreamError

MAGIC = b"NNCF"
VERSION = 2                 # the newest format this release writes
VERSIONS = (1, 2)           # every format this release decodes
MODE_LOSSLESS = 0
MODE_NEAR_LOSSLESS = 1
MODE_LOSSY = 2          # RNN-Conv at a target ratio; payload layout in lossy.py
MAX_ERROR = 255
MODE_NAMES = {MODE_LOSSLESS: "lossless", MODE_NEAR_LOSSLESS: "near-lossless", MODE_LOSSY: "lossy"}
_FIXED = struct.Struct("<4sBBHB")
_GEOMETRY = struct.Struct("<HHBBBBBBI")


@dataclass(frozen=True)
class FrameHeader:
    mode: int
    max_error: int
    model_id: str
    digest: bytes
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    transform: int
    pixel_crc: int
    payload_sizes: tuple[int, ...]
    header_size: int = 0
    version: int = 1

    @property
    def size(self) -> int:
        """Bytes of the frame without its optional pad byte."""
        return self.header_size + sum(self.payload_sizes) + 4


def pack(h: FrameHeader, payloads: list[bytes]) -> bytes:
    mid = h.model_id.encode("ascii")
    if len(mid) > 255 or len(h.digest) != 32:
        raise ValueError("model id must be ASCII of at most 255 bytes and the digest 32 bytes")
    if h.version not in VERSIONS:
        raise ValueError(f"format version {h.version} is not one of {VERSIONS}")
    out = bytearray(_FIXED.pack(MAGIC, h.version, h.mode, h.max_error, len(mid)))
    out += mid + h.digest
    out += _GEOMETRY.pack(h.rows, h.columns, h.samples_per_pixel, h.bits_allocated, h.bits_stored,
                          int(h.signed), h.transform, len(payloads), h.pixel_crc)
    out += struct.pack(f"<{len(payloads)}I", *map(len, payloads))
    for p in payloads:
        out += p
    out += struct.pack("<I", zlib.crc32(out))
    if len(out) % 2:
        out += b"\x00"  # DICOM fragments have even length
    return bytes(out)


def header_size(model_id: str, planes: int) -> int:
    """Bytes a frame takes besides its payloads: header, payload lengths, frame CRC and the pad byte.

    Payload lengths are multiples of 4, so the pad byte depends only on the model id: it is present
    exactly when the id has an even length."""
    n = len(model_id.encode("ascii"))
    return _FIXED.size + n + 32 + _GEOMETRY.size + 4 * planes + 4 + (n % 2 == 0)


def unpack(data: bytes) -> tuple[FrameHeader, list[bytes]]:
    """Parse and check a frame; raises BitstreamError naming what is wrong."""
    data = bytes(data)
    h = read_header(data)
    end = h.size
    if len(data) < end:
        raise BitstreamError(f"truncated frame: {len(data)} bytes, the header announces {end}")
    if len(data) > end + 1 or (len(data) == end + 1 and data[end] != 0):
        raise BitstreamError(f"frame has {len(data) - end} unexpected trailing bytes")
    (crc,) = struct.unpack_from("<I", data, end - 4)
    if zlib.crc32(data[:end - 4]) != crc:
        raise BitstreamError("corrupt frame: frame CRC-32 mismatch")
    payloads, pos = [], h.header_size
    for n in h.payload_sizes:
        payloads.append(data[pos:pos + n])
        pos += n
    return h, payloads


def read_header(data: bytes) -> FrameHeader:
    """Parse the header only (no CRC check of the payload); for ``info`` and for refusing early."""
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise BitstreamError("not a dicom-nncodec frame (bad magic)")
    _, version, mode, max_error, n = _FIXED.unpack_from(data)
    if version not in VERSIONS:
        newer = " (written by a newer release; upgrade dicom-nncodec)" if version > max(VERSIONS) else ""
        raise BitstreamError(f"unsupported frame format version {version}{newer}")
    if mode not in MODE_NAMES:
        raise BitstreamError(f"unknown coding mode {mode}")
    pos = _FIXED.size
    if len(data) < pos + n + 32 + _GEOMETRY.size:
        raise BitstreamError("truncated frame header")
    try:
        model_id = data[pos:pos + n].decode("ascii")
    except UnicodeDecodeError:
        raise BitstreamError("corrupt frame header: model id is not ASCII") from None
    digest = data[pos + n:pos + n + 32]
    pos += n + 32
    rows, cols, spp, ba, bs, pr, tr, planes, pixel_crc = _GEOMETRY.unpack_from(data, pos)
    pos += _GEOMETRY.size
    if len(data) < pos + 4 * planes:
        raise BitstreamError("truncated frame header")
    sizes = struct.unpack_from(f"<{planes}I", data, pos)
    pos += 4 * planes
    if (not rows or not cols or spp not in (1, 3) or planes != spp or ba not in (8, 16)
            or not 1 <= bs <= ba or pr > 1 or tr > 1 or any(s % 4 for s in sizes)):
        raise BitstreamError("corrupt frame header: inconsistent pixel description")
    if mode in (MODE_LOSSLESS, MODE_LOSSY) and max_error:
        raise BitstreamError(f"corrupt frame header: {MODE_NAMES[mode]} frame with a maximum error")
    if mode == MODE_NEAR_LOSSLESS and not 1 <= max_error <= MAX_ERROR:
        raise BitstreamError(f"corrupt frame header: near-lossless maximum error {max_error} outside 1..{MAX_ERROR}")
    if tr and (spp != 3 or mode != MODE_LOSSLESS):
        raise BitstreamError("corrupt frame header: colour transform only applies to lossless 3-sample frames")
    if pr and spp != 1:
        raise BitstreamError("corrupt frame header: signed data with more than one sample")
    if version == 2 and mode != MODE_LOSSLESS:
        raise BitstreamError(f"corrupt frame header: format version 2 codes lossless frames only, not "
                             f"{MODE_NAMES[mode]}")
    return FrameHeader(mode, max_error, model_id, digest, rows, cols, spp, ba, bs, bool(pr), tr, pixel_crc,
                       tuple(sizes), pos, version)
