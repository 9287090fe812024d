"""Bad input on every path in: each malformed request gets its failure status and a log line; nothing
crashes, hangs or is left half stored, and what is accepted can be read back."""
from __future__ import annotations

import logging
import os
import struct
import tempfile
import uuid
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         RLELossless, generate_uid)
from pynetdicom import AE
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelFind as
                                  STUDY_FIND, StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
                                  StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE, Verification)

import dicom_nncodec
from dicom_nncodec import NNCodecLossless, NNCodecLossy
from scp import config as C
from scp import query
from scp.index import Index, Instance
from scp.ingest import Ingest, Received
from scp.storage import Storage
from scp.testing import encoded, find, get, move, node_config, running_node, send, send_raw
from tests.imaging import make_dataset, smooth_image

OK, NOT_SUPPORTED, A700, A900, C000 = 0x0000, 0x0122, 0xA700, 0xA900, 0xC000
HOSTILE_UIDS = ["../../etc/passwd", "1.2/3.4", "1.2\\3", "..", "1." * 40, "1..2", "1.2.", "a.b.c", "1.2.3\x00",
                "1.2.840.10008.5.1.4.1.1.2 ; rm -rf /", "9" * 65]


def ct(**changes) -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


def raw_element(ds: Dataset, keyword_or_tag, vr: str, value: bytes) -> Dataset:
    """``ds`` with an element stored as raw bytes, as a sender could encode it (no validation)."""
    tag = Tag(keyword_or_tag)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def item(ds: Dataset, data: bytes | None = None, sop_uid: str | None = None, sop_class: str | None = None,
         ts=ExplicitVRLittleEndian):
    return (sop_class or ds.SOPClassUID, sop_uid or ds.SOPInstanceUID, ts,
            encoded(ds, implicit=ts == ImplicitVRLittleEndian) if data is None else data)


