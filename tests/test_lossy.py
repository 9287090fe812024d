"""The lossy RNN-Conv mode: ratio control, DICOM attributes, exactness of the decoder, refusals."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

import dicom_nncodec  # noqa: F401  (registers the syntaxes)
from dicom_nncodec import bitstream as B
from dicom_nncodec import codec, dataset as D, lossy, zoo
from dicom_nncodec.errors import BitstreamError, UnsupportedPixelData
from dicom_nncodec.models import rnnconv as R
from dicom_nncodec.pixels import PixelFormat
from dicom_nncodec.syntax import RNN_CONV_METHOD, NNCodecLossless, NNCodecLossy

from .imaging import smooth_image

MONO8 = PixelFormat(128, 128, 1, 8, 8, False, "MONOCHROME2")


def _chest_like(rows=128, cols=128, seed=3):
    """A smooth 8-bit image with some texture (what the model is for)."""
    img = smooth_image(rows, cols, 8, seed=seed).astype(np.float64)
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def _psnr(a, b, peak):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(peak ** 2 / mse) if mse else np.inf


@pytest.mark.parametrize("ratio", [2, 4, 8, 16, 32])
def test_ratio_is_met_within_ten_percent(ratio):
    img = _chest_like()
    data = codec.encode_frame(img, MONO8, ratio=ratio)
    achieved = img.size / len(data)
    assert ratio <= achieved <= 1.1 * ratio
    out = codec.decode_frame(data, MONO8)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert B.read_header(data).mode == B.MODE_LOSSY


def test_quality_rises_with_rate():
    """Floors set some 4-6 dB under what the shipped model measured (34.5 / 46.5 / 52.2 dB)."""
    y, x = np.mgrid[0:128, 0:128]
    img = (127 + 60 * np.sin(x / 17.0) * np.cos(y / 23.0)
           + 30 * np.exp(-((x - 60) ** 2 + (y - 70) ** 2) / 800)).astype(np.uint8)
    psnr = [_psnr(codec.decode_frame(codec.encode_frame(img, MONO8, ratio=r), MONO8), img, 255) for r in (32, 8, 2)]
    assert psnr[0] < psnr[1] < psnr[2]
    assert psnr[0] > 30 and psnr[1] > 40 and psnr[2] > 46


def test_ct_quality_at_ratio_8():
    """CT_small (16-bit CT, held out): 31.5 dB over its range at 8:1 when the model shipped."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    a = ds.pixel_array
    fmt = PixelFormat.from_dataset(ds)
    out = codec.decode_frame(codec.encode_frame(a, fmt, ratio=8), fmt)
    assert _psnr(out, a, float(a.max()) - float(a.min())) > 28


# PSNR over 2**BitsStored - 1 at 6:1 when the model shipped, less a margin (62.3, 53.8, 17.3, 40.2 dB):
# ultrasound, never seen in training, is where the model is worst
@pytest.mark.parametrize("name, floor", [("CT_small.dcm", 58), ("MR_small.dcm", 50), ("US1_UNCR.dcm", 15),
                                         ("emri_small.dcm", 37)])
def test_pydicom_compress_ratio_sets_lossy_attributes(name, floor):
    ds = pydicom.dcmread(get_testdata_file(name))
    original = ds.pixel_array.copy()
    uid, sop_class = ds.SOPInstanceUID, ds.SOPClassUID
    ds.compress(NNCodecLossy, ratio=6)
    assert ds.file_meta.TransferSyntaxUID == NNCodecLossy
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == RNN_CONV_METHOD
    assert 6 <= float(ds.LossyImageCompressionRatio) <= 6.6
    assert ds.ImageType[0] == "DERIVED"
    assert ds.SOPInstanceUID != uid and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    ref = ds.SourceImageSequence[-1]
    assert ref.ReferencedSOPInstanceUID == uid and ref.ReferencedSOPClassUID == sop_class
    decoded = ds.pixel_array
    assert decoded.shape == original.shape and decoded.dtype == original.dtype
    bits = int(ds.BitsStored)
    assert _psnr(decoded, original, 2 ** bits - 1) > floor


