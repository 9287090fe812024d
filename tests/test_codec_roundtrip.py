"""Bit-exact round trips over every supported pixel format, through the codec API and through pydicom."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames, parse_basic_offsets
from pydicom.pixels import iter_pixels, pixel_array

import dicom_nncodec
from dicom_nncodec import NNCodecLossless, NNCodecLossy, codec
from dicom_nncodec.dataset import values
from dicom_nncodec.pixels import PixelFormat

from .imaging import make_dataset, smooth_image


def roundtrip_dataset(ds):
    """compress -> write -> read -> every pydicom access path; returns the re-read dataset."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)     # pydicom compresses only uncompressed datasets
    ref = ds.pixel_array.copy()
    uids = (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    ds.compress(NNCodecLossless)
    assert (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == uids, "lossless keeps all UIDs"
    assert ds["PixelData"].is_undefined_length
    buf = io.BytesIO()
    dicom_nncodec.dataset.save(ds, buf)
    raw = buf.getvalue()
    rd = dcmread(io.BytesIO(raw))
    assert rd.file_meta.TransferSyntaxUID == NNCodecLossless
    np.testing.assert_array_equal(rd.pixel_array, ref)
    np.testing.assert_array_equal(pixel_array(io.BytesIO(raw)), ref)
    frames = list(iter_pixels(io.BytesIO(raw)))
    np.testing.assert_array_equal(np.stack(frames) if len(frames) > 1 else frames[0], ref)
    n = int(rd.get("NumberOfFrames", 1) or 1)
    assert len(list(generate_frames(rd.PixelData, number_of_frames=n))) == n, "one fragment per frame"
    offsets = parse_basic_offsets(rd.PixelData)
    assert len(offsets) == n, "Basic Offset Table present"
    rd.decompress()
    assert rd.SOPInstanceUID == uids[0]
    np.testing.assert_array_equal(rd.pixel_array, ref)
    return rd


@pytest.mark.parametrize("bits_allocated,bits_stored,signed", [
    (8, 1, False), (8, 2, False), (8, 5, True), (8, 8, False), (8, 8, True),
    (16, 9, False), (16, 10, True), (16, 12, False), (16, 12, True), (16, 14, True),
    (16, 15, False), (16, 16, False), (16, 16, True), (16, 8, False),
])
def test_grayscale_bit_depths(bits_allocated, bits_stored, signed):
    frames = np.stack([smooth_image(37, 53, bits_stored, signed, seed=s) for s in range(2)])
    roundtrip_dataset(make_dataset(frames, bits_allocated, bits_stored, signed))


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 2), (2, 1), (1, 97), (97, 1), (3, 5), (17, 31), (64, 64), (255, 3)])
def test_odd_and_tiny_sizes(rows, cols):
    roundtrip_dataset(make_dataset(smooth_image(rows, cols, 12)[None], 16, 12))


def test_bits_above_high_bit_are_ignored():
    img = smooth_image(20, 30, 12)
    dirty = img | (0b1010 << 12)                       # garbage in the unused high bits
    ds = make_dataset(dirty[None], 16, 12)
    ds.compress(NNCodecLossless)
    np.testing.assert_array_equal(ds.pixel_array, img)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "PALETTE COLOR"])
def test_other_single_sample_photometrics(photometric):
    roundtrip_dataset(make_dataset(smooth_image(40, 50, 8)[None], 8, 8, photometric=photometric))


@pytest.mark.parametrize("photometric,bits", [("RGB", 8), ("YBR_FULL", 8), ("RGB", 16), ("RGB", 12)])
def test_colour(photometric, bits):
    frames = np.stack([smooth_image(33, 41, bits, samples=3, seed=s) for s in range(3)])
    ds = make_dataset(frames, 8 if bits <= 8 else 16, bits, photometric=photometric, samples=3)
    ref = frames
    ds.compress(NNCodecLossless)
    out = dicom_nncodec.codec.decode_frames(dicom_nncodec.dataset.encoded_frames(ds), PixelFormat.from_dataset(ds))
    np.testing.assert_array_equal(np.stack(out), ref)


def test_planar_configuration_1_source():
    frame = smooth_image(24, 18, 8, samples=3)
    ds = make_dataset(frame[None], 8, 8, photometric="RGB", samples=3)
    ds.PlanarConfiguration = 1
    ds.PixelData = np.moveaxis(frame, -1, 0).astype(np.uint8).tobytes()
    ref = ds.pixel_array.copy()
    ds.compress(NNCodecLossless)
    np.testing.assert_array_equal(ds.pixel_array, ref)
    assert ds.PlanarConfiguration == 0


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "SC_rgb_2frame.dcm",
                                  "OBXXXX1A.dcm", "MR_small_bigendian.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_RLE.dcm", "SC_rgb_rle_16bit.dcm", "MR2_J2KR.dcm"])
def test_pydicom_bundled_files(name):
    roundtrip_dataset(dcmread(get_testdata_file(name)))


def test_pydicom_data_package_images():
    """Larger real images from the pydicom-data package (a 256x256 region each, to keep the suite quick)."""
    pytest.importorskip("data_store", reason="install the pydicom-data package (pip install pydicom-data)")
    from pathlib import Path

    import data_store
    folder = Path(data_store.__file__).parent / "data"
    names = ["693_UNCR.dcm", "MR2_UNCR.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm"]
    found = [folder / n for n in names if (folder / n).exists()]
    assert found, f"no pydicom-data images in {folder}"
    for path in found:
        ds = dcmread(path)
        fmt = PixelFormat.from_dataset(ds)
        arr = ds.pixel_array
        crop = arr[:256, :256]
        fmt = PixelFormat(crop.shape[0], crop.shape[1], fmt.samples_per_pixel, fmt.bits_allocated, fmt.bits_stored,
                          fmt.signed, fmt.photometric)
        enc = codec.encode_frames([crop], fmt)
        np.testing.assert_array_equal(codec.decode_frames(enc, fmt)[0], crop, err_msg=str(path))


