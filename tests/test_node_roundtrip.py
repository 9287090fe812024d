"""Acknowledge only what can be returned (issue 14): every data set answered 0x0000 comes back through
C-GET as it was sent, and one that would not is refused.

- Data sets that pydicom reads leniently or writes differently are refused with 0xC000 and a log line
  naming the element: group 0002 elements inside the data set, implicit-VR bytes on an explicit-VR
  context, a VR of NUL bytes, tags repeated or out of order, damaged deflated data, a 70,000-character
  Patient Name that Explicit VR cannot carry.
- What is accepted (pydicom's test files in each syntax, a Patient Name longer than its VR allows)
  comes back byte for byte in its own syntax, and with the same elements in the other one.
- Private-syntax data sets are decoded once before they are acknowledged: a wrong pixel CRC, a
  damaged payload (with a valid frame CRC) or an unknown model is refused.
- Explicit VR Big Endian instances reach a little-endian-only receiver with every value converted,
  with and without Pixel Data, 8 to 32 bits, in nested sequences, compressed or not.
"""
from __future__ import annotations

import dataclasses
import logging
import struct
import zlib

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, generate_uid)
from pynetdicom.sop_class import SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelGet as GET

import dicom_nncodec
from dicom_nncodec import bitstream as B
from dicom_nncodec.dataset import encoded_frames
from scp import encoding, roundtrip
from scp.index import NOT_IMAGE
from scp.testing import encoded, get, running_node, send, store_bytes
from scp.transcode import served
from tests.imaging import make_dataset, smooth_image

OK, C000 = 0x0000, 0xC000
PEERS = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]
LITTLE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def image(seed=0, rows=16, cols=16) -> Dataset:
    ds = make_dataset(smooth_image(rows, cols, 12, seed=seed)[None], 16, 12)
    ds.PatientID, ds.PatientName = "ROUNDTRIP", "Round^Trip"
    return ds


def study(uid) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    return ds


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, VR as given (however wrong)."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def with_element_at_front(data: bytes, extra: bytes) -> bytes:
    return extra + data


def hostile_cases():
    def long_name():
        ds = image(20)
        ds.PatientName = "A" * 70000
        return ImplicitVRLittleEndian, encoded(ds, implicit=True), ds, "with VR UN instead of PN"

    def group2():
        ds = image(21)
        return (ExplicitVRLittleEndian,
                element(0x00020010, b"UI", b"1.2.840.10008.1.2.1\x00") + encoded(ds), ds, "group 0002 inside")

    def implicit_on_explicit():
        ds = image(22)
        return ExplicitVRLittleEndian, encoded(ds, implicit=True), ds, "no valid VR"

    def nul_vr():
        ds = image(23)
        data = encoded(ds)
        cut = data.index(struct.pack("<HH", 0x0010, 0x0020))        # before Patient ID
        return (ExplicitVRLittleEndian, data[:cut] + element(0x00101010, b"\x00\x00", b"030Y") + data[cut:],
                ds, "(0010,1010)")

    def repeated():
        ds = image(24)
        data = encoded(ds)
        cut = data.index(struct.pack("<HH", 0x0010, 0x0020))
        return (ExplicitVRLittleEndian, data[:cut] + element(0x00100010, b"PN", b"B^A ") + data[cut:], ds,
                "repeats a tag")

    def out_of_order():
        ds = image(25)
        return ExplicitVRLittleEndian, encoded(ds) + element(0x00080020, b"DA", b"20240101"), ds, "tags must ascend"

    def deflated_damaged_stream():
        ds = image(26)
        data = bytearray(deflate(encoded(ds)))
        data[0] ^= 0xFF
        return DeflatedExplicitVRLittleEndian, bytes(data), ds, ""

    def deflated_damaged_header():
        ds = image(27)
        return (DeflatedExplicitVRLittleEndian, deflate(b"\x08\x00\x05\x00CS\xff\x7f" + encoded(ds)), ds, "")

    return {f.__name__: f for f in (long_name, group2, implicit_on_explicit, nul_vr, repeated, out_of_order,
                                     deflated_damaged_stream, deflated_damaged_header)}


CASES = hostile_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_data_set_that_would_not_come_back_as_sent_is_refused(tmp_path, case, caplog):
    caplog.set_level(logging.INFO, "scp")
    ts, data, ds, why = CASES[case]()
    good = image(99)
    with running_node(tmp_path / "s", compression={"workers": 0}) as node:
        statuses = store_bytes(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID, ts, data),
                                        (good.SOPClassUID, good.SOPInstanceUID, ExplicitVRLittleEndian,
                                         encoded(good))])
        assert statuses == [C000, OK]                 # refused, and the association goes on
        assert node.index.stats()["instances"] == 1
        assert not node.storage.files("tmp")
    refusals = [r.getMessage() for r in caplog.records if "refused (0xC000)" in r.getMessage()]
    assert len(refusals) == 1 and ds.SOPInstanceUID in refusals[0] and why in refusals[0], refusals


