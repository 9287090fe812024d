"""What a received instance must satisfy before it is stored, and the C-STORE status of each refusal.

Why refuse at the door: everything stored is parsed again later (by the
compressor, C-FIND, transcoding on retrieve, fsck).  A data set that lies
about itself (fewer pixel bytes than Rows x Columns x Frames x Samples x Bits
Allocated announce, fragments that do not parse, a private frame that fails
its checksum, UIDs that are not UIDs) would fail there, later, with nobody to
tell; refused here, the sender is told while it still holds the data.  Only
structure is checked (the header, lengths, the encapsulation and the private
frames' CRC-32): no pixels are decoded while the sender waits.  The pixel
description must be single-valued (a second Photometric Interpretation would
break whoever reads it as one value).  Native Pixel Data with *more* bytes
than its description is not refused: the instance is kept exactly as received
and never compressed or transcoded (:func:`pixel_surplus`), so that nothing it
holds is cut off.

Statuses (PS3.4 B.2.3, PS3.7 C): 0122H Refused: SOP Class not supported (the
request names a class that is not a storage class, or not the one of its
presentation context); A700H Refused: Out of resources (disk, the configured
size limits; the sender may retry); A900H Error: Data Set does not match SOP
Class; C000H Error: Cannot understand (unparseable, bad UIDs, pixel data
inconsistent with its description, damaged compressed pixel data).
"""
from __future__ import annotations

import os
import re
from io import BytesIO
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

import dicom_nncodec
from dicom_nncodec import bitstream as B
from dicom_nncodec.codec import check_matches
from dicom_nncodec.errors import NNCodecError
from dicom_nncodec.pixels import PixelFormat

SUCCESS = 0x0000
DUPLICATE = 0x0111            # Failure: Duplicate SOP Instance (duplicates: reject)
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
VIDEO = frozenset({"1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
                   "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
                   "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"})


class StoreRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def valid_uid(value) -> bool:
    """A UID by PS3.5 9.1: digits and dots, no empty component, at most 64 characters (so never a
    path separator, ``..`` or anything a file name could be made of)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


def check_request(sop_class_uid: str, sop_instance_uid: str, context_class: str | None) -> None:
    """The C-STORE request itself: its Affected SOP Class and Instance UIDs."""
    sop_class_uid = str(sop_class_uid or "").strip()
    if not valid_uid(sop_class_uid) or sop_class_uid not in STORAGE_CLASSES:
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, "the Affected SOP Class UID is not a supported storage class")
    if context_class is not None and sop_class_uid != str(context_class):
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED,
                           "the Affected SOP Class UID differs from the presentation context's abstract syntax")
    if not valid_uid(str(sop_instance_uid or "").strip()):
        raise StoreRefused(CANNOT_UNDERSTAND, "the Affected SOP Instance UID is not a valid UID")


DEFER = 4096


def read_header(path: str, deflated: bool = False):
    """The candidate file parsed, values over 4 KiB left on disk (deferred: only their lengths are read).
    Every other value is converted now, so that one pydicom cannot read fails here and not later.
    A deflated data set is inflated in memory by pydicom (its size was checked before), so nothing is
    deferred there."""
    size = os.path.getsize(path)
    try:
        ds = dcmread(path, defer_size=None if deflated else DEFER)
        _convert(ds, size)
    except StoreRefused:
        raise
    except Exception as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"the data set cannot be parsed: {type(exc).__name__}: {exc}") from None
    return ds


def _convert(ds, size: int) -> None:
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length != 0xFFFFFFFF:
            # deferred: pydicom skipped it by its length, so check that the bytes are there
            if raw.value_tell + raw.length > size:
                raise StoreRefused(CANNOT_UNDERSTAND, f"element {raw.tag} announces {raw.length} bytes, more than "
                                                      "the data set holds")
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _convert(item, size)


def pixel_data_length(ds) -> tuple[int, bool]:
    """(bytes of Pixel Data, whether it has undefined length), without reading a deferred value."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(raw, RawDataElement):
        undefined = raw.length == 0xFFFFFFFF
        return (len(raw.value) if raw.value is not None else raw.length), undefined
    return len(raw.value or b""), bool(raw.is_undefined_length)


