"""Refusals and corrupt input: every problem raises the documented exception, never wrong pixels."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

import dicom_nncodec
from dicom_nncodec import BitstreamError, ModelNotFound, NNCodecLossless, UnsupportedPixelData, codec
from dicom_nncodec import bitstream as B
from dicom_nncodec.pixels import PixelFormat

from .imaging import make_dataset, smooth_image

FMT = PixelFormat(24, 20, 1, 16, 12, False, "MONOCHROME2")


@pytest.fixture(scope="module")
def frame_and_bytes():
    img = smooth_image(24, 20, 12)
    return img, codec.encode_frame(img, FMT)


def _refix_frame_crc(data: bytes) -> bytes:
    """Recompute the frame CRC so only the pixel CRC can catch a payload change."""
    h = B.read_header(data)
    body = bytearray(data[:h.size - 4])
    return bytes(body) + struct.pack("<I", zlib.crc32(body)) + data[h.size:]


@pytest.mark.parametrize("kw,match", [
    (dict(bits_allocated=32, bits_stored=32), "Bits Allocated 32"),
    (dict(bits_allocated=1, bits_stored=1), "1-bit"),
    (dict(bits_allocated=16, bits_stored=17), "Bits Stored 17"),
    (dict(photometric="YBR_FULL_422", samples_per_pixel=3), "YBR_FULL_422"),
    (dict(photometric="RGB", samples_per_pixel=4), "Samples per Pixel 4"),
    (dict(photometric="RGB", samples_per_pixel=1), "one sample"),
])
def test_unsupported_formats_are_refused(kw, match):
    base = dict(rows=8, columns=8, samples_per_pixel=1, bits_allocated=16, bits_stored=12, signed=False,
                photometric="MONOCHROME2")
    base.update(kw)
    with pytest.raises(UnsupportedPixelData, match=match):
        PixelFormat(**base).validate()


def test_float_pixel_data_is_refused():
    ds = make_dataset(smooth_image(4, 4, 8)[None], 8, 8)
    del ds.PixelData
    ds.FloatPixelData = np.zeros(16, "<f4").tobytes()
    with pytest.raises(UnsupportedPixelData, match="float"):
        PixelFormat.from_dataset(ds)


def test_float_array_is_refused():
    with pytest.raises(UnsupportedPixelData, match="dtype float"):
        codec.encode_frame(np.zeros((24, 20), np.float32), FMT)


def test_wrong_shape_is_refused():
    with pytest.raises(UnsupportedPixelData, match="shape"):
        codec.encode_frame(np.zeros((20, 24), np.uint16), FMT)


def test_pydicom_compress_of_1_bit_data_is_refused():
    ds = make_dataset(np.zeros((1, 8, 8), np.uint8), 8, 8)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = b"\x00" * 8
    with pytest.raises(Exception, match="1-bit"):
        ds.compress(NNCodecLossless)


def test_truncated(frame_and_bytes):
    _, data = frame_and_bytes
    for n in (0, 3, 10, 60, len(data) // 2, len(data) - 5):
        with pytest.raises(BitstreamError):
            codec.decode_frame(data[:n])


def test_trailing_garbage(frame_and_bytes):
    _, data = frame_and_bytes
    with pytest.raises(BitstreamError, match="trailing"):
        codec.decode_frame(data + b"\x01\x02\x03")


def test_each_byte_flip_is_detected(frame_and_bytes):
    img, data = frame_and_bytes
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(BitstreamError):
            codec.decode_frame(bytes(bad))


def test_payload_corruption_with_valid_frame_crc_is_caught_by_pixel_crc(frame_and_bytes):
    _, data = frame_and_bytes
    h = B.read_header(data)
    caught = 0
    for off in range(h.header_size, h.size - 4, 7):
        bad = bytearray(data)
        bad[off] ^= 0xFF
        with pytest.raises(BitstreamError):
            codec.decode_frame(_refix_frame_crc(bytes(bad)))
        caught += 1
    assert caught > 5


def test_foreign_frame():
    jpeg_ls = dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    frame = next(iter(dicom_nncodec.dataset.encoded_frames(jpeg_ls)))
    with pytest.raises(BitstreamError, match="bad magic"):
        codec.decode_frame(frame)


def test_newer_version(frame_and_bytes):
    _, data = frame_and_bytes
    bad = bytearray(data)
    bad[4] = max(B.VERSIONS) + 1
    with pytest.raises(BitstreamError, match="newer release"):
        codec.decode_frame(bytes(bad))


def _with_model(data: bytes, model_id: str | None = None, digest: bytes | None = None) -> bytes:
    h, payloads = B.unpack(data)
    fields = dict(h.__dict__)
    fields.pop("header_size")
    if model_id is not None:
        fields["model_id"] = model_id
    if digest is not None:
        fields["digest"] = digest
    return B.pack(B.FrameHeader(**fields), payloads)


def test_unknown_model(frame_and_bytes):
    _, data = frame_and_bytes
    with pytest.raises(ModelNotFound, match="not installed"):
        codec.decode_frame(_with_model(data, model_id="nnc-lossless-99"))


def test_wrong_weights_digest(frame_and_bytes):
    _, data = frame_and_bytes
    with pytest.raises(ModelNotFound, match="digest"):
        codec.decode_frame(_with_model(data, digest=b"\x11" * 32))
    assert issubclass(ModelNotFound, BitstreamError)


def test_frame_that_contradicts_dataset(frame_and_bytes):
    _, data = frame_and_bytes
    other = PixelFormat(20, 24, 1, 16, 12, False, "MONOCHROME2")
    with pytest.raises(BitstreamError, match="the dataset says"):
        codec.decode_frame(data, other)


def test_pydicom_reports_corrupt_pixel_data(frame_and_bytes):
    img, data = frame_and_bytes
    ds = make_dataset(img[None], 16, 12)
    ds.compress(NNCodecLossless)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    ds.PixelData = encapsulate([bytes(bad)])
    ds._pixel_array = None
    ds._pixel_id = {}
    # pydicom wraps a plugin's exception in its own RuntimeError; the message keeps the cause
    with pytest.raises(RuntimeError, match="dicom_nncodec: corrupt frame"):
        ds.pixel_array
    with pytest.raises(BitstreamError, match="corrupt frame"):
        dicom_nncodec.decompress(ds)


def test_lossless_syntax_with_near_lossless_frame_is_refused():
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    dicom_nncodec.compress(ds, dicom_nncodec.NNCodecLossy, max_error=2)
    ds.file_meta.TransferSyntaxUID = NNCodecLossless
    ds._pixel_array = None
    ds._pixel_id = {}
    with pytest.raises(RuntimeError, match="near-lossless frame"):
        ds.pixel_array
    with pytest.raises(BitstreamError, match="near-lossless frame"):
        dicom_nncodec.decompress(ds)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=400))
def test_fuzz_random_bytes(blob):
    with pytest.raises(BitstreamError):
        codec.decode_frame(blob)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutated_frames(frame_and_bytes, data):
    img, good = frame_and_bytes
    bad = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(bad) - 1))
        bad[pos] = data.draw(st.integers(0, 255))
    if bytes(bad) == good:
        return
    try:
        out = codec.decode_frame(bytes(bad))
    except BitstreamError:
        return
    np.testing.assert_array_equal(out, img)   # only a no-op mutation (e.g. the pad byte) may decode


def test_high_bit_other_than_bits_stored_minus_one_is_refused():
    ds = make_dataset(smooth_image(8, 8, 12)[None], 16, 12)
    ds.HighBit = 15
    with pytest.raises(UnsupportedPixelData, match="High Bit 15"):
        ds.compress(NNCodecLossless)
    with pytest.raises(UnsupportedPixelData, match="High Bit 15"):
        dicom_nncodec.compress(ds)


@pytest.mark.parametrize("field,value", [("transform_mono", None), ("signed_colour", None), ("nl_zero", None)])
def test_header_combinations_encoders_never_write(frame_and_bytes, field, value):
    _, data = frame_and_bytes
    h, payloads = B.unpack(data)
    fields = dict(h.__dict__)
    fields.pop("header_size")
    if field == "transform_mono":
        fields["transform"] = 1
    elif field == "signed_colour":
        fields.update(samples_per_pixel=3, signed=True)
        payloads = payloads * 3
    else:
        fields.update(mode=B.MODE_NEAR_LOSSLESS, max_error=0)
    with pytest.raises(BitstreamError, match="corrupt frame header"):
        codec.decode_frame(B.pack(B.FrameHeader(**fields), payloads))


def test_files_written_name_this_implementation(tmp_path):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    dicom_nncodec.compress(ds)
    dicom_nncodec.dataset.save(ds, tmp_path / "x.dcm")
    meta = dcmread(tmp_path / "x.dcm").file_meta
    assert meta.ImplementationClassUID == dicom_nncodec.IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == dicom_nncodec.IMPLEMENTATION_VERSION_NAME


def test_pydicom_encoder_api_refuses_unusual_high_bit_when_told():
    from pydicom.pixels import get_encoder
    ds = make_dataset(smooth_image(8, 8, 12)[None], 16, 12)
    with pytest.raises(Exception, match="High Bit 15"):
        get_encoder(NNCodecLossless).encode(ds, high_bit=15)


def test_unusual_high_bit_still_decodes():
    """Only encoding refuses it: data compressed with such a header (by an earlier writer) still decodes."""
    ds = make_dataset(smooth_image(8, 8, 12)[None], 16, 12)
    ref = ds.pixel_array.copy()
    dicom_nncodec.compress(ds)
    ds.HighBit = 15
    dicom_nncodec.decompress(ds)
    ds.HighBit = 11
    np.testing.assert_array_equal(ds.pixel_array, ref)


def test_weights_with_float_arrays_are_refused():
    from dicom_nncodec import zoo
    data = zoo.available_models()["nnc-lossless-1"].read_bytes()
    import json
    n = struct.unpack_from("<I", data, len(zoo.MAGIC))[0]
    header = json.loads(data[len(zoo.MAGIC) + 4:len(zoo.MAGIC) + 4 + n])
    header["arrays"][0]["dtype"] = "<f4"
    hj = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    forged = zoo.MAGIC + struct.pack("<I", len(hj)) + hj + data[len(zoo.MAGIC) + 4 + n:]
    with pytest.raises(ValueError, match="integers only"):
        zoo.read_weights(forged)
