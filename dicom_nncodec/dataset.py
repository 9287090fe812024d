"""Whole-dataset operations: compress, decompress, and the DICOM rules that come with them.

Why not just ``ds.compress``: pydicom encodes frame by frame; here frames are
batched through the network (much faster for multi-frame objects and on a
GPU), the Basic Offset Table is written, and the attributes PS3.3 requires
for lossy results are set.  ``ds.compress(NNCodecLossless)`` and this module
produce identical Pixel Data.
"""
from __future__ import annotations

import numpy as np
import pydicom
import pydicom.multival
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import codec
from .errors import UnsupportedPixelData
from .pixels import PixelFormat
from .syntax import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, LOSSY_METHOD, RNN_CONV_METHOD,
                     NNCodecLossless, NNCodecLossy, fix_transfer_syntax, registered)


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise UnsupportedPixelData(f"Number of Frames {ds.get('NumberOfFrames')!r} is not an integer") from None


def is_image(ds: Dataset) -> bool:
    return "PixelData" in ds and "Rows" in ds


def frames_of(ds: Dataset) -> list[np.ndarray]:
    """Decoded frames of ``ds`` as arrays (any transfer syntax pydicom can decode)."""
    fix_transfer_syntax(ds)
    n = number_of_frames(ds)
    # stored values as they are: no rescale, no VOI, no YBR -> RGB conversion
    arr = pydicom.pixels.pixel_array(ds, raw=True)
    if n == 1:
        return [arr]
    return list(arr)


def values(ds: Dataset, keyword: str) -> list[str]:
    """All values of a multi-valued attribute as strings ([] when absent); pydicom gives VM 1 as a scalar."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return []
    v = ds[keyword].value
    return [str(x) for x in v] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [str(v)]


def apply_lossy_attributes(ds: Dataset, ratio: float, method: str = LOSSY_METHOD,
                           new_uid: bool = True) -> None:
    """PS3.3 C.7.6.1.1.5: "01" (never reset), ratio and method appended, Image Type DERIVED,
    new SOP Instance UID with the original referenced in Source Image Sequence."""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = values(ds, "LossyImageCompressionRatio") + [f"{ratio:.2f}"]
    ds.LossyImageCompressionMethod = values(ds, "LossyImageCompressionMethod") + [method]
    if "ImageType" in ds:
        it = values(ds, "ImageType") or ["DERIVED"]
        it[0] = "DERIVED"
        ds.ImageType = it
    else:
        ds.ImageType = ["DERIVED", "SECONDARY"]
    if new_uid and "SOPInstanceUID" in ds:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.SourceImageSequence = list(ds.get("SourceImageSequence", [])) + [ref]
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = uid


def compress(ds: Dataset, syntax=NNCodecLossless, *, max_error: int = 0, ratio: float | None = None,
             device="auto", batch_size: int = codec.DEFAULT_BATCH) -> Dataset:
    """Compress ``ds`` in place to one of the private syntaxes.

    Lossless keeps every UID.  ``NNCodecLossy`` takes either ``max_error`` >= 1 (near-lossless,
    a guaranteed bound) or ``ratio`` (lossy RNN-Conv at that compression ratio, within 10 %);
    both set the lossy attributes and a new SOP Instance UID."""
    return compress_many([ds], syntax, max_error=max_error, ratio=ratio, device=device, batch_size=batch_size)[0]


def check_lossy_options(syntax, max_error: int, ratio) -> None:
    """The one place that says which options each private syntax takes."""
    if syntax == NNCodecLossless and (max_error or ratio is not None):
        raise UnsupportedPixelData("NNCodecLossless is lossless only; use NNCodecLossy with max_error or ratio")
    if syntax == NNCodecLossy:
        if max_error and ratio is not None:
            raise UnsupportedPixelData("NNCodecLossy takes max_error or ratio, not both")
        if ratio is None and max_error < 1:
            raise UnsupportedPixelData("NNCodecLossy needs max_error=N (1..255, a guaranteed maximum error) "
                                       "or ratio=R (lossy at compression ratio R)")


def compress_many(datasets: list[Dataset], syntax=NNCodecLossless, *, max_error: int = 0,
                  ratio: float | None = None, device="auto",
                  batch_size: int = codec.DEFAULT_BATCH) -> list[Dataset]:
    """Compress several datasets in place; frames of datasets with the same pixel format go through
    the network together (a series of single-frame CT slices codes as fast as one multi-frame object).
    Each dataset's result is identical to compressing it alone."""
    syntax = registered(syntax)
    if syntax is None:
        raise ValueError("syntax must be NNCodecLossless or NNCodecLossy")
    check_lossy_options(syntax, max_error, ratio)
    groups: dict[PixelFormat, list[tuple[Dataset, list[np.ndarray]]]] = {}
    for ds in datasets:
        fmt = PixelFormat.from_dataset(ds, for_encoding=True).validate()
        groups.setdefault(fmt, []).append((ds, frames_of(ds)))
    for fmt, items in groups.items():
        frames = [f for _, fs in items for f in fs]
        encoded = codec.encode_frames(frames, fmt, max_error=max_error, ratio=ratio, device=device,
                                      batch_size=batch_size)
        pos = 0
        for ds, fs in items:
            _set_encoded(ds, fmt, syntax, encoded[pos:pos + len(fs)], max_error or ratio is not None)
            pos += len(fs)
    return datasets


