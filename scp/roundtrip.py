"""Acknowledge only what can be returned: the received data set against what the node would send.

Why: a C-STORE answered Success is a promise that the instance can be retrieved as it was sent.
The node stores the received bytes as they are, but it never sends a file's bytes: retrieval
reads the file with pydicom and pynetdicom encodes that dataset again, in the stored syntax or in
another one the receiver accepted (Explicit and Implicit VR Little Endian always; Explicit VR
Big Endian is converted to little endian).  Whatever pydicom reads leniently or writes
differently (a VR of NUL bytes, implicit-VR bytes on an explicit-VR context, group 0002
elements inside the data set, a value too long for a 16-bit length, tags out of order or
repeated) would come back changed or not at all.  So before the sender is told Success, the
staged file is read as retrieval reads it, encoded as retrieval encodes it, once per syntax
retrieval can send it in, and compared element by element (tag, VR, value bytes, in nested
sequences too) with the received bytes as :mod:`scp.encoding` parses them strictly.  A
difference is a refusal (0xC000) that names the element.

What may differ (PS3.5 7.2, 6.2.2): retired Group Length elements (gggg,0000) are not sent
again; lengths may change between defined and undefined; an implicit-VR receiver gets no VRs.
Pixel Data is checked by :mod:`scp.checks` (and the private syntaxes decoded, below); its value
is written by pydicom as stored, so the comparison leaves it out and keeps the check cheap.
"""
from __future__ import annotations

import zlib

import pydicom.uid as U
from pydicom import dcmread

import dicom_nncodec

from . import encoding as E
from .checks import CANNOT_UNDERSTAND, DEFER, StoreRefused
from .transcode import little_endian, served


def received_elements(data, transfer_syntax) -> list[E.Element]:
    """The received data set parsed strictly in its presentation context's syntax (raises StoreRefused)."""
    ts = dicom_nncodec.syntax.registered(transfer_syntax) or U.UID(str(transfer_syntax))
    if ts == U.DeflatedExplicitVRLittleEndian:
        try:
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            data = d.decompress(bytes(data)) + d.flush()
            if not d.eof:
                raise zlib.error("the deflate stream ends early")
        except zlib.error as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, f"the deflated data set is damaged: {exc}") from None
    implicit = ts.is_implicit_VR if ts.is_transfer_syntax else False
    little = ts.is_little_endian if ts.is_transfer_syntax else True
    try:
        elements = E.parse(data, implicit, little)
    except E.Malformed as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"the data set is not valid {ts.name}: {exc}") from None
    for el in elements:
        if el.tag >> 16 == 0x0002:
            raise StoreRefused(CANNOT_UNDERSTAND, f"element {E.tag_text(el.tag)} of group 0002 inside the data set "
                                                  "(File Meta Information is not part of a data set, PS3.7 6.3.1)")
    return elements


def check(path: str, transfer_syntax, received) -> None:
    """Raise StoreRefused (0xC000) unless the staged file at ``path`` is sent back, in every syntax
    retrieval can offer for it, with the elements of ``received`` (the data set as it arrived)."""
    got = received_elements(received, transfer_syntax)
    ts = dicom_nncodec.syntax.registered(transfer_syntax) or U.UID(str(transfer_syntax))
    big = ts == U.ExplicitVRBigEndian
    try:
        ds = dcmread(path, defer_size=DEFER)
        if E.PIXEL_DATA in ds:
            del ds[E.PIXEL_DATA]
        if big:
            targets = [("Explicit VR Big Endian", ds, False, False, got)]
            expected_le = E.to_little_endian(got)
            le = little_endian(ds)
        else:
            expected_le, le, targets = got, ds, []
        targets += [("Explicit VR Little Endian", le, False, True, expected_le),
                    ("Implicit VR Little Endian", le, True, True, expected_le)]
        for name, source, implicit, little, expected in targets:
            try:
                back = E.parse(served(source, implicit, little), implicit, little)
            except Exception as exc:
                raise StoreRefused(CANNOT_UNDERSTAND, f"the data set cannot be sent in {name}: "
                                                      f"{type(exc).__name__}: {exc}") from None
            why = difference(expected, back, top=True)
            if why:
                raise StoreRefused(CANNOT_UNDERSTAND, f"the data set would not be returned as received in {name}: "
                                                      f"{why}")
    except E.Malformed as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"the data set cannot be returned as received: {exc}") from None


def _kept(elements: list[E.Element], top: bool) -> list[E.Element]:
    return [el for el in elements if not E.is_group_length(el.tag) and not (top and el.tag == E.PIXEL_DATA)]


def difference(sent: list[E.Element], back: list[E.Element], top: bool = False, where: str = "") -> str:
    """The first way ``back`` (what would be returned) differs from ``sent``; "" when it does not."""
    sent, back = _kept(sent, top), _kept(back, top)
    for i in range(max(len(sent), len(back))):
        a = sent[i] if i < len(sent) else None
        b = back[i] if i < len(back) else None
        if a is None or b is None or a.tag != b.tag:
            if b is None or (a is not None and a.tag < b.tag):
                return f"{where}{E.tag_text(a.tag)} would not be returned"
            return f"{where}{E.tag_text(b.tag)} would be returned but was not sent"
        name = f"{where}{E.tag_text(a.tag)}"
        if b.vr is not None and (b.vr != a.vr if a.vr is not None else not _vr_allowed(a.tag, b.vr)):
            return f"{name} would be returned with VR {b.vr} instead of {a.vr or E._dictionary_vr(a.tag)}"
        if a.kind != b.kind:
            return f"{name} would be returned as a {b.kind}, it was sent as a {a.kind}"
        if a.kind == "sequence":
            if len(a.value) != len(b.value):
                return f"{name} would be returned with {len(b.value)} items instead of {len(a.value)}"
            for n, (x, y) in enumerate(zip(a.value, b.value)):
                why = difference(x.elements, y.elements, False, f"{name} item {n + 1} > ")
                if why:
                    return why
        elif a.kind == "fragments":
            if [bytes(f) for f in a.value] != [bytes(f) for f in b.value]:
                return f"{name} fragments would be returned changed"
        elif a.value != b.value:
            return f"{name} would be returned changed ({len(a.value)} bytes sent, {len(b.value)} returned)"
    return ""


def _vr_allowed(tag: int, vr: str) -> bool:
    """An implicit-VR element returned in explicit VR: the dictionary's VR (any of an ambiguous one);
    for a tag the dictionary does not know, any VR (pydicom writes UN or its private dictionary's)."""
    known = E._dictionary_vr(tag)
    if known is None:
        return True
    return vr in known.split(" or ")
