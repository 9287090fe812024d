"""Choosing the transfer syntax an instance is sent in, and producing it.

Why: pynetdicom never transcodes pixel data, and a peer that does not know
the private syntaxes must still get every stored instance.  The rule
(PS3.2's "SUPPORTED" transcoding: same SOP Instance UID): a receiver that
accepted the stored syntax gets the stored encoding as it is; otherwise the
pixels are decoded and re-encoded in the first syntax of the configured
preference that it accepted.  Every target here is lossless, so a receiver
gets exactly the stored pixels.  An instance whose native Pixel Data holds
more bytes than its description goes only to a receiver that accepted an
uncompressed syntax of its byte order, exactly as stored (decoding would drop
the surplus).  Explicit VR Big Endian goes to a little-endian receiver with every value converted
(:func:`little_endian`), header and nested sequences included, not only the pixels.
"""
from __future__ import annotations

import copy
import logging
import threading
import warnings
from io import BytesIO
from typing import Iterable

import pydicom.uid as U
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

import dicom_nncodec
from dicom_nncodec import NNCodecLossless, NNCodecLossy
from dicom_nncodec.syntax import JPEGXL, JPEGXLJPEGRecompression, JPEGXLLossless

from . import checks, encoding, isolation

log = logging.getLogger("scp.transcode")

UNCOMPRESSED_LE = frozenset({U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian})
# (JPEG XL and HTJ2K through dicom_nncodec's imagecodecs plugin for pydicom)
ENCODED_BY_PYDICOM = frozenset({U.JPEGLSLossless, U.JPEG2000Lossless, U.RLELossless, JPEGXLLossless,
                                U.HTJ2KLossless})
# What this node can make from any stored instance it can decode.
PRODUCIBLE = frozenset({NNCodecLossless}) | ENCODED_BY_PYDICOM | UNCOMPRESSED_LE

# What the Storage SCP accepts, best first: the acceptor picks the first of these
# that the sender proposed.  Lossless before lossy; compressed before uncompressed.
ACCEPTED_FOR_STORAGE = (
    NNCodecLossless, NNCodecLossy,
    JPEGXLLossless, U.JPEGLSLossless, U.JPEG2000Lossless, U.HTJ2KLossless, U.HTJ2KLosslessRPCL, U.RLELossless,
    U.JPEGLosslessSV1, U.JPEGLossless,
    U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian, U.ExplicitVRBigEndian,
    U.JPEGLSNearLossless, U.JPEG2000, U.HTJ2K, JPEGXL, JPEGXLJPEGRecompression, U.JPEGBaseline8Bit,
    U.JPEGExtended12Bit,
)


class TranscodeError(Exception):
    """No accepted transfer syntax could be produced; the message says why."""


def syntax(uid) -> UID:
    """The UID object that carries its encoding (registered private syntaxes included)."""
    return dicom_nncodec.syntax.registered(uid) or UID(str(uid))


def storage_syntaxes(preference: Iterable[UID]) -> list[UID]:
    """The Storage SCP's list: the private ones, then the compressed syntaxes of the retrieve
    preference (the same contexts carry C-GET sub-operations, so a C-GET requestor proposing
    several gets the preferred one), then the rest in the order above: a sender offering RLE
    and Explicit VR sends RLE rather than decompressing for us."""
    out: list[UID] = [NNCodecLossless, NNCodecLossy]
    for uid in [p for p in preference if p.is_compressed] + list(ACCEPTED_FOR_STORAGE):
        if uid in ACCEPTED_FOR_STORAGE and uid not in out:
            out.append(uid)
    return out


def get_syntaxes(preference: Iterable[UID]) -> list[UID]:
    """The storage contexts' order on an association that asks for C-GET: what this node can
    produce, by preference, first (the acceptor picks one syntax per context, and a C-GET
    requestor receives everything on those contexts), then the rest of the storage list."""
    first = [p for p in preference if p in PRODUCIBLE]
    return first + [u for u in storage_syntaxes(preference) if u not in first]


def proposals(stored: Iterable[str], preference: Iterable[UID]) -> list[UID]:
    """The transfer syntaxes to propose for one SOP class on a C-MOVE sub-association: stored
    syntaxes not in the preference first (sent as they are), then the preference, with
    Implicit VR Little Endian always present (PS3.5 10.1)."""
    stored = [syntax(s) for s in dict.fromkeys(stored)]
    pref = [p for p in preference if p in PRODUCIBLE or p in stored]
    out = [s for s in stored if s not in pref] + pref
    if U.ImplicitVRLittleEndian not in out:
        out.append(U.ImplicitVRLittleEndian)
    return out


def candidates(stored: str, accepted: set, preference: Iterable[UID]) -> list[UID]:
    """Targets to try, in order: the stored syntax if accepted (also an uncompressed one that
    pynetdicom converts itself), then each accepted producible syntax of the preference, then any
    accepted uncompressed little-endian syntax the preference leaves out."""
    stored = syntax(stored)
    out: list[UID] = []
    if stored in accepted:
        out.append(stored)
    elif stored in UNCOMPRESSED_LE and accepted & UNCOMPRESSED_LE:
        out.append(stored)
    for p in preference:
        if p in accepted and p in PRODUCIBLE and p not in out:
            out.append(p)
    for p in (U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian, U.DeflatedExplicitVRLittleEndian):
        if p in accepted and p not in out:      # always producible: a receiver of only Deflated still gets it
            out.append(p)
    return out