def raw_data_set(path) -> tuple[str, bytes, Dataset]:
    """A test file's data set as its bytes in its own syntax (pydicom writes unchanged values back as read)."""
    ds = dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    if ts == DeflatedExplicitVRLittleEndian:
        return ts, deflate(served(ds, False, True)), ds
    return ts, served(ds, ts.is_implicit_VR, ts.is_little_endian), ds


def inflated(ts, data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS) if ts == DeflatedExplicitVRLittleEndian else data


def long_name_image() -> tuple[str, bytes, Dataset]:
    """A Patient Name of 100 characters (PN allows 64 per component group): returned exactly as received."""
    ds = image(30)
    ds.PatientName = "N" * 100
    return ExplicitVRLittleEndian, encoded(ds), ds


@pytest.mark.parametrize("source", ["CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "image_dfl.dcm",
                                    "MR_small_bigendian.dcm", "long name"])
def test_an_acknowledged_data_set_comes_back_bit_exact(tmp_path, source):
    ts, data, ds = long_name_image() if source == "long name" else raw_data_set(get_testdata_file(source))
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 0}) as node:
        assert store_bytes(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID, ts, data)]) == [OK]
        final, back = get(node.port, study(ds.StudyInstanceUID), GET, [ds.SOPClassUID], [ts], raw=True)
        assert final.Status == OK and len(back) == 1 and back[0][0] == ts
        assert inflated(ts, back[0][1]) == inflated(ts, data)            # the bytes as sent
        if ts != ExplicitVRBigEndian:        # and the same elements in the other little-endian syntax
            other = ImplicitVRLittleEndian if not ts.is_implicit_VR else ExplicitVRLittleEndian
            final, back = get(node.port, study(ds.StudyInstanceUID), GET, [ds.SOPClassUID], [other], raw=True)
            assert final.Status == OK and back[0][0] == other
            sent = encoding.parse(inflated(ts, data), ts.is_implicit_VR)
            assert roundtrip.difference(sent, encoding.parse(back[0][1], other.is_implicit_VR)) == ""


# --- private syntaxes: decoded before they are acknowledged ----------------------------------------------

def private_image(seed: int) -> Dataset:
    ds = image(seed)
    dicom_nncodec.compress(ds, device="cpu")
    return ds


def resealed(ds: Dataset, change) -> Dataset:
    """``ds`` with its first frame changed by ``change(header, payloads)`` and sealed again with a valid
    frame CRC-32 (so only decoding can find what is wrong)."""
    frames = encoded_frames(ds)
    h, payloads = B.unpack(frames[0])
    h, payloads = change(h, [bytearray(p) for p in payloads])
    frames[0] = B.pack(h, [bytes(p) for p in payloads])
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    return ds