@pytest.mark.slow
def test_4096_square():
    img = smooth_image(4096, 4096, 8, noise=1.0)
    fmt = PixelFormat(4096, 4096, 1, 8, 8, False, "MONOCHROME2")
    enc = codec.encode_frames([img], fmt)
    np.testing.assert_array_equal(codec.decode_frames(enc, fmt)[0], img)


@pytest.mark.parametrize("max_error", [1, 2, 5])
def test_near_lossless_bound_and_lossy_attributes(max_error):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ref = ds.pixel_array.astype(np.int64)
    old_uid = ds.SOPInstanceUID
    ds.compress(NNCodecLossy, max_error=max_error)
    err = np.abs(ds.pixel_array.astype(np.int64) - ref).max()
    assert 0 < err <= max_error
    assert ds.file_meta.TransferSyntaxUID == NNCodecLossy
    assert ds.LossyImageCompression == "01"
    assert values(ds, "LossyImageCompressionMethod") == [dicom_nncodec.LOSSY_METHOD]
    assert float(values(ds, "LossyImageCompressionRatio")[-1]) > 1
    assert ds.ImageType[0] == "DERIVED"
    assert ds.SOPInstanceUID != old_uid
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == old_uid


def test_near_lossless_colour_bound():
    frame = smooth_image(30, 30, 8, samples=3, noise=8)
    fmt = PixelFormat(30, 30, 3, 8, 8, False, "RGB")
    out = codec.decode_frames(codec.encode_frames([frame], fmt, max_error=3), fmt)[0]
    assert np.abs(out.astype(int) - frame).max() <= 3


def test_lossless_syntax_refuses_max_error():
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.raises(dicom_nncodec.UnsupportedPixelData):
        dicom_nncodec.compress(ds, NNCodecLossless, max_error=2)


def test_batched_dataset_compress_equals_pydicom_plugin():
    a = dcmread(get_testdata_file("emri_small.dcm"))
    b = dcmread(get_testdata_file("emri_small.dcm"))
    a.compress(NNCodecLossless)
    dicom_nncodec.compress(b, NNCodecLossless, batch_size=4)
    assert a.PixelData == b.PixelData


def test_lossy_attributes_are_appended_to_earlier_ones():
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "10"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    dicom_nncodec.compress(ds, NNCodecLossy, max_error=1)
    assert values(ds, "LossyImageCompressionMethod") == ["ISO_10918_1", dicom_nncodec.LOSSY_METHOD]
    assert values(ds, "LossyImageCompressionRatio")[0] == "10"


def test_concurrent_threads_give_identical_streams():
    from concurrent.futures import ThreadPoolExecutor
    imgs = [smooth_image(48, 40, 12, seed=s) for s in range(6)]
    fmt = PixelFormat(48, 40, 1, 16, 12, False, "MONOCHROME2")
    serial = [codec.encode_frame(i, fmt) for i in imgs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda i: codec.encode_frame(i, fmt), imgs))
        decoded = list(pool.map(lambda d: codec.decode_frame(d, fmt), parallel))
    assert parallel == serial
    for a, b in zip(decoded, imgs):
        np.testing.assert_array_equal(a, b)


def test_compress_many_equals_one_by_one():
    names = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"]
    alone = [dicom_nncodec.compress(dcmread(get_testdata_file(n))) for n in names]
    together = dicom_nncodec.dataset.compress_many([dcmread(get_testdata_file(n)) for n in names] * 2)
    assert [d.PixelData for d in together] == [d.PixelData for d in alone] * 2


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_property_any_format_any_content_round_trips(data):
    """Random geometry, depth, signedness, colour and content (noise, constants, extremes): always exact."""
    samples = data.draw(st.sampled_from([1, 3]))
    bits = data.draw(st.integers(1, 16))
    signed = samples == 1 and data.draw(st.booleans())
    allocated = 8 if bits <= 8 and data.draw(st.booleans()) else 16
    rows, cols = data.draw(st.integers(1, 33)), data.draw(st.integers(1, 33))
    nframes = data.draw(st.integers(1, 3))
    kind = data.draw(st.sampled_from(["noise", "constant", "extremes", "smooth"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    shape = (nframes, rows, cols) + ((3,) if samples == 3 else ())
    if kind == "noise":
        frames = rng.integers(lo, hi + 1, shape)
    elif kind == "constant":
        frames = np.full(shape, rng.integers(lo, hi + 1))
    elif kind == "extremes":
        frames = np.where(rng.random(shape) < 0.5, lo, hi)
    else:
        frames = np.clip(np.cumsum(rng.integers(-3, 4, shape), axis=2) + (lo + hi) // 2, lo, hi)
    photometric = "RGB" if samples == 3 else "MONOCHROME2"
    fmt = PixelFormat(rows, cols, samples, allocated, bits, signed, photometric)
    frames = [f.astype(fmt.dtype) for f in frames]
    max_error = data.draw(st.sampled_from([0, 0, 1, 4]))
    out = codec.decode_frames(codec.encode_frames(frames, fmt, max_error=max_error), fmt)
    for a, b in zip(out, frames):
        assert a.dtype == b.dtype
        assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= max_error