def test_dataset_compress_matches_ds_compress_options():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    D.compress(ds, NNCodecLossy, ratio=10)
    assert ds.LossyImageCompressionMethod == RNN_CONV_METHOD
    with pytest.raises(UnsupportedPixelData, match="not both"):
        D.compress(pydicom.dcmread(get_testdata_file("CT_small.dcm")), NNCodecLossy, ratio=10, max_error=2)
    with pytest.raises(UnsupportedPixelData, match="lossless only"):
        D.compress(pydicom.dcmread(get_testdata_file("CT_small.dcm")), NNCodecLossless, ratio=10)


def test_lossy_frames_are_refused_under_the_lossless_syntax():
    data = codec.encode_frame(_chest_like(), MONO8, ratio=8)
    with pytest.raises(BitstreamError, match="lossless transfer syntax"):
        codec.decode_frames([data], MONO8, lossless_only=True)


@pytest.mark.parametrize("ratio, match", [(400, "leaves"), (1.5, "below what the lossy model reaches"),
                                          (1.0, "between")])
def test_unreachable_ratios_are_refused(ratio, match):
    img = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)   # noise: no lossy gain
    fmt = PixelFormat(64, 64, 1, 16, 12, False, "MONOCHROME2")
    with pytest.raises(UnsupportedPixelData, match=match):
        codec.encode_frame(img, fmt, ratio=ratio)


def test_tiny_and_odd_sizes_round_trip():
    for rows, cols in [(1, 1), (15, 17), (33, 70)]:
        img = smooth_image(rows, cols, 12, seed=rows)
        fmt = PixelFormat(rows, cols, 1, 16, 12, False, "MONOCHROME2")
        try:
            data = codec.encode_frame(img, fmt, ratio=2)
        except UnsupportedPixelData as exc:      # 1x1 at ratio 2 leaves 1 byte: refused, with a reason
            assert "leaves" in str(exc)
            continue
        assert codec.decode_frame(data, fmt).shape == (rows, cols)


def test_constant_image_decodes_to_itself():
    img = np.full((64, 64), 1234, dtype=np.uint16)
    fmt = PixelFormat(64, 64, 1, 16, 12, False, "MONOCHROME2")
    assert np.array_equal(codec.decode_frame(codec.encode_frame(img, fmt, ratio=20), fmt), img)


def _refresh_crc(frame: bytes) -> bytes:
    h = B.read_header(frame)
    body = frame[:h.size - 4]
    return body + struct.pack("<I", zlib.crc32(body)) + frame[h.size:]


def test_corrupt_lossy_frames_are_refused():
    data = codec.encode_frame(_chest_like(), MONO8, ratio=8)
    h = B.read_header(data)
    for pos in (h.header_size + 3, h.header_size + 20, len(data) // 2):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(BitstreamError):
            codec.decode_frame(bytes(bad), MONO8)
    with pytest.raises(BitstreamError):
        codec.decode_frame(data[:-9], MONO8)
    # a well-formed frame (CRC recomputed) with impossible iteration counts
    for field, value in ((4, 0), (4, R.ITERATIONS + 1), (5, 0), (5, R.BITS_PER_BLOCK + 1)):
        bad = bytearray(data)
        bad[h.header_size + field] = value
        with pytest.raises(BitstreamError, match="corrupt lossy payload"):
            codec.decode_frame(_refresh_crc(bytes(bad)), MONO8)
    # payload garbage behind a valid prelude: refused by the pixel CRC, never wrong pixels
    bad = bytearray(data)
    for i in range(h.header_size + lossy.PRELUDE.size, h.size - 4):
        bad[i] = (bad[i] * 7 + 1) & 0xFF
    with pytest.raises(BitstreamError):
        codec.decode_frame(_refresh_crc(bytes(bad)), MONO8)


def test_mode_and_model_must_agree():
    data = codec.encode_frame(_chest_like(), MONO8, ratio=8)
    h = B.read_header(data)
    lossless = zoo.load_model("nnc-lossless-1")
    forged = B.pack(B.FrameHeader(B.MODE_LOSSY, 0, lossless.model_id, lossless.digest, h.rows, h.columns,
                                  h.samples_per_pixel, h.bits_allocated, h.bits_stored, h.signed, h.transform,
                                  h.pixel_crc, ()), B.unpack(data)[1])
    with pytest.raises(BitstreamError, match="does not match model"):
        codec.decode_frame(forged, MONO8)


def test_integer_decoder_equals_training_decoder():
    """The straight-through (training) decoder and the exported integer decoder compute the same
    reconstruction: what training optimised is what ships."""
    torch.manual_seed(0)
    net = R.RNNConvCodec(16)
    net.export()
    x = torch.from_numpy(_chest_like(64, 64).astype(np.int64))[None]
    lo, span = torch.tensor([0]), torch.tensor([256])
    u = R.normalise(x, lo, span)
    runs = [R.Unroll(net, (1, 64, 64), "cpu", u=u, integer=i) for i in (True, False)]
    with torch.no_grad():
        for t in range(R.ITERATIONS):
            bits = runs[0].encode_bits(t)
            a = runs[0].decode(bits, t)
            b = runs[1].decode(bits, t)
            assert torch.equal(a, b.to(torch.int64))


def test_shipped_lossy_model_loads_with_its_tables():
    m = zoo.load_model(zoo.DEFAULT_LOSSY_MODEL)
    assert m.lossy and m.config["config"]["bits_per_block"] == R.BITS_PER_BLOCK
    assert len(m.tables.probs) == R.ITERATIONS * R.BITS_PER_BLOCK * 3


def test_lossy_weights_with_a_foreign_configuration_are_refused(tmp_path):
    path = zoo.available_models()[zoo.DEFAULT_LOSSY_MODEL]
    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data, len(zoo.MAGIC))
    start = len(zoo.MAGIC) + 4
    header = data[start:start + n]
    bad = header.replace(b'"bits_per_block":%d' % R.BITS_PER_BLOCK, b'"bits_per_block":%d' % (R.BITS_PER_BLOCK + 1))
    assert bad != header and len(bad) == len(header) + (len(str(R.BITS_PER_BLOCK + 1)) - len(str(R.BITS_PER_BLOCK)))
    forged = zoo.MAGIC + struct.pack("<I", len(bad)) + bad + data[start + n:]
    with pytest.raises(ValueError, match="configuration"):
        zoo.read_weights(forged)