def flip_payload(h, payloads):
    payloads[0][len(payloads[0]) // 2] ^= 0x5A
    return h, payloads


DAMAGE = {
    "wrong pixel CRC": lambda h, p: (dataclasses.replace(h, pixel_crc=h.pixel_crc ^ 1), p),
    "damaged payload": flip_payload,
    "unknown model": lambda h, p: (dataclasses.replace(h, model_id="no-such-model-9"), p),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_private_syntax_instance_that_does_not_decode_is_refused(tmp_path, damage, caplog):
    caplog.set_level(logging.INFO, "scp")
    bad, good = resealed(private_image(40), DAMAGE[damage]), private_image(41)
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": 0}) as node:
        assert send(node.port, [bad, good]) == [C000, OK]
        assert node.index.stats()["instances"] == 1
        final, back = get(node.port, study(good.StudyInstanceUID), GET, [SecondaryCaptureImageStorage],
                          [dicom_nncodec.NNCodecLossless], raw=True)
        assert final.Status == OK and [ts for ts, _ in back] == [dicom_nncodec.NNCodecLossless]
        assert back[0][1] == encoded(good)
    refusals = [r.getMessage() for r in caplog.records if "refused (0xC000)" in r.getMessage()]
    assert len(refusals) == 1 and "private pixel data does not decode" in refusals[0], refusals


# --- big endian to a little-endian receiver ---------------------------------------------------------------

WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def assert_same_values(original: Dataset, back: Dataset, where: str = "") -> None:
    """Every element of the big-endian ``original`` has the same value in the little-endian ``back``."""
    assert sorted(t for t in original.keys() if t.element) == sorted(t for t in back.keys() if t.element), where
    for elem in original:
        if elem.tag.element == 0:
            continue
        other = back[elem.tag]
        name = f"{where}{elem.tag}"
        if elem.VR == "SQ":
            assert len(elem.value) == len(other.value), name
            for i, (a, b) in enumerate(zip(elem.value, other.value)):
                assert_same_values(a, b, f"{name}[{i}] > ")
        elif elem.tag == 0x7FE00010:
            assert np.array_equal(original.pixel_array, back.pixel_array), name
        elif elem.VR in WIDTH:
            w = WIDTH[elem.VR]
            assert np.array_equal(np.frombuffer(elem.value, f">u{w}"), np.frombuffer(other.value, f"<u{w}")), name
        else:
            assert elem.value == other.value, f"{name}: {elem.value!r} != {other.value!r}"


def every_number(ds: Dataset) -> Dataset:
    """``ds`` with an element of each byte-order-dependent VR, at the top and in a nested sequence."""
    def put(target: Dataset) -> None:
        target.LargestImagePixelValue = 281                          # US or SS: the 281 -> 6401
        target.SelectorUSValue, target.SelectorSSValue = [1, 281], [-2, 300]
        target.SelectorULValue, target.SelectorSLValue = [70000], [-70000]
        target.SelectorFLValue, target.SelectorFDValue = [1.5, -2.25], [3.125]
        target.SelectorSVValue, target.SelectorUVValue = [-(2 ** 40)], [2 ** 40 + 3]
        target.SelectorATValue = [0x00280107, 0x7FE00010]
        target.SelectorOWValue = np.arange(5, dtype=">u2").tobytes()
        target.SelectorOFValue = np.array([1.5, 2.5], dtype=">f4").tobytes()
        target.SelectorOLValue = np.array([70000], dtype=">u4").tobytes()
        target.SelectorODValue = np.array([0.1], dtype=">f8").tobytes()
    put(ds)
    inner, outer = Dataset(), Dataset()
    put(inner)
    inner.CodeMeaning = "inner"
    outer.ContentSequence = [inner]
    outer.SelectorUSValue = [7]
    ds.ReferencedImageSequence = [outer]
    return ds


def big_endian(ds: Dataset) -> Dataset:
    """``ds`` (pixels as numbers) labelled Explicit VR Big Endian with its Pixel Data in that byte order."""
    if "PixelData" in ds:
        arr = ds.pixel_array
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    return ds


def no_pixels() -> Dataset:
    ds = image(50)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    return ds


def generated(kind: str) -> Dataset:
    if kind == "none":
        ds = no_pixels()
    elif kind == "8":
        ds = make_dataset(smooth_image(8, 10, 8, seed=51)[None], 8, 8)
    elif kind == "16s":
        ds = make_dataset(smooth_image(8, 10, 12, signed=True, seed=52)[None], 16, 12, signed=True)
    else:
        ds = make_dataset(smooth_image(6, 8, 12, seed=53)[None].astype(np.uint32) * 65536 + 7, 32, 32)
    return big_endian(every_number(ds))


BE_SOURCES = ["MR_small_bigendian.dcm", "SC_rgb_expb_32bit.dcm", "rtdose_expb.dcm", "SC_rgb_expb.dcm",
              "gen:none", "gen:8", "gen:16s", "gen:32"]


@pytest.mark.parametrize("workers", [0, 1])
def test_big_endian_instances_reach_a_little_endian_receiver_with_every_value_converted(tmp_path, workers):
    originals = []
    for name in BE_SOURCES:
        ds = generated(name[4:]) if name.startswith("gen:") else dcmread(get_testdata_file(name))
        ds.StudyInstanceUID, ds.PatientID = "1.2.3.14", "BIGENDIAN"
        ds.SOPInstanceUID = generate_uid()             # (two of pydicom's files share one)
        originals.append(ds)
    sent = [(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRBigEndian, served(ds, False, False)) for ds in originals]
    with running_node(tmp_path / "s", peers=PEERS, compression={"workers": workers}) as node:
        assert store_bytes(node.port, sent) == [OK] * len(sent)
        if workers:
            assert node.compressor.wait_idle(300)
        classes = sorted({ds.SOPClassUID for ds in originals})
        final, back = get(node.port, study("1.2.3.14"), GET, classes, LITTLE)
        assert final.Status == OK, final
        assert sorted(ts for ts, _ in back) == [ExplicitVRLittleEndian] * len(originals)
        by_uid = {str(ds.SOPInstanceUID): ds for _, ds in back}
        for ds in originals:
            assert_same_values(ds, by_uid[ds.SOPInstanceUID], f"{ds.SOPInstanceUID}: ")
        final, back = get(node.port, study("1.2.3.14"), GET, classes, [ImplicitVRLittleEndian])
        assert final.Status == OK and len(back) == len(originals)
        by_uid = {str(ds.SOPInstanceUID): ds for _, ds in back}
        generated_no_pixels = originals[BE_SOURCES.index("gen:none")]
        assert by_uid[generated_no_pixels.SOPInstanceUID].LargestImagePixelValue == 281
        assert by_uid[generated_no_pixels.SOPInstanceUID].SelectorATValue == [0x00280107, 0x7FE00010]
        if workers:
            with node.index.session() as s:
                from scp.index import Instance
                states = {r.sop_uid: r.state for r in s.query(Instance)}
            assert states[generated_no_pixels.SOPInstanceUID] == NOT_IMAGE
            assert "compressed" in states.values()