def patched(ds: Dataset, tag: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``ds`` encoded, with a number inside it overwritten (``offset`` bytes after ``tag``)."""
    data = bytearray(encoded(ds))
    struct.pack_into(fmt, data, data.find(tag) + offset, value)
    return bytes(data)


def compressed(ds: Dataset | None = None, syntax=NNCodecLossless, **kw) -> Dataset:
    ds = ds or ct()
    dicom_nncodec.compress(ds, syntax, device="cpu", **kw)
    return ds


def with_frames(ds: Dataset, frames: list[bytes]) -> Dataset:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    return ds


def private_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def flipped(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)


def deflated(ds: Dataset) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(encoded(ds)) + c.flush()


def rle(ds: Dataset) -> Dataset:
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def zip_bomb() -> tuple:
    ds = ct()
    ds.ImageComments = "x"           # then 64 MB of zeros in a private element
    data = encoded(ds) + struct.pack("<HH2sHL", 0x0099, 0x0010, b"UN", 0, 64 * 2**20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(data)
    for _ in range(64):
        body += c.compress(b"\x00" * 2**20)
    return item(ds, body + c.flush(), ts=DeflatedExplicitVRLittleEndian)


CASES = {
    # (build, expected status, words of the logged reason)
    "valid-explicit": (lambda: item(ct()), OK, ""),
    "valid-implicit": (lambda: item(ct(), ts=ImplicitVRLittleEndian), OK, ""),
    "valid-private": (lambda: item(compressed(), ts=NNCodecLossless), OK, ""),
    "truncated-header": (lambda: item(d := ct(), encoded(d)[:10]), C000, "missing"),
    "truncated-elements": (lambda: item(d := ct(), encoded(d)[:700]), C000, ""),
    "truncated-pixels": (lambda: item(d := ct(), encoded(d)[:-5000]), C000, "announces"),
    "element-longer-than-data": (lambda: item(d := ct(), patched(d, b"\x10\x00\x10\x00PN", 6, "<H", 60000)),
                                 C000, "announces"),
    "pixel-length-huge": (lambda: item(d := ct(), patched(d, b"\xe0\x7f\x10\x00OW", 8, "<L", 10**8)), C000,
                          "announces"),
    "garbage": (lambda: item(ct(), os.urandom(3000)), C000, ""),
    "rows-beyond-data": (lambda: item(ct(Rows=4000)), C000, "need"),
    "frames-beyond-data": (lambda: item(ct(NumberOfFrames=3)), C000, "need"),
    "frames-not-a-number": (lambda: item(raw_element(ct(), "NumberOfFrames", "IS", b"abc ")), C000, "not a number"),
    "rows-zero": (lambda: item(ct(Rows=0)), C000, "outside"),
    "bits-allocated-12": (lambda: item(ct(BitsAllocated=12)), C000, "multiple of 8"),
    "bits-stored-over-allocated": (lambda: item(ct(BitsStored=17)), C000, "exceeds"),
    "samples-zero": (lambda: item(ct(SamplesPerPixel=0)), C000, "outside"),
    "no-photometric": (lambda: item(d := ct(), encoded(Dataset({k: v for k, v in d.items() if k != 0x00280004}))),
                       C000, "Photometric Interpretation is missing"),
    "photometric-multi-valued": (lambda: item(ct(PhotometricInterpretation=["MONOCHROME2", "RGB"])), C000,
                                 "PhotometricInterpretation has 2 values"),
    "pixel-representation-multi-valued": (lambda: item(ct(PixelRepresentation=[1, 0])), C000,
                                          "PixelRepresentation has 2 values"),
    "absurd-dimensions": (lambda: item(ct(Rows=65535, Columns=65535, NumberOfFrames=1000)), A700, "max_pixels"),
    "class-differs-from-request": (lambda: item(ct(SOPClassUID=MRImageStorage), sop_class=CTImageStorage), A900,
                                   "SOP Class UID differs"),
    "instance-differs-from-request": (lambda: item(ct(), sop_uid=generate_uid()), C000, "differs"),
    "no-sop-class": (lambda: item(d := ct(), encoded(Dataset({k: v for k, v in d.items() if k != 0x00080016})),
                                  sop_class=CTImageStorage), C000, "SOPClassUID is missing"),
    "hostile-study-uid": (lambda: item(ct(StudyInstanceUID="../../../tmp/x")), C000, "StudyInstanceUID"),
    "overlong-series-uid": (lambda: item(ct(SeriesInstanceUID="1." * 40 + "1")), C000, "SeriesInstanceUID"),
    "rle-bad-item-tag": (lambda: item(d := rle(ct()), bad_item_tag(encoded(d)), ts=RLELossless), C000,
                         "does not parse"),
    "rle-fragments-truncated": (lambda: item(d := rle(ct()), encoded(d)[:-3000], ts=RLELossless), C000, ""),
    "rle-offset-table-vs-frames": (lambda: item(rle_frames_mismatch(), ts=RLELossless), C000, "Offset Table"),
    "private-flipped-byte": (lambda: item(with_frames(d := compressed(), [flipped(private_frame(d), 300)]),
                                          ts=NNCodecLossless), C000, "damaged"),
    "private-truncated-frame": (lambda: item(with_frames(d := compressed(), [private_frame(d)[:-40]]),
                                             ts=NNCodecLossless), C000, "damaged"),
    "private-foreign-frame": (lambda: item(with_frames(compressed(), [private_frame(compressed(
        make_dataset(smooth_image(16, 16, 16)[None], 16, 16)))]), ts=NNCodecLossless), C000, "the dataset says"),
    "private-missing-frame": (lambda: item(raw_frames_mismatch(), ts=NNCodecLossless), C000,
                              "Number of Frames says 2"),
    "private-near-lossless-as-lossless": (lambda: item(compressed(syntax=NNCodecLossy, max_error=2),
                                                       ts=NNCodecLossless), C000, "near-lossless"),
    "deflated-garbage": (lambda: item(ct(), b"\x00garbage" * 50, ts=DeflatedExplicitVRLittleEndian), C000, ""),
    "deflate-bomb": (zip_bomb, A700, "inflates"),
}


def bad_item_tag(data: bytes) -> bytes:
    """Encapsulated Pixel Data whose fragment items have a wrong tag (FFFE,E100)."""
    i = data.find(b"\xe0\x7f\x10\x00")
    return data[:i] + data[i:].replace(b"\xfe\xff\x00\xe0", b"\xfe\xff\x00\xe1")


def rle_frames_mismatch() -> Dataset:
    """Three frames announced, two RLE frames (and two offsets) stored."""
    ds = rle(make_dataset(np.stack([smooth_image(16, 16, 12), smooth_image(16, 16, 12, seed=1)]), 16, 12))
    ds.NumberOfFrames = 3
    return ds


def raw_frames_mismatch() -> Dataset:
    """Two frames announced, one private frame stored."""
    ds = make_dataset(np.stack([smooth_image(16, 16, 12), smooth_image(16, 16, 12, seed=1)]), 16, 12)
    compressed(ds)
    return with_frames(ds, [private_frame(ds)])


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    peers = [{"ae_title": "SCU", "host": "127.0.0.1", "port": 1}]
    with running_node(tmp_path_factory.mktemp("bad") / "s", peers=peers, compression={"workers": 0},
                      limits={"max_instance_mb": 16}) as n:
        yield n


def stored_files(node) -> set[str]:
    root = node.storage.root
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, "objects"))
            for f in fs}


def indexed_paths(node) -> set[str]:
    with node.index.session() as s:
        return {i.path for i in s.query(Instance).all()}


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_c_store_gets_its_status_and_a_log_line(node, case, caplog):
    caplog.set_level(logging.INFO, "scp")
    build, expected, words = CASES[case]
    sop_class, sop_uid, ts, data = build()
    before = node.index.stats()["failures"]
    assert send_raw(node.port, [(sop_class, sop_uid, ts, data)]) == [expected]
    assert os.listdir(os.path.join(node.storage.root, "tmp")) == []
    assert stored_files(node) == indexed_paths(node)                    # nothing stored that the index lacks
    if expected == OK:
        with node.index.session() as s:
            row = s.query(Instance).filter_by(sop_uid=sop_uid).one()
        stored = dcmread(node.storage.abspath(row.path))
        dicom_nncodec.fix_transfer_syntax(stored)
        assert stored.pixel_array.size == stored.Rows * stored.Columns
    else:
        lines = [r.getMessage() for r in caplog.records if f"refused (0x{expected:04X})" in r.getMessage()]
        assert len(lines) == 1 and words in lines[0], [r.getMessage() for r in caplog.records]
        assert node.index.stats()["failures"] == before + 1
        with node.index.session() as s:
            assert s.query(Instance).filter_by(sop_uid=sop_uid).count() == 0


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_hostile_request_uids_are_refused_before_anything_is_written(tmp_path, uid, caplog):
    cfg = node_config(tmp_path / "s", storage={"fsync": False})
    storage = Storage(cfg.storage_path, fsync=False)
    storage.prepare()
    index = Index(C.resolved_index_url(cfg))
    index.create()
    ingest = Ingest(cfg, index, storage)
    ds = ct()
    data = encoded(ds)
    assert ingest.store(Received(data, ExplicitVRLittleEndian, CTImageStorage, uid, "SCU", CTImageStorage)) == C000
    assert ingest.store(Received(data, ExplicitVRLittleEndian, uid, ds.SOPInstanceUID, "SCU", uid)) == NOT_SUPPORTED
    assert ingest.store(Received(data, ExplicitVRLittleEndian, CTImageStorage, ds.SOPInstanceUID, "SCU",
                                 MRImageStorage)) == NOT_SUPPORTED       # not the presentation context's class
    assert os.listdir(tmp_path / "s" / "tmp") == [] and not os.listdir(tmp_path / "s" / "objects")
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3
    assert refused[0].startswith(f"C-STORE of {uid[:64]!r} from SCU refused")     # a hostile UID is quoted, cut
    index.dispose()


def test_an_unknown_sop_class_is_not_accepted_in_negotiation(node):
    ae = AE(ae_title="SCU")
    ae.add_requested_context("1.2.3.4.5.6.7.8.9")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NNCODEC")
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    assoc.release()


# --- property-based: the C-STORE path on arbitrary input ------------------------------------------------

class Harness:
    """An Ingest on a throw-away storage folder (fsync off: speed), as the handler calls it."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="nncodec-fuzz-")
        cfg = node_config(self.folder, storage={"fsync": False}, limits={"max_pixels": 2**24})
        self.storage = Storage(cfg.storage_path, fsync=False)
        self.storage.prepare()
        self.index = Index(C.resolved_index_url(cfg))
        self.index.create()
        self.ingest = Ingest(cfg, self.index, self.storage)
        self.tried = 0

    def store(self, data: bytes, ts, sop_class: str, sop_uid: str) -> int:
        self.tried += 1
        return self.ingest.store(Received(data, ts, sop_class, sop_uid, "FUZZ", sop_class))

    def check_consistent(self, status: int, sop_uid: str, ts) -> None:
        assert status in (OK, A700, A900, C000, NOT_SUPPORTED), hex(status)
        assert os.listdir(os.path.join(self.folder, "tmp")) == []
        with self.index.session() as s:
            rows = s.query(Instance).filter_by(sop_uid=sop_uid).all()
        if status != OK:
            assert rows == []
            return
        (row,) = rows
        stored = dcmread(self.storage.abspath(row.path))
        dicom_nncodec.fix_transfer_syntax(stored)
        if "PixelData" in stored and not stored.file_meta.TransferSyntaxUID.is_compressed:
            stored.pixel_array                   # native pixel data that was accepted can be read
        elif dicom_nncodec.syntax.registered(stored.file_meta.TransferSyntaxUID) and "PixelData" in stored:
            from dicom_nncodec.dataset import encoded_frames
            from dicom_nncodec import bitstream as B
            for frame in encoded_frames(stored):
                B.unpack(frame)                  # every accepted private frame is intact


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.index.dispose()
    print(f"\nfuzzed C-STORE inputs: {h.tried}")


SEEDS = {
    "explicit": (lambda: ct(), ExplicitVRLittleEndian),
    "implicit": (lambda: ct(), ImplicitVRLittleEndian),
    "private": (lambda: compressed(), NNCodecLossless),
    "rle": (lambda: rle(ct()), RLELossless),
}
_SEED_CACHE: dict = {}


def seed(name: str) -> tuple[bytes, str, str, str]:
    """An encoded valid data set of kind ``name`` (made once); a fresh SOP Instance UID is spliced in."""
    if name not in _SEED_CACHE:
        make, ts = SEEDS[name]
        ds = make()
        ds.SOPInstanceUID = "1.2.3.4." + "9" * 56          # 64 characters, replaced per example
        _SEED_CACHE[name] = (encoded(ds, implicit=ts == ImplicitVRLittleEndian), ts, ds.SOPClassUID)
    data, ts, sop_class = _SEED_CACHE[name]
    uid = "1.2.3.4." + str(uuid.uuid4().int).ljust(56, "7")[:56]
    return data.replace(b"1.2.3.4." + b"9" * 56, uid.encode()), ts, sop_class, uid


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**31), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**31), st.integers(0, 2**32 - 1)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, value in ops:
        if not b:
            break
        pos %= len(b)
        if op == "flip":
            b[pos] ^= value
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = bytes([value]) * (1 + value % 7)
        elif op == "length" and pos + 4 <= len(b):
            struct.pack_into("<L", b, pos, value)
    return bytes(b)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SEEDS)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_damaged_data_sets(harness, kind, ops):
    data, ts, sop_class, uid = seed(kind)
    status = harness.store(mutate(data, ops), ts, sop_class, uid)
    harness.check_consistent(status, uid, ts)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 65535), columns=st.integers(0, 300), frames=st.one_of(st.none(), st.integers(-2, 5000)),
       samples=st.sampled_from([None, 0, 1, 2, 3, 4, 5]), bits=st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65]),
       stored_bits=st.integers(0, 70), length=st.integers(0, 70000))