def test_cli_compress_ratio(tmp_path, capsys):
    from dicom_nncodec.cli import main

    src = get_testdata_file("CT_small.dcm")
    out = tmp_path / "ct.dcm"
    assert main(["compress", src, "-o", str(out), "--ratio", "8"]) == 0
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == NNCodecLossy and ds.LossyImageCompressionMethod == RNN_CONV_METHOD
    assert main(["info", str(out)]) == 0
    assert "lossy" in capsys.readouterr().out
    assert main(["compress", src, "-o", str(tmp_path / "x.dcm"), "--ratio", "8", "--max-error", "2"]) == 2


@pytest.mark.parametrize("options", [{"ratio": 8}, {"max_error": 2}])
def test_palette_colour_is_lossless_only(options):
    fmt = PixelFormat(32, 32, 1, 8, 8, False, "PALETTE COLOR")
    with pytest.raises(UnsupportedPixelData, match="PALETTE COLOR"):
        codec.encode_frame(np.zeros((32, 32), np.uint8), fmt, **options)


def test_prelude_range_beyond_bits_stored_is_refused():
    fmt = PixelFormat(64, 64, 1, 16, 10, False, "MONOCHROME2")
    data = codec.encode_frame(smooth_image(64, 64, 10, seed=2), fmt, ratio=6)
    h = B.read_header(data)
    bad = bytearray(data)
    bad[h.header_size + 2:h.header_size + 4] = (1 << 10).to_bytes(2, "little")     # hi = 1024 > 1023
    with pytest.raises(BitstreamError, match="corrupt lossy payload"):
        codec.decode_frame(_refresh_crc(bytes(bad)), fmt)


def test_many_random_images_meet_the_ratio_window():
    rng = np.random.default_rng(11)
    coded = 0
    for k in range(12):
        rows, cols = (int(v) for v in rng.integers(40, 140, 2))
        bits = int(rng.integers(6, 17))
        fmt = PixelFormat(rows, cols, 1, 8 if bits <= 8 else 16, bits, False, "MONOCHROME2")
        img = smooth_image(rows, cols, bits, seed=k, noise=float(rng.uniform(0, 30)))
        ratio = float(rng.uniform(3, 30))
        try:
            data = codec.encode_frame(img, fmt, ratio=ratio)
        except UnsupportedPixelData:
            continue
        achieved = rows * cols * fmt.bits_allocated // 8 / len(data)
        assert ratio <= achieved <= 1.1 * ratio, (rows, cols, bits, ratio, achieved)
        coded += 1
    assert coded >= 9