def _uid(ds, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} is missing")
    if not valid_uid(value):
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
    return value


def check_identity(ds, sop_class_uid: str, sop_instance_uid: str) -> str:
    """The data set's UIDs: valid, and the ones the request named.  Returns the SOP Instance UID."""
    sop_uid = _uid(ds, "SOPInstanceUID")
    if sop_uid != sop_instance_uid.strip():
        raise StoreRefused(CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's")
    if _uid(ds, "SOPClassUID") != sop_class_uid.strip():
        raise StoreRefused(DATASET_MISMATCH, "SOP Class UID differs from the request's")
    _uid(ds, "StudyInstanceUID")
    _uid(ds, "SeriesInstanceUID")
    return sop_uid


@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames * self.samples

    def native_length(self) -> int:
        """Bytes of native pixel data (PS3.5 8.1.1, 8.2: bit-packed for Bits Allocated 1,
        two samples per pixel for YBR_FULL_422)."""
        if self.bits_allocated == 1:
            return (self.pixels + 7) // 8
        samples = 2 if self.photometric == "YBR_FULL_422" and self.samples == 3 else self.samples
        return self.rows * self.columns * self.frames * samples * self.bits_allocated // 8


def _count(ds, keyword: str, lo: int, hi: int, default: int | None = None) -> int:
    if keyword not in ds or ds[keyword].value in (None, ""):
        if default is None:
            raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} is missing although the data set has Pixel Data")
        return default
    try:
        value = int(str(ds[keyword].value).strip())
    except (TypeError, ValueError):
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} {str(ds[keyword].value)[:32]!r} is not a number") from None
    if not lo <= value <= hi:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} {value} is outside {lo}..{hi}")
    return value


# The Image Pixel module attributes the node and the codec read: each has Value Multiplicity 1
# (PS3.3 C.7.6.3); a second value would be used by nobody and break whoever reads it as one.
PIXEL_DESCRIPTION = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                     "SamplesPerPixel", "PlanarConfiguration", "NumberOfFrames", "PhotometricInterpretation")


def _single_valued(ds) -> None:
    for keyword in PIXEL_DESCRIPTION:
        if keyword in ds and ds[keyword].VM > 1:
            raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} has {ds[keyword].VM} values; the pixel description "
                                                  "allows one (VM 1)")