def test_fuzz_pixel_descriptions(harness, rows, columns, frames, samples, bits, stored_bits, length):
    ds = make_dataset(np.zeros((1, 1, 1)), 8, 8)
    ds.SOPInstanceUID = uid = generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = rows, columns, bits, stored_bits
    if frames is not None:
        ds.NumberOfFrames = frames
    if samples is not None:
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    ds.PixelData = bytes(length + length % 2)
    ds["PixelData"].VR = "OB"
    status = harness.store(encoded(ds), ExplicitVRLittleEndian, ds.SOPClassUID, uid)
    harness.check_consistent(status, uid, ExplicitVRLittleEndian) if bits in (1, 8, 16, 32, 64) else None
    n_frames = 1 if frames is None else frames
    n_samples = 1 if samples is None else samples
    sane = (1 <= rows <= 65535 and 1 <= columns <= 65535 and 1 <= n_frames and n_samples in (1, 3, 4)
            and (bits == 1 or bits % 8 == 0) and 1 <= bits <= 64 and 1 <= stored_bits <= bits)
    pixels = rows * columns * max(n_frames, 0) * max(n_samples, 0)
    need = (pixels + 7) // 8 if bits == 1 else pixels * bits // 8
    if not sane:
        assert status == C000
    elif pixels > 2**24:
        assert status == A700
    else:
        assert status == (OK if len(ds.PixelData) >= need else C000)


