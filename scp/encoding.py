"""A strict reader and writer of the DICOM data set encoding (PS3.5 7): the node's own account of
which elements a data set holds, independent of pydicom.

Why a second reader: pydicom reads leniently, which is right for a viewer and wrong for a node
that acknowledges what it receives.  It reads implicit-VR bytes sent on an explicit-VR context
as implicit (with a warning), takes a VR of NUL bytes as "unknown", keeps the last of two
elements with the same tag, and its writer silently drops group 0002 elements found inside a
data set and turns a value too long for a 16-bit length into UN.  Each of these was acknowledged
and then returned changed.  This module parses exactly what PS3.5 allows (known VRs, lengths
inside their container, tags ascending, sequences and items delimited) and says precisely where
it does not, so that :mod:`scp.roundtrip` can compare what arrived with what the node would send.

It also converts Explicit VR Big Endian to Little Endian (:func:`to_little_endian`), because
pydicom's writer converts numbers (US, SL, FD, ...) but leaves OW/OL/OF/OD/OV values and Pixel
Data in their big-endian byte order.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from pydicom.datadict import dictionary_VR

LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
SHORT_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                       "SL", "SS", "ST", "TM", "UI", "UL", "US"})
VRS = LONG_VRS | SHORT_VRS
# bytes per number for the VRs whose values depend on the byte order (AT: two 16-bit halves)
WORD = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4,
        "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
BITS_ALLOCATED = 0x00280100
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 32          # nested sequences; deeper is refused rather than recursed into


class Malformed(ValueError):
    """The bytes are not a data set in the transfer syntax they were sent in; the message says where."""


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass
class Element:
    tag: int
    vr: str | None                      # None: implicit VR
    value: bytes | memoryview | list    # bytes; a sequence: list of Item; encapsulated Pixel Data: list of bytes
    undefined: bool = False             # encoded with undefined length
    kind: str = "value"                 # "value", "sequence" or "fragments"


@dataclass
class Item:
    elements: list[Element] = field(default_factory=list)
    undefined: bool = False


def is_group_length(tag: int) -> bool:
    """Group Length elements of the data set (retired, PS3.5 7.2); pydicom does not write them."""
    return tag & 0xFFFF == 0 and tag >> 16 > 6


class _Reader:
    def __init__(self, data, little: bool):
        self.data = memoryview(data).cast("B")
        self.little = little
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<L" if little else ">L")

    def need(self, pos: int, n: int, end: int, what: str) -> None:
        if pos + n > end:
            raise Malformed(f"{what} at byte {pos} runs past the end of its container (byte {end})")

    def tag(self, pos: int, end: int) -> int:
        self.need(pos, 4, end, "a tag")
        return (self.u16.unpack_from(self.data, pos)[0] << 16) | self.u16.unpack_from(self.data, pos + 2)[0]

    def dataset(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> tuple[list[Element], int]:
        """Elements from ``pos`` up to ``end`` (or an Item Delimitation Item when ``in_item`` and undefined)."""
        if depth > MAX_DEPTH:
            raise Malformed(f"sequences nested more than {MAX_DEPTH} deep")
        out: list[Element] = []
        last = -1
        while pos < end:
            tag = self.tag(pos, end)
            if tag == ITEM_END and in_item:
                return out, pos + 8
            if tag >> 16 == 0xFFFE:
                raise Malformed(f"delimiter {tag_text(tag)} at byte {pos} where an element was expected")
            if tag <= last:
                raise Malformed(f"element {tag_text(tag)} at byte {pos} " +
                                ("repeats a tag" if tag == last else f"follows {tag_text(last)}: tags must ascend"))
            last = tag
            elem, pos = self.element(tag, pos, end, implicit, depth)
            out.append(elem)
        if in_item:
            raise Malformed("an item of undefined length has no Item Delimitation Item")
        return out, pos

    def element(self, tag: int, pos: int, end: int, implicit: bool, depth: int) -> tuple[Element, int]:
        if implicit:
            self.need(pos, 8, end, f"element {tag_text(tag)}")
            vr, length, start = None, self.u32.unpack_from(self.data, pos + 4)[0], pos + 8
        else:
            self.need(pos, 8, end, f"element {tag_text(tag)}")
            raw = bytes(self.data[pos + 4:pos + 6])
            vr = raw.decode("latin-1")
            if vr not in VRS:
                raise Malformed(f"element {tag_text(tag)} at byte {pos} has no valid VR ({raw!r}): "
                                "not Explicit VR encoding")
            if vr in LONG_VRS:
                self.need(pos, 12, end, f"element {tag_text(tag)}")
                length, start = self.u32.unpack_from(self.data, pos + 8)[0], pos + 12
            else:
                length, start = self.u16.unpack_from(self.data, pos + 6)[0], pos + 8
        if length == UNDEFINED:
            if tag == PIXEL_DATA:
                fragments, pos = self.fragments(start, end)
                return Element(tag, vr, fragments, True, "fragments"), pos
            if vr not in (None, "SQ", "UN"):
                raise Malformed(f"element {tag_text(tag)} has undefined length with VR {vr}")
            items, pos = self.items(start, end, implicit or vr == "UN", depth, None)
            return Element(tag, vr, items, True, "sequence"), pos
        self.need(start, length, end, f"the value of {tag_text(tag)} ({length} bytes)")
        if vr == "SQ" or (vr is None and tag != PIXEL_DATA and _dictionary_vr(tag) == "SQ"):
            items, _ = self.items(start, start + length, implicit, depth, start + length)
            return Element(tag, vr, items, False, "sequence"), start + length
        return Element(tag, vr, self.data[start:start + length]), start + length

    def items(self, pos: int, end: int, implicit: bool, depth: int, stop: int | None) -> tuple[list[Item], int]:
        out: list[Item] = []
        while True:
            if stop is not None and pos >= stop:
                return out, pos
            tag = self.tag(pos, end)
            self.need(pos, 8, end, "an item")
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            if tag == SEQUENCE_END and stop is None:
                return out, pos + 8
            if tag != ITEM:
                raise Malformed(f"{tag_text(tag)} at byte {pos} where a sequence item was expected")
            if length == UNDEFINED:
                elements, pos = self.dataset(pos + 8, end, implicit, depth + 1, True)
                out.append(Item(elements, True))
                continue
            self.need(pos + 8, length, end, "a sequence item")
            elements, _ = self.dataset(pos + 8, pos + 8 + length, implicit, depth + 1, False)
            out.append(Item(elements, False))
            pos += 8 + length

    def fragments(self, pos: int, end: int) -> tuple[list, int]:
        out = []
        while True:
            tag = self.tag(pos, end)
            self.need(pos, 8, end, "a Pixel Data item")
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            if tag == SEQUENCE_END:
                return out, pos + 8
            if tag != ITEM or length == UNDEFINED:
                raise Malformed(f"{tag_text(tag)} at byte {pos} in encapsulated Pixel Data where a fragment "
                                "was expected")
            self.need(pos + 8, length, end, "a Pixel Data fragment")
            out.append(self.data[pos + 8:pos + 8 + length])
            pos += 8 + length


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def parse(data, implicit: bool, little: bool = True) -> list[Element]:
    """The elements of an encoded data set, strictly (raises :class:`Malformed`).  Values are views
    into ``data``, not copies."""
    r = _Reader(data, little)
    try:
        elements, _ = r.dataset(0, len(r.data), implicit, 0, False)
    except struct.error as exc:              # (need() is checked first; kept as a guard)
        raise Malformed(str(exc)) from None
    return elements


# --- writing ------------------------------------------------------------------------------------------

def write(elements: list[Element], implicit: bool, little: bool = True) -> bytes:
    """The encoding of ``elements`` (the lengths are recomputed; undefined lengths kept)."""
    out = bytearray()
    _write(out, elements, implicit, little)
    return bytes(out)


def _write(out: bytearray, elements: list[Element], implicit: bool, little: bool) -> None:
    e = "<" if little else ">"
    for el in elements:
        out += struct.pack(e + "HH", el.tag >> 16, el.tag & 0xFFFF)
        if el.kind == "value":
            body = bytes(el.value)
        else:
            buf = bytearray()
            if el.kind == "fragments":
                for frag in el.value:
                    buf += struct.pack(e + "HHL", 0xFFFE, 0xE000, len(frag)) + bytes(frag)
            else:
                for item in el.value:
                    inner = bytearray()
                    _write(inner, item.elements, implicit or el.vr == "UN", little)
                    if item.undefined:
                        buf += struct.pack(e + "HHL", 0xFFFE, 0xE000, UNDEFINED) + inner
                        buf += struct.pack(e + "HHL", 0xFFFE, 0xE00D, 0)
                    else:
                        buf += struct.pack(e + "HHL", 0xFFFE, 0xE000, len(inner)) + inner
            if el.undefined:
                buf += struct.pack(e + "HHL", 0xFFFE, 0xE0DD, 0)
            body = bytes(buf)
        length = UNDEFINED if el.undefined else len(body)
        if implicit:
            out += struct.pack(e + "L", length)
        elif el.vr in LONG_VRS:
            out += el.vr.encode() + b"\x00\x00" + struct.pack(e + "L", length)
        else:
            if length > 0xFFFF:
                raise Malformed(f"the value of {tag_text(el.tag)} ({length} bytes) is too long for VR {el.vr}")
            out += el.vr.encode() + struct.pack(e + "H", length)
        out += body


# --- big endian to little endian ---------------------------------------------------------------------

def to_little_endian(elements: list[Element], top: bool = True) -> list[Element]:
    """Explicit VR Big Endian elements with every multi-byte number in little-endian order.

    Numbers swap by their VR's width (US/SS/OW/AT by 2, UL/SL/FL/OF/OL by 4, FD/OD/SV/UV/OV by 8),
    in nested sequences too; OB, UN and text stay as they are.  Native Pixel Data swaps by Bits
    Allocated (one sample of 16, 32 or 64 bits is big-endian as a whole, as pydicom reads it);
    encapsulated Pixel Data is not defined for big endian and raises :class:`Malformed`."""
    bits = 0
    if top:
        for el in elements:
            if el.tag == BITS_ALLOCATED and el.kind == "value" and len(el.value) == 2:
                bits = struct.unpack(">H", el.value)[0]
    out = []
    for el in elements:
        if el.vr is None:
            raise Malformed("implicit VR elements cannot be converted from big endian")
        if el.kind == "fragments":
            raise Malformed("encapsulated Pixel Data in Explicit VR Big Endian")
        if el.kind == "sequence":
            if el.vr == "UN":           # its items are implicit VR little endian already (PS3.5 6.2.2)
                out.append(el)
                continue
            items = [Item(to_little_endian(i.elements, False), i.undefined) for i in el.value]
            out.append(Element(el.tag, el.vr, items, el.undefined, el.kind))
            continue
        width = WORD.get(el.vr, 1)
        if top and el.tag == PIXEL_DATA:
            width = bits // 8 if bits in (16, 32, 64) else 1
        out.append(Element(el.tag, el.vr, swapped(el.value, width, el.tag, el.vr), el.undefined))
    return out


def swapped(value, width: int, tag: int = 0, vr: str | None = None) -> bytes:
    data = bytes(value)
    if width == 1 or not data:
        return data
    whole = len(data) - len(data) % width
    if whole != len(data) and not (tag == PIXEL_DATA and len(data) - whole == 1):
        raise Malformed(f"the {vr} value of {tag_text(tag)} holds {len(data)} bytes, not a whole number of "
                        f"{width}-byte numbers")
    arr = np.frombuffer(data, dtype=f">u{width}", count=whole // width)
    return arr.astype(f"<u{width}").tobytes() + data[whole:]