def _set_encoded(ds: Dataset, fmt: PixelFormat, syntax, encoded: list[bytes], lossy: bool) -> None:
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    if fmt.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds._pixel_array = None
    ds._pixel_id = {}
    if lossy:
        apply_lossy_attributes(ds, compression_ratio(fmt, encoded), lossy_method(encoded))


def lossy_method(encoded: list[bytes]) -> str:
    """Lossy Image Compression Method of frames: NNCODEC_RNN_1 for RNN-Conv, NNCODEC_1 for near-lossless."""
    from .bitstream import MODE_LOSSY, read_header
    return RNN_CONV_METHOD if read_header(encoded[0]).mode == MODE_LOSSY else LOSSY_METHOD


def compression_ratio(fmt: PixelFormat, encoded: list[bytes]) -> float:
    """Lossy Image Compression Ratio: uncompressed size (Bits Allocated) over the encoded frames."""
    raw = fmt.frame_bytes * len(encoded)
    return raw / max(1, sum(map(len, encoded)))


def save(ds: Dataset, target) -> None:
    """Write ``ds`` as a DICOM Part 10 file naming this implementation in its File Meta
    Information, also when it was read big-endian (pydicom's ``save_as`` refuses to change
    endianness; the private syntaxes are little-endian)."""
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ds.original_encoding[1] is False:
        if getattr(ds, "preamble", None) is None:
            ds.preamble = b"\x00" * 128
        pydicom.dcmwrite(target, ds, implicit_vr=ds.file_meta.TransferSyntaxUID.is_implicit_VR,
                         little_endian=ds.file_meta.TransferSyntaxUID.is_little_endian, force_encoding=True)
    else:
        ds.save_as(target, enforce_file_format=True)


def encoded_frames(ds: Dataset) -> list[bytes]:
    """The encapsulated frames of ``ds`` (one fragment per frame)."""
    return list(generate_frames(ds.PixelData, number_of_frames=number_of_frames(ds)))


def verify(ds: Dataset, *, device="auto", batch_size: int = codec.DEFAULT_BATCH) -> int:
    """Decode every frame of a private-syntax ``ds`` (the codec checks each against its CRC-32 and the
    model it names); the number of frames.  Raises what the codec raises for a damaged frame.  The one
    check behind ``verify``, fsck, storage commitment and a C-STORE received in a private syntax."""
    fix_transfer_syntax(ds)
    frames = encoded_frames(ds)
    codec.decode_frames(frames, PixelFormat.from_dataset(ds), device=device, batch_size=batch_size,
                        lossless_only=ds.file_meta.TransferSyntaxUID == NNCodecLossless)
    return len(frames)


def decompress(ds: Dataset, *, device="auto", batch_size: int = codec.DEFAULT_BATCH) -> Dataset:
    """Decompress a private-syntax dataset in place to Explicit VR Little Endian (UIDs kept)."""
    fix_transfer_syntax(ds)
    fmt = PixelFormat.from_dataset(ds)
    frames = codec.decode_frames(encoded_frames(ds), fmt, device=device, batch_size=batch_size,
                                 lossless_only=ds.file_meta.TransferSyntaxUID == NNCodecLossless)
    data = b"".join(f.tobytes() for f in frames)
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].is_undefined_length = False
    ds["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"
    if fmt.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds._pixel_array = None
    ds._pixel_id = {}
    return ds