# --- C-FIND, C-GET and C-MOVE -----------------------------------------------------------------------

def identifier(level="STUDY", **keys) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def sequence_key() -> Dataset:
    ds = identifier()
    ds.add_new(0x0020000D, "SQ", [Dataset()])          # StudyInstanceUID sent as a sequence
    return ds


def private_and_unknown_keys() -> Dataset:
    ds = identifier(PatientName="*")
    ds.add_new(0x00991010, "LO", "x")
    ds.add_new(0x7FE00010, "OB", b"\x00\x01")             # pixel data as a return key
    return ds


FIND_CASES = {
    "no-level": (identifier(None, PatientName="*"), A900),
    "bad-level": (identifier("FOO"), A900),
    "image-level-in-wrong-model": (identifier("PATIENT"), A900),
    "too-many-uids": (identifier(StudyInstanceUID=[f"1.2.{i}" for i in range(1001)]), A900),
    "overlong-wildcard": (identifier(PatientName="*?" * 800), A900),
    "sequence-as-key": (sequence_key(), OK),       # (implicit VR: read as a UID, which matches nothing)
    "bad-date": (identifier(StudyDate="notadate-20200101"), OK),
    "bad-int": (raw_element(identifier("SERIES", StudyInstanceUID="1.2.3"), "SeriesNumber", "IS", b"x "), OK),
    "injection": (identifier(PatientName="'; DROP TABLE instance; --", AccessionNumber="%_\\"), OK),
    "private-and-unknown": (private_and_unknown_keys(), OK),
}


