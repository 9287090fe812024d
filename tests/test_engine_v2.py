"""Format version 2: the compiled engine against the annex (section 12).

The oracle is ``dicom_nncodec.engine.reference``, a plain-Python decoder written from the annex
text alone.  It must decode exactly what the compiled encoder writes; the compiled network must
give the same integers as the torch form of the model; corrupt payloads must be refused (or, at
the plane level, decode exactly as the annex says: the reference and the engine agree on every
corrupt input); and the bytes must not depend on the thread count.  Any change of the engine
that alters the bitstream fails here."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_nncodec import BitstreamError, codec, zoo
from dicom_nncodec import bitstream as B
from dicom_nncodec.engine import kernels as K
from dicom_nncodec.engine import planes as EP
from dicom_nncodec.engine import reference as R
from dicom_nncodec.pixels import PixelFormat

from .imaging import smooth_image

SPEC = Path(__file__).resolve().parents[1] / "conformance" / "PRIVATE_TRANSFER_SYNTAX.md"
MODEL_ID = "nnc-lossless-2"


@pytest.fixture(scope="module")
def model():
    return zoo.load_model(MODEL_ID)


@pytest.fixture(scope="module")
def weights(model):
    return model.engine


def _annex_v2() -> dict:
    for text in re.findall(r"```yaml\n(.*?)```", SPEC.read_text(encoding="utf-8"), re.S):
        data = yaml.safe_load(text)
        if "constants" in data:
            return data["constants"]
    raise AssertionError("the annex has no constants block")


# ---- section 10 / 12: constants ------------------------------------------------------------------

def test_annex_constants_match_the_engine_and_the_reference():
    C = _annex_v2()
    v = C["version_2"]
    assert B.VERSION == C["frame"]["version"] == v["version"] and tuple(C["frame"]["versions"]) == B.VERSIONS
    assert zoo.DEFAULT_LOSSLESS_MODEL == C["weights"]["default_model_id"] == MODEL_ID
    assert zoo.NEAR_LOSSLESS_MODEL == C["weights"]["near_lossless_model_id"]
    assert v["kind"] == zoo.PIXEL_MLP_KIND
    assert sorted(zoo._pixel_mlp_config(32, 65536)) == v["config_keys"]
    assert (K.PREC, K.RANS_L, K.RAW_CHUNK, K.NT, K.DIRECT, K.NC, K.CHUNK, K.HIDDEN, K.MAX_F) == \
        (v["prec"], v["rans_lower"], v["raw_chunk"], v["tokens"], v["direct_tokens"], v["contexts"], v["chunk"],
         v["hidden"], v["max_features"]) == \
        (R.PREC, R.RANS_L, R.RAW_CHUNK, R.NT, R.DIRECT, R.NC, R.CHUNK, R.HIDDEN, 18)
    assert v["end_state"] == K.RANS_L and v["word_bits"] == 16
    assert K.CHUNK % K.BLOCK == 0, "table updates fall every CHUNK positions only when BLOCK divides CHUNK"
    for p, name in enumerate(v["phases"]):
        k = int(K.NEI_K[p])
        engine = [[int(K.NEI_DY[p, i]), int(K.NEI_DX[p, i])] for i in range(k)]
        assert engine == v["offsets"][name] == [list(o) for o in R.OFFSETS[p]], name
        assert [int(K.ORIGIN_Y[p]), int(K.ORIGIN_X[p])] == v["origins"][name] == list(R.ORIGINS[p])
        assert K.feature_count(p) == k + 4
    assert K.LOW_BITS.tolist() == v["low_bits"] == R.LOW_BITS
    assert K.THRESHOLDS.tolist() == R.THRESHOLDS                    # "smallest t with t**6 >= 2**m"
    assert K.LEAKY_SHIFT == v["leaky_shift"]
    assert (K.NUM_SCALES, K.SCALE_INDEX_OFFSET, K.SCALES_PER_OCTAVE) == (133, 36, 6)
    spec = C["weights"]["models"][MODEL_ID]
    data = zoo.available_models()[MODEL_ID].read_bytes()
    assert len(data) == spec["size"]
    m = zoo.load_model(MODEL_ID)
    assert m.digest.hex() == spec["sha256"] and m.config["config"] == spec["config"]
    assert {a["name"]: [a["dtype"], a["shape"]] for a in m.config["arrays"]} == spec["arrays"]
    lo, hi = v["increment_range"], v["limit_range"]
    assert lo[0] <= m.engine.increment <= lo[1] and hi[0] <= m.engine.limit <= hi[1]


# ---- the reference decodes what the engine writes ------------------------------------------------

def _planes():
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:2, 0:8200]
    long = np.clip(2000 + 800 * np.sin(xx / 300.0) + rng.normal(0, 6, (2, 8200)), 0, 4095).astype(np.int64)
    sparse = rng.choice([3, 1000, 1200, 1201, 4000], size=(9, 10))                 # 5 values: b' = 3
    ct = smooth_image(12, 16, 6, seed=3) * 37 + 24                  # a rescaled 6-bit image: every 37th value
    return {
        "1x1": (np.array([[5]]), 4),
        "1x1_17bit_max": (np.array([[(1 << 17) - 1]]), 17),
        "2x2": (np.array([[0, 255], [255, 0]]), 8),
        "1x7": (np.array([[10, 11, 12, 200, 14, 15, 16]]), 8),
        "7x1": (np.array([[3], [900], [7], [8], [1023], [0], [5]]), 10),
        "5x9_17bit": (rng.integers(0, 1 << 17, (5, 9)), 17),
        "13x11_12bit": (smooth_image(13, 11, 12, seed=1), 12),
        "37x53_odd_pads": (smooth_image(37, 53, 10, seed=2, noise=1.0), 10),
        "sparse_value_map": (sparse, 12),
        "ct_like_value_map": (ct, 12),
        "flat": (np.full((6, 7), 77), 8),
        "flat_zero_16bit": (np.zeros((5, 5), dtype=np.int64), 16),
        "mask_1bit": ((rng.random((9, 8)) < 0.3).astype(np.int64), 1),
        "noise_16bit": (rng.integers(0, 1 << 16, (16, 16)), 16),
        "extremes_16bit": (rng.choice([0, 65535], size=(11, 6)), 16),
        "long_2x8200_updates_within_a_step": (long, 12),
    }


PLANES = _planes()


@pytest.mark.parametrize("name", list(PLANES))
def test_reference_decodes_engine_payloads(name, weights):
    plane, bits = PLANES[name]
    payload = EP.encode_plane(plane, bits, weights)
    assert len(payload) % 4 == 0
    m = int.from_bytes(payload[:4], "little")
    if name.endswith("value_map"):
        assert m > 0, "this plane must take the value map"
    if name.startswith("long"):
        assert (plane.shape[1] + 1) // 2 > K.CHUNK, "a step must span more than one table update"
    got = R.decode_plane(payload, plane.shape[0], plane.shape[1], bits, weights)
    assert got == plane.tolist()
    assert np.array_equal(EP.decode_plane(payload, plane.shape[0], plane.shape[1], bits, weights), plane)


def test_value_map_layout_and_non_minimal_varints(weights):
    """Section 12.2: the map is count, first value, gaps minus one, zero-padded; a non-minimal
    varint of at most 5 bytes and a longer zero padding decode to the same plane."""
    plane, bits = PLANES["sparse_value_map"]
    payload = EP.encode_plane(plane, bits, weights)
    m = int.from_bytes(payload[:4], "little")
    values = sorted(set(plane.flatten().tolist()))
    gaps = [b - a - 1 for a, b in zip(values, values[1:])]
    want = _varints([len(values), values[0]] + gaps)
    assert payload[4:4 + m] == want + bytes(-len(want) % 4)
    words = payload[4 + m:]
    odd = bytes([0x80 | len(values), 0x80, 0x00]) + _varints([values[0]] + gaps)   # count in 3 bytes
    for vmap in (odd + bytes(-len(odd) % 4), want + bytes(-len(want) % 4) + bytes(8)):
        alt = len(vmap).to_bytes(4, "little") + vmap + words
        assert R.decode_plane(alt, *plane.shape, bits, weights) == plane.tolist()
        assert np.array_equal(EP.decode_plane(alt, *plane.shape, bits, weights), plane)


def _varints(vals) -> bytes:
    out = bytearray()
    for v in vals:
        while True:
            out.append((v & 0x7F) | (0x80 if v >> 7 else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


# ---- the compiled network equals the torch form (and the reference) -------------------------------

@pytest.mark.parametrize("ph,level,bits,h,w,kind", [
    (0, 0, 12, 6, 7, "smooth"), (1, 0, 12, 6, 7, "smooth"), (2, 0, 12, 6, 7, "smooth"),
    (0, 3, 16, 5, 4, "noise"), (1, 8, 17, 3, 9, "noise"), (2, 1, 8, 1, 1, "noise"),
    (2, 2, 10, 8, 3, "flat"), (1, 0, 1, 4, 4, "noise"),
])
def test_engine_predictions_equal_torch_and_reference(ph, level, bits, h, w, kind, model, weights):
    rng = np.random.default_rng(ph * 100 + level * 10 + bits)
    if kind == "smooth":
        X = smooth_image(2 * h, 2 * w, bits, seed=level + ph)
    elif kind == "flat":
        X = np.full((2 * h, 2 * w), (1 << bits) // 3, dtype=np.int64)
    else:
        X = rng.integers(0, 1 << bits, (2 * h, 2 * w))
    X = np.ascontiguousarray(X, dtype=np.int64)
    mu4, j = K.phase_predictions(X, ph, level, bits, *weights.args())
    tm, tj = model.net.predict_int(torch.as_tensor(X)[None], ph, level, torch.tensor([bits]))
    assert np.array_equal(mu4, tm[0].numpy()) and np.array_equal(j, tj[0].numpy())
    net = R._Net(weights.arrays)
    grid = X.tolist()
    oy, ox = R.ORIGINS[ph]
    ref = [[net.predict(grid, 2 * i + oy, 2 * k + ox, ph, level, bits) for k in range(w)] for i in range(h)]
    assert [[a for a, _ in row] for row in ref] == mu4.tolist()
    assert [[b for _, b in row] for row in ref] == j.tolist()


def test_engine_predictions_equal_torch_on_a_pyramid(model, weights):
    """Every phase grid the coder sees for a real plane, at every level."""
    img = smooth_image(45, 38, 12, seed=5)
    sizes = R.level_sizes(*img.shape)
    for level in range(len(sizes) - 1):
        h, w = sizes[level + 1]
        X = np.zeros((2 * h, 2 * w), dtype=np.int64)
        lv = img[::1 << level, ::1 << level]
        X[:lv.shape[0], :lv.shape[1]] = lv
        for ph in range(3):
            mu4, j = K.phase_predictions(X, ph, level, 12, *weights.args())
            tm, tj = model.net.predict_int(torch.as_tensor(X)[None], ph, level, torch.tensor([12]))
            assert np.array_equal(mu4, tm[0].numpy()) and np.array_equal(j, tj[0].numpy()), (level, ph)


# ---- corrupt payloads -----------------------------------------------------------------------------

def _both(payload, rows, cols, bits, weights):
    """The engine's and the reference's answer to a payload: pixels, or 'error'."""
    out = []
    for fn in (lambda: EP.decode_plane(payload, rows, cols, bits, weights).tolist(),
               lambda: R.decode_plane(payload, rows, cols, bits, weights)):
        try:
            out.append(fn())
        except BitstreamError:
            out.append("error")
    return out


@pytest.mark.parametrize("name", ["13x11_12bit", "sparse_value_map", "1x7"])
def test_truncated_and_trailing_payloads_are_refused(name, weights):
    plane, bits = PLANES[name]
    rows, cols = plane.shape
    payload = EP.encode_plane(plane, bits, weights)
    bad = [b"", payload[:2], payload[:4], payload[:-2], payload[:-4], payload[:len(payload) // 2 & ~3],
           payload + bytes(4), payload + b"\x01\x00\x00\x00", payload + b"\x00\x00\x01\x00", payload + payload[-4:]]
    for data in bad:
        with pytest.raises(BitstreamError, match="corrupt payload"):
            EP.decode_plane(data, rows, cols, bits, weights)
        with pytest.raises(BitstreamError, match="corrupt payload"):
            R.decode_plane(data, rows, cols, bits, weights)


def test_bad_value_map_lengths_and_contents_are_refused(weights):
    plane, bits = PLANES["sparse_value_map"]
    rows, cols = plane.shape
    payload = EP.encode_plane(plane, bits, weights)
    m = int.from_bytes(payload[:4], "little")
    body = payload[4:]
    values = sorted(set(plane.flatten().tolist()))
    gaps = [b - a - 1 for a, b in zip(values, values[1:])]
    words = payload[4 + m:]

    def with_map(vmap: bytes, pad: int | None = None) -> bytes:
        vmap = vmap + bytes(-len(vmap) % 4 if pad is None else pad)
        return len(vmap).to_bytes(4, "little") + vmap + words

    bad = [
        (m + 2).to_bytes(4, "little") + body,                     # not a multiple of 4
        (len(payload)).to_bytes(4, "little") + body,              # beyond the payload
        (1 << 31).to_bytes(4, "little") + body,
        with_map(_varints([1, values[0]])),                      # count below 2
        with_map(_varints([rows * cols + 1, values[0]] + gaps)),  # count above rows*cols
        with_map(_varints([len(values), values[0]] + gaps[:-1] + [gaps[-1] + 100])),   # value above 2**bits - 1
        with_map(bytes([0x80] * 6)),                              # overlong varint
        with_map(_varints([len(values), values[0]] + gaps) + b"\x01"),                 # non-zero padding
    ]
    for data in bad:
        with pytest.raises(BitstreamError, match="corrupt payload"):
            EP.decode_plane(data, rows, cols, bits, weights)
        with pytest.raises(BitstreamError, match="corrupt payload"):
            R.decode_plane(data, rows, cols, bits, weights)


@pytest.mark.parametrize("name", ["13x11_12bit", "sparse_value_map", "5x9_17bit"])
def test_flipped_bytes_decode_as_the_annex_says(name, weights):
    """A flip may by chance decode (the frame CRC catches that, below); whatever happens, the engine
    and the reference agree: both refuse, or both return the same pixels."""
    plane, bits = PLANES[name]
    rows, cols = plane.shape
    payload = EP.encode_plane(plane, bits, weights)
    rng = np.random.default_rng(11)
    positions = sorted(set(range(min(len(payload), 12))) | set(rng.integers(0, len(payload), 24).tolist())
                       | {len(payload) - 1, len(payload) - 2})
    refused = 0
    for pos in positions:
        for mask in (0x01, 0x80):
            data = bytearray(payload)
            data[pos] ^= mask
            eng, ref = _both(bytes(data), rows, cols, bits, weights)
            assert eng == ref, (pos, mask)
            if eng == "error":
                refused += 1
            else:
                assert np.asarray(eng).shape == (rows, cols)
    assert refused >= len(positions)        # at least half of the flips are caught by the plane decoder alone


FMT = PixelFormat(19, 23, 1, 16, 12, False, "MONOCHROME2")


def _refix_frame_crc(data: bytes) -> bytes:
    h = B.read_header(data)
    body = bytes(data[:h.size - 4])
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(data[h.size:])


def test_codec_refuses_a_frame_with_a_flipped_payload_byte():
    img = smooth_image(19, 23, 12, seed=4)
    data = codec.encode_frame(img, FMT, model_id=MODEL_ID)
    h, _ = B.unpack(data)
    assert h.version == 2 and h.model_id == MODEL_ID and h.mode == B.MODE_LOSSLESS
    assert np.array_equal(codec.decode_frame(data, FMT), img)
    rng = np.random.default_rng(3)
    end = h.header_size + sum(h.payload_sizes)
    for pos in sorted(set(rng.integers(h.header_size, end, 30).tolist()) | {h.header_size, end - 1}):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(BitstreamError, match="frame CRC-32"):
            codec.decode_frame(bytes(bad), FMT)
        # with the frame CRC made good again, the payload decoder or the pixel CRC must refuse it
        with pytest.raises(BitstreamError, match="corrupt payload|pixel|CRC-32"):
            codec.decode_frame(_refix_frame_crc(bytes(bad)), FMT)


def test_version_2_header_rules():
    img = smooth_image(8, 9, 12, seed=6)
    data = codec.encode_frame(img, PixelFormat(8, 9, 1, 16, 12, False, "MONOCHROME2"), model_id=MODEL_ID)
    bad = bytearray(data)
    bad[5] = B.MODE_NEAR_LOSSLESS
    bad[6] = 1
    with pytest.raises(BitstreamError, match="format version 2 codes lossless frames only"):
        B.read_header(bytes(bad))
    v1 = bytearray(data)
    v1[4] = 1                                     # a version-1 frame naming the pixel-MLP model
    with pytest.raises(BitstreamError, match="does not match model"):
        codec.decode_frame(_refix_frame_crc(bytes(v1)))


def test_pixel_mlp_weights_files_are_read_strictly(tmp_path, weights):
    good = tmp_path / "x.nncw"
    zoo.write_engine_weights(good, "x", weights)
    m = zoo.read_weights(good.read_bytes())
    assert m.format_version == 2 and m.engine.increment == weights.increment
    for i, w in enumerate([EP.EngineWeights(weights.arrays, weights.prior, 0, weights.limit),
                           EP.EngineWeights(weights.arrays, weights.prior, weights.increment, 100),
                           EP.EngineWeights(weights.arrays, np.zeros_like(weights.prior), 32, 1 << 16)]):
        path = tmp_path / f"bad{i}.nncw"
        zoo.write_engine_weights(path, "x", w)
        with pytest.raises(ValueError):
            zoo.read_weights(path.read_bytes())


# ---- threads --------------------------------------------------------------------------------------

def test_thread_count_does_not_change_the_bytes(weights):
    names = ["13x11_12bit", "37x53_odd_pads", "sparse_value_map", "noise_16bit", "1x7", "flat", "5x9_17bit"]
    planes = [PLANES[n][0] for n in names] + [smooth_image(64, 64, 16, seed=s) for s in range(4)]
    bits = [PLANES[n][1] for n in names] + [16] * 4
    one = EP.encode_planes(planes, bits, weights, threads=1)
    two = EP.encode_planes(planes, bits, weights, threads=2)
    assert one == two
    assert one == [EP.encode_plane(p, b, weights) for p, b in zip(planes, bits)]
    same = [p for p in planes if p.shape == (64, 64)]
    back = EP.decode_planes(one[-4:], 64, 64, [16] * 4, weights, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(back, same))