def geometry(ds) -> Geometry:
    _single_valued(ds)
    rows = _count(ds, "Rows", 1, 65535)
    columns = _count(ds, "Columns", 1, 65535)
    ba = _count(ds, "BitsAllocated", 1, 64)
    if ba != 1 and ba % 8:
        raise StoreRefused(CANNOT_UNDERSTAND, f"Bits Allocated {ba} is neither 1 nor a multiple of 8")
    bs = _count(ds, "BitsStored", 1, 64, default=ba)
    if bs > ba:
        raise StoreRefused(CANNOT_UNDERSTAND, f"Bits Stored {bs} exceeds Bits Allocated {ba}")
    samples = _count(ds, "SamplesPerPixel", 1, 4, default=1)
    if samples == 2:
        raise StoreRefused(CANNOT_UNDERSTAND, "Samples per Pixel 2 is not defined (1, 3 or 4)")
    frames = _count(ds, "NumberOfFrames", 1, 2**31 - 1, default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not photometric:   # Type 1 in the Image Pixel module: without it the pixels cannot be read
        raise StoreRefused(CANNOT_UNDERSTAND, "Photometric Interpretation is missing although the data set has "
                                              "Pixel Data")
    return Geometry(rows, columns, frames, samples, ba, photometric)


def _native(transfer_syntax) -> bool:
    ts = UID(str(transfer_syntax))
    return dicom_nncodec.syntax.registered(ts) is None and not ts.is_encapsulated


def pixel_surplus(ds, transfer_syntax) -> int:
    """Bytes of native Pixel Data beyond what Rows x Columns x Frames x Samples x Bits Allocated describe
    (the one pad byte of an odd length aside); 0 for encapsulated pixel data or none.  Such bytes are
    kept: an instance with a surplus is stored and returned exactly as received, never compressed or
    transcoded (coding the described pixels would drop them).  Raises StoreRefused for a description
    that cannot be read."""
    if "PixelData" not in ds or not _native(transfer_syntax):
        return 0
    need = geometry(ds).native_length()
    length, _ = pixel_data_length(ds)
    return max(0, length - (need + need % 2))


def surplus_reason(surplus: int) -> str:
    """Why an instance with a Pixel Data surplus is kept as received (its state reason, log lines, refusals)."""
    return (f"Pixel Data holds {surplus} bytes more than its description: kept exactly as received, "
            "never compressed or transcoded")


def check_pixel_data(ds, transfer_syntax: str, max_pixels: int) -> None:
    """Pixel Data consistent with its description, and within ``limits.max_pixels``."""
    if "PixelData" not in ds:
        return
    g = geometry(ds)
    if g.pixels > max_pixels:
        raise StoreRefused(OUT_OF_RESOURCES, f"{g.rows}x{g.columns} pixels x {g.frames} frames x {g.samples} samples "
                                             f"exceeds limits.max_pixels ({max_pixels})")
    length, undefined = pixel_data_length(ds)
    ts = UID(str(transfer_syntax))
    private = dicom_nncodec.syntax.registered(ts) is not None
    if _native(ts):
        if undefined:
            raise StoreRefused(CANNOT_UNDERSTAND, "native Pixel Data of undefined length")
        if length < g.native_length():
            raise StoreRefused(CANNOT_UNDERSTAND, f"Pixel Data holds {length} bytes; {g.rows} rows x {g.columns} "
                                                  f"columns x {g.frames} frames x {g.samples} samples x "
                                                  f"{g.bits_allocated} bits need {g.native_length()}")
        return
    if not undefined:
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data must have undefined length")
    value = ds.PixelData
    try:
        buf = BytesIO(value)
        offsets = parse_basic_offsets(buf)          # (leaves ``buf`` after the Basic Offset Table item)
        fragments = list(generate_fragments(buf))
    except Exception as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"encapsulated Pixel Data does not parse: {exc}") from None
    if not fragments:
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data holds no fragment")
    if offsets and len(offsets) != g.frames:
        raise StoreRefused(CANNOT_UNDERSTAND, f"the Basic Offset Table lists {len(offsets)} frames, "
                                              f"Number of Frames says {g.frames}")
    if str(ts) not in VIDEO and len(fragments) < g.frames:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{len(fragments)} fragments cannot hold {g.frames} frames")
    if private:
        _check_private_frames(ds, ts, fragments, g)


def _check_private_frames(ds, ts, fragments: list[bytes], g: Geometry) -> None:
    """The private syntaxes: one fragment per frame, each intact (frame CRC-32) and describing the same
    image as the data set (the full decode with its pixel CRC runs in the background and in fsck)."""
    if len(fragments) != g.frames:
        raise StoreRefused(CANNOT_UNDERSTAND, f"{len(fragments)} fragments for {g.frames} frames "
                                              "(the private syntaxes have one per frame)")
    try:
        fmt = PixelFormat.from_dataset(ds)
        for i, frame in enumerate(fragments):
            h, _ = B.unpack(frame)
            check_matches(h, fmt)
            if ts == dicom_nncodec.NNCodecLossless and h.mode != B.MODE_LOSSLESS:
                raise StoreRefused(CANNOT_UNDERSTAND, f"frame {i + 1} is near-lossless under the lossless syntax")
    except NNCodecError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"private pixel data is damaged: {exc}") from None