@pytest.mark.parametrize("case", FIND_CASES)
def test_c_find_with_bad_keys(node, case, caplog):
    ident, expected = FIND_CASES[case]
    status, _ = find(node.port, ident, STUDY_FIND)
    assert status == expected
    if expected != OK:
        assert any("C-FIND from SCU@127.0.0.1" in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)
    assert send(node.port, [ct()]) == [OK]              # the node goes on


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.dictionaries(st.sampled_from(sorted(query.KEYS) + ["ModalitiesInStudy", "QueryRetrieveLevel"]),
                            st.one_of(st.text(max_size=40), st.lists(st.text(max_size=12), max_size=5)),
                            max_size=6))
def test_fuzz_find_identifiers(node, keys):
    ds = identifier()
    for k, v in keys.items():
        try:
            setattr(ds, k, v)
        except Exception:            # pydicom refuses to even build it
            return
    with node.index.session() as s:
        try:
            for _ in query.find(s, ds, "study", 20):
                pass
        except query.QueryError:
            pass


def test_get_and_move_with_bad_identifiers_and_destinations(node, caplog):
    final, received = get(node.port, identifier("SERIES", PatientName="*"), STUDY_GET, [CTImageStorage],
                          [ExplicitVRLittleEndian])
    assert final.Status == A900 and received == []
    final = move(node.port, identifier("STUDY", StudyInstanceUID="../../x"), "SCU", STUDY_MOVE)
    assert final.Status in (OK, A900)
    for dest in ("NOWHERE", "../..", "1.2.840.10008"):
        assert move(node.port, identifier("STUDY", StudyInstanceUID="1.2.3"), dest, STUDY_MOVE).Status == 0xA801
    messages = [r.getMessage() for r in caplog.records]
    assert any("C-GET from SCU@127.0.0.1" in m and "refused (0xA900)" in m for m in messages)
    assert sum("unknown destination" in m for m in messages) == 3