def decoded(ds: Dataset, device: str = "auto", batch_size: int = 8) -> Dataset:
    """``ds`` (modified in place) with native little-endian pixel data, SOP Instance UID kept."""
    dicom_nncodec.fix_transfer_syntax(ds)
    ts = syntax(ds.file_meta.TransferSyntaxUID)
    if dicom_nncodec.syntax.registered(ts) is not None:
        return dicom_nncodec.decompress(ds, device=device, batch_size=batch_size)
    if ts == U.ExplicitVRBigEndian:
        return little_endian(ds)
    if ts.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


def served(ds: Dataset, implicit: bool, little: bool = True) -> bytes:
    """``ds`` encoded as pynetdicom encodes a C-STORE data set (``pynetdicom.dsutils.encode``), but
    raising what pydicom raises instead of logging it."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # (what would change is found by scp.roundtrip, not by a warning)
        write_dataset(fp, ds)
    return fp.parent.getvalue()


def little_endian(ds: Dataset) -> Dataset:
    """A copy of the Explicit VR Big Endian ``ds`` in Explicit VR Little Endian, every value converted.

    Why not pydicom's writer: it converts numbers (US, SL, FD, AT ...) but writes OW/OL/OF/OD/OV
    values and Pixel Data in their big-endian byte order; :func:`scp.encoding.to_little_endian`
    swaps each value by its VR (Pixel Data by Bits Allocated), in nested sequences too.  With or
    without Pixel Data; raises :class:`scp.encoding.Malformed` for what cannot be converted."""
    elements = encoding.to_little_endian(encoding.parse(served(ds, False, False), False, False))
    out = read_dataset(BytesIO(encoding.write(elements, False, True)), False, True)
    out.file_meta = copy.deepcopy(ds.file_meta)
    out.file_meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
    for name in ("preamble", "filename"):
        if getattr(ds, name, None) is not None:
            setattr(out, name, getattr(ds, name))
    return out


# pydicom's JPEG 2000 encoder (pylibjpeg-openjpeg) crashes the process when two threads encode at once
# (retrieval transcodes several instances in parallel); its calls take turns.  The other encoders and
# every decoder used here were run two threads at a time without harm.
_NOT_THREAD_SAFE = {U.JPEG2000Lossless: threading.Lock()}


def encode_as(native: Dataset, target: UID, device: str = "auto", batch_size: int = 8) -> Dataset:
    """A copy of the natively encoded ``native`` in ``target`` (lossless; same SOP Instance UID)."""
    out = copy.deepcopy(native)
    if target in UNCOMPRESSED_LE:
        # stays Explicit VR LE: pynetdicom converts to Implicit/Deflated when it encodes
        # (relabelling the file meta would make send_c_store refuse the dataset)
        return out
    if target == NNCodecLossless:
        return dicom_nncodec.compress(out, NNCodecLossless, device=device, batch_size=batch_size)
    if target in ENCODED_BY_PYDICOM:
        if target == U.JPEG2000Lossless and out.get("SamplesPerPixel", 1) == 3 \
                and out.get("PhotometricInterpretation") == "RGB":
            # PS3.5 8.2.4: RGB in JPEG 2000 Lossless is sent with the reversible colour transform,
            # labelled YBR_RCT (what IODs such as US require); pydicom applies the transform
            out.PhotometricInterpretation = "YBR_RCT"
        lock = _NOT_THREAD_SAFE.get(target)
        if lock is None:
            out.compress(target, generate_instance_uid=False)
        else:
            with lock:
                out.compress(target, generate_instance_uid=False)
        return out
    raise TranscodeError(f"cannot produce {target.name}")


def for_receiver(ds: Dataset, accepted: set, preference: Iterable[UID], device: str = "auto",
                 batch_size: int = 8) -> Dataset:
    """``ds`` as read from storage, in the best syntax the receiver accepted."""
    dicom_nncodec.fix_transfer_syntax(ds)
    stored = syntax(ds.file_meta.TransferSyntaxUID)
    targets = candidates(stored, accepted, preference)
    if not targets:
        names = ", ".join(sorted(UID(str(a)).name for a in accepted)) or "nothing"
        raise TranscodeError(f"the receiver accepted {names} for this SOP class; none can be produced")
    if targets[0] == stored:
        return ds
    try:
        surplus = checks.pixel_surplus(ds, stored)
    except checks.StoreRefused as exc:
        raise TranscodeError(f"the stored pixel description cannot be read: {exc}") from None
    if surplus:          # decoding would drop the bytes beyond the description
        raise TranscodeError(f"{checks.surplus_reason(surplus)}; the receiver did not accept "
                             f"{stored.name}")
    try:
        with isolation.contained(f"decoding stored {stored.name} pixel data"):
            native = decoded(ds, device, batch_size)
    except Exception as exc:
        raise TranscodeError(f"cannot decode the stored {stored.name} pixel data: {exc}") from exc
    reasons = []
    for target in targets:
        if target == stored:
            continue
        try:
            with isolation.contained(f"encoding in {target.name}"):
                return encode_as(native, target, device, batch_size)
        except Exception as exc:   # an encoder that cannot take this image: try the next target
            reasons.append(f"{target.name}: {exc}")
    raise TranscodeError("; ".join(reasons))
