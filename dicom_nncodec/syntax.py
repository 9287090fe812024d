"""The two private transfer syntaxes, and the one place that touches pydicom's registries.

Also the JPEG XL transfer syntaxes (PS3.5 8.2.15, Supplement 232): pydicom 3.0
does not know their UIDs, so ``UID(...).is_transfer_syntax`` is False for them
and pydicom, pynetdicom and this node would refuse them.  They are public
syntaxes, so they are added to pydicom's UID dictionary (the table pydicom 3.1
ships them in) rather than registered as private ones.

UIDs are fixed forever (PS3.5 B.2, UUID-derived root).  Both are Explicit VR
Little Endian with encapsulated Pixel Data, one fragment per frame and a Basic
Offset Table.  A peer that negotiates ``NNCodecLossless`` gets exact pixels;
``NNCodecLossy`` carries near-lossless frames (every pixel within a stated maximum error).
"""
from __future__ import annotations

import pydicom.uid as _uid
from pydicom.uid import UID, register_transfer_syntax

NNCodecLossless = register_transfer_syntax(UID("2.25.224133161709364914735480850956313755172"),
                                           implicit_vr=False, little_endian=True)
NNCodecLossy = register_transfer_syntax(UID("2.25.258280948878419526347838582097179340774"),
                                        implicit_vr=False, little_endian=True)
PRIVATE_SYNTAXES = (NNCodecLossless, NNCodecLossy)

# JPEG XL (PS3.6 Table A-1): keyword -> (UID, name); pydicom 3.1's keywords
_JPEG_XL = {
    "JPEGXLLossless": ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
    "JPEGXLJPEGRecompression": ("1.2.840.10008.1.2.4.111", "JPEG XL JPEG Recompression"),
    "JPEGXL": ("1.2.840.10008.1.2.4.112", "JPEG XL"),
}
JPEGXLLossless = UID(_JPEG_XL["JPEGXLLossless"][0])
JPEGXLJPEGRecompression = UID(_JPEG_XL["JPEGXLJPEGRecompression"][0])
JPEGXL = UID(_JPEG_XL["JPEGXL"][0])
JPEG_XL_SYNTAXES = (JPEGXLLossless, JPEGXLJPEGRecompression, JPEGXL)

# Sent in A-ASSOCIATE and written to File Meta Information by this implementation.
IMPLEMENTATION_CLASS_UID = UID("2.25.164171005495589579792106225184349771088")
IMPLEMENTATION_VERSION_NAME = "DICOM_NNCODEC_1"
# Defined Term for Lossy Image Compression Method (0028,2114), declared in the conformance statement.
LOSSY_METHOD = "NNCODEC_1"          # near-lossless (max_error)
RNN_CONV_METHOD = "NNCODEC_RNN_1"   # lossy RNN-Conv at a target ratio


def install_standard_uids() -> None:
    """Make pydicom know the JPEG XL transfer syntaxes (a no-op where it already does)."""
    from pydicom._uid_dict import UID_dictionary
    for keyword, (uid, name) in _JPEG_XL.items():
        UID_dictionary.setdefault(uid, (name, "Transfer Syntax", "", "", keyword))


def by_keyword(keyword: str) -> UID | None:
    """A transfer syntax by its pydicom keyword, also those pydicom 3.0 lacks (JPEG XL)."""
    if keyword in _JPEG_XL:
        return UID(_JPEG_XL[keyword][0])
    uid = getattr(_uid, keyword, None)
    return uid if isinstance(uid, UID) else None


def registered(uid) -> UID | None:
    """The registered UID object equal to ``uid`` (carrying its encoding), or None."""
    for ts in PRIVATE_SYNTAXES:
        if uid == ts:
            return ts
    return None


def fix_transfer_syntax(ds):
    """Re-attach the registered UID object to ``ds.file_meta``.

    A UID read from a file or a network PDU is a new UID object without the
    private encoding, so pydicom reports it as "not a transfer syntax" in
    ``decompress()``, ``save_as()`` and pynetdicom's ``send_c_store``."""
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "TransferSyntaxUID" in fm:
        ts = registered(fm.TransferSyntaxUID)
        if ts is not None:
            fm.TransferSyntaxUID = ts
    return ds


def fix_association(assoc_or_event):
    """pynetdicom: re-attach the encoding to accepted contexts that use a private syntax.

    Usable directly as an ``evt.EVT_ACCEPTED`` handler, or called with an association."""
    assoc = getattr(assoc_or_event, "assoc", assoc_or_event)
    for cx in assoc.accepted_contexts:
        if cx.transfer_syntax:
            ts = registered(cx.transfer_syntax[0])
            if ts is not None:
                cx.transfer_syntax = [ts]


def install_uid_hook() -> None:
    """Make every ``UID`` equal to one of our syntaxes carry its encoding.

    This covers UIDs created anywhere (dcmread, pynetdicom PDUs, user code), so
    ``pixel_array(path)``, ``iter_pixels(path)``, ``decompress()`` and
    ``send_c_store`` work without the caller knowing about private syntaxes."""
    if getattr(_uid.UID.__new__, "_nncodec", False):
        return
    original = _uid.UID.__new__

    def __new__(cls, val, validation_mode=None):
        uid = original(cls, val, validation_mode)
        if not hasattr(uid, "_PRIVATE_TS_ENCODING"):
            for ts in PRIVATE_SYNTAXES:
                if str.__eq__(uid, ts):
                    uid._PRIVATE_TS_ENCODING = ts._PRIVATE_TS_ENCODING
                    break
        return uid

    __new__._nncodec = True
    _uid.UID.__new__ = __new__
