"""The private transfer syntax annex (conformance/PRIVATE_TRANSFER_SYNTAX.md) states what the code does.

The annex carries two machine-readable YAML blocks: ``constants`` (section 10) and
``worked_example`` (section 9).  Every value there is compared with the code here,
and the range coder / table quantisation the annex restates from constriction is
checked against the installed constriction, so the specification cannot drift
silently from the implementation (or from a constriction upgrade).  For the lossy
mode (section 11) a decoder written from the annex alone (numpy and Python integers)
decodes the reference encoder's frames to the reference decoder's pixels.

The lossy weights file is read at test time: its digest and values are never written here."""
from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_nncodec import bitstream as B
from dicom_nncodec import codec, entropy, lossy, pyramid_coder, syntax, zoo
from dicom_nncodec import dataset as D
from dicom_nncodec.errors import BitstreamError, UnsupportedPixelData
from dicom_nncodec.models import context_model as CM
from dicom_nncodec.models import pyramid as P
from dicom_nncodec.models import quant as Q
from dicom_nncodec.models import rnnconv as R
from dicom_nncodec.pixels import COLOUR_DIRECT, COLOUR_RCT, GRAYSCALE, TRANSFORM_NONE, TRANSFORM_RCT, PixelFormat

SPEC = Path(__file__).resolve().parents[1] / "conformance" / "PRIVATE_TRANSFER_SYNTAX.md"
FORMAT_V1_MODEL = zoo.NEAR_LOSSLESS_MODEL      # sections 5 to 9 describe format version 1 and its models


def _blocks() -> dict:
    out = {}
    for text in re.findall(r"```yaml\n(.*?)```", SPEC.read_text(encoding="utf-8"), re.S):
        data = yaml.safe_load(text)
        assert isinstance(data, dict) and len(data) == 1, "each yaml block of the annex has one top-level key"
        out.update(data)
    return out


BLOCKS = _blocks()
C = BLOCKS["constants"]
EX = BLOCKS["worked_example"]


# ---- section 1: UIDs and DICOM identification ------------------------------------------------------

def test_uids_and_identification():
    assert C["transfer_syntaxes"]["NNCodecLossless"] == str(syntax.NNCodecLossless)
    assert C["transfer_syntaxes"]["NNCodecLossy"] == str(syntax.NNCodecLossy)
    for uid in (syntax.NNCodecLossless, syntax.NNCodecLossy):
        assert not uid.is_implicit_VR and uid.is_little_endian and uid.is_encapsulated
    assert C["implementation_class_uid"] == str(syntax.IMPLEMENTATION_CLASS_UID)
    assert C["implementation_version_name"] == syntax.IMPLEMENTATION_VERSION_NAME
    assert C["lossy_image_compression_method"] == syntax.LOSSY_METHOD
    assert C["rnn_conv_lossy_image_compression_method"] == syntax.RNN_CONV_METHOD
    assert C["max_near_lossless_error"] == codec.MAX_NEAR_LOSSLESS_ERROR


def test_supported_pixel_descriptions():
    px = C["pixels"]
    assert list(GRAYSCALE) == px["grayscale_photometric"]
    assert list(COLOUR_RCT) == px["rct_photometric"]
    assert list(COLOUR_DIRECT) == px["direct_colour_photometric"]
    for ba in (1, 8, 12, 16, 32):
        fmt = PixelFormat(2, 2, 1, ba, min(ba, 8), False, "MONOCHROME2")
        if ba in px["bits_allocated"]:
            fmt.validate()
        else:
            with pytest.raises(ValueError):
                fmt.validate()


# ---- section 2: frame container ---------------------------------------------------------------------

def _sizes(fields):
    return [size for _, size in fields]


def test_frame_struct_sizes():
    f = C["frame"]
    assert B.MAGIC == f["magic"].encode("ascii") and len(B.MAGIC) == 4
    assert B.VERSION == f["version"]
    assert {B.MODE_LOSSLESS: "lossless", B.MODE_NEAR_LOSSLESS: "near_lossless", B.MODE_LOSSY: "lossy"} == \
        {v: k for k, v in f["modes"].items()}
    assert B.MODE_NAMES == f["mode_names"]
    assert (TRANSFORM_NONE, TRANSFORM_RCT) == (f["colour_transforms"]["none"], f["colour_transforms"]["rct"])
    assert B._FIXED.size == sum(_sizes(f["fixed_fields"])) == 9
    assert B._GEOMETRY.size == sum(_sizes(f["geometry_fields"])) == 14
    assert [struct.calcsize("<" + c) for c in B._FIXED.format.lstrip("<").replace("4s", "s")][1:] == \
        _sizes(f["fixed_fields"])[1:]
    assert [struct.calcsize("<" + c) for c in B._GEOMETRY.format.lstrip("<")] == _sizes(f["geometry_fields"])
    assert zlib.crc32(b"123456789") == f["crc32_check_123456789"]


def test_frame_field_offsets_as_specified():
    """Pack a header with distinctive values and read each field back at the offset the annex gives."""
    f = C["frame"]
    model_id = "x" * 7
    digest = bytes(range(100, 132))
    payloads = [b"\x11" * 8, b"\x22" * 4, b"\x33" * 12]
    h = B.FrameHeader(B.MODE_NEAR_LOSSLESS, 200, model_id, digest, 513, 1027, 3, 16, 12, False, 0, 0xDEADBEEF, ())
    data = B.pack(h, payloads)
    values = {"magic": B.MAGIC, "version": 1, "mode": 1, "max_error": 200, "model_id_len": 7,
              "rows": 513, "columns": 1027, "samples_per_pixel": 3, "bits_allocated": 16, "bits_stored": 12,
              "pixel_representation": 0, "colour_transform": 0, "planes": 3, "pixel_crc": 0xDEADBEEF}
    pos = 0
    for name, size in f["fixed_fields"]:
        raw = data[pos:pos + size]
        assert (raw if name == "magic" else int.from_bytes(raw, "little")) == values[name], name
        pos += size
    assert data[pos:pos + 7] == model_id.encode()
    pos += 7
    assert data[pos:pos + f["digest_bytes"]] == digest
    pos += f["digest_bytes"]
    for name, size in f["geometry_fields"]:
        assert int.from_bytes(data[pos:pos + size], "little") == values[name], name
        pos += size
    for p in payloads:
        assert int.from_bytes(data[pos:pos + f["payload_len_bytes"]], "little") == len(p)
        pos += f["payload_len_bytes"]
    header_size = pos
    assert header_size == 55 + len(model_id) + 4 * len(payloads)
    assert data[pos:pos + 24] == b"".join(payloads)
    pos += 24
    assert int.from_bytes(data[pos:pos + f["frame_crc_bytes"]], "little") == zlib.crc32(data[:pos])
    pos += f["frame_crc_bytes"]
    # the pad byte is present exactly when the frame is odd-sized, i.e. when the model id length is even
    assert len(data) - pos == (pos % 2) == (len(model_id) % 2 == 0)
    assert data[pos:] in (b"", bytes([f["pad_byte"]]))
    parsed, _ = B.unpack(data)
    assert parsed.header_size == header_size and parsed.size == pos


def test_payload_lengths_must_be_multiples_of_four():
    h = B.FrameHeader(0, 0, "m", bytes(32), 1, 1, 1, 8, 8, False, 0, 0, ())
    assert C["frame"]["payload_multiple"] == 4
    with pytest.raises(BitstreamError, match="inconsistent"):
        B.unpack(B.pack(h, [b"\x00" * 6]))


# ---- section 4: weights file ------------------------------------------------------------------------

def _weights_header(data: bytes) -> dict:
    (n,) = struct.unpack_from("<I", data, len(zoo.MAGIC))
    return json.loads(data[len(zoo.MAGIC) + 4:len(zoo.MAGIC) + 4 + n])


def test_weights_file_as_specified():
    w = C["weights"]
    assert zoo.MAGIC == w["magic"].encode("ascii")
    assert zoo.DEFAULT_LOSSLESS_MODEL == w["default_model_id"]
    assert zoo.DEFAULT_LOSSY_MODEL == w["default_lossy_model_id"] and w["default_lossy_model_id"] in w["models"]
    for model_id, spec in w["models"].items():
        data = zoo.available_models()[model_id].read_bytes()
        sha256 = spec["sha256"]
        assert len(data) == spec["size"]
        assert hashlib.sha256(data).hexdigest() == sha256
        header = _weights_header(data)
        assert header["model_id"] == model_id
        assert header["config"] == spec["config"]
        assert [a["name"] for a in header["arrays"]] == sorted(a["name"] for a in header["arrays"])
        assert {a["name"]: [a["dtype"], a["shape"]] for a in header["arrays"]} == spec["arrays"]
        model = zoo.load_model(model_id)
        assert model.digest.hex() == sha256 and model.model_id == model_id
        if spec["config"].get("kind") == C["lossy"]["kind"]:
            # section 11.8: integer decoder and bit probabilities, float32 encoder
            assert model.lossy
            for name, (dtype, _) in spec["arrays"].items():
                assert dtype == ("<f4" if name.startswith("encoder.") else "<i4"), name
            continue
        assert not model.lossy
        if spec["config"].get("kind") == "pixel-mlp":
            # section 12.10: integer engine weights and prior counts, format version 2
            assert model.format_version == 2 and model.engine is not None
            assert all(dtype == "<i4" for dtype, _ in spec["arrays"].values())
            continue
        assert model.net.use_lstm == spec["config"]["use_lstm"]
        # section 4.2: the lstm.* arrays exist exactly when use_lstm is true
        assert any(name.startswith("lstm.") for name in spec["arrays"]) == spec["config"]["use_lstm"]
    assert set(zoo.available_models()) == set(w["models"]), "every shipped model is specified in the annex"
    with_lstm, without = w["models"]["nnc-lossless-1"], w["models"]["nnc-lossless-1-nolstm"]
    assert {k: v for k, v in with_lstm["arrays"].items() if not k.startswith("lstm.")} == without["arrays"]


# ---- section 5: pyramid, features, network ----------------------------------------------------------

def test_pyramid_constants():
    p = C["pyramid"]
    assert P.SCALES_PER_OCTAVE == p["scales_per_octave"]
    assert P.SCALE_INDEX_OFFSET == p["scale_index_offset"]
    assert P.NUM_SCALES == p["num_scales"]
    assert len(P.log_thresholds()) == p["threshold_count"]
    assert P.FEATURE_FRAC == p["feature_frac"]
    assert list(P.PHASES) == p["phases"]
    assert P.NEIGHBOURS == p["neighbours"]
    for phase, k in p["neighbours"].items():
        assert P.feature_channels(phase) == k + p["extra_feature_channels"]
    assert P.level_sizes(3, 3)[-1] == (2, 2) and P.level_sizes(2, 2) == [(2, 2)]
    assert max(P.level_sizes(70, 45)[-1]) <= p["base_max_side"]
    assert P.level_sizes(70, 45) == [(70, 45), (35, 23), (18, 12), (9, 6), (5, 3), (3, 2), (2, 1)]


def test_feature_channels_as_specified():
    """The last four feature channels: intensity, min(lu, 127), 8*min(level, 7), 4*bits."""
    p = C["pyramid"]
    a = torch.full((1, 3, 3), 1000, dtype=torch.int64)
    for level in (0, 9):
        ctx = P.StepContext("D", level, {"A": a}, torch.tensor([12]), P.log_thresholds())
        f = ctx.features[0, :, 0, 0].long().tolist()
        assert f[:4] == [0, 0, 0, 0]                                  # dev of a flat neighbourhood
        assert f[4] == 1000 * 64 // 2 ** 12
        assert f[5] == 0                                              # u = 1, floor(6*log2 1) = 0
        assert f[6] == p["level_channel_step"] * min(level, p["level_cap"])
        assert f[7] == p["bits_channel_step"] * 12


def test_context_lstm_constants():
    c = C["context_lstm"]
    assert CM.CONTEXT_LEVEL == c["context_level"]
    assert CM.HIDDEN == c["hidden"]
    assert CM.SUMMARY_CHANNELS == c["summary_channels"]
    lstm = CM.ContextLSTM(16)
    assert lstm.gates.cin == c["summary_channels"] + c["hidden"] and lstm.gates.cout == 4 * c["hidden"]


def test_layers_as_specified():
    spec = C["layers"]
    net = CM.ContextModel(width=16, use_lstm=True)
    seen = set()
    for name, m in net.named_modules():
        if not isinstance(m, Q.QConv):
            continue
        key = name.split(".", 2)[-1] if name.startswith("nets.") else ("lstm.proj" if ".proj." in name else name)
        s = spec[key]
        assert (m.k, m.in_frac, m.out_frac, m.act, m.out_clamp, m.in_max) == \
            (s["k"], s["in_frac"], s["out_frac"], s["act"], s["out_clamp"], s["in_max"]), name
        seen.add(key)
    assert seen == {k for k in spec if k not in ("leaky_shift", "exact_limit")}
    assert Q.LEAKY_SHIFT == spec["leaky_shift"]
    assert Q.FLOAT32_EXACT_LIMIT == spec["exact_limit"]


def test_qconv_integer_semantics():
    """forward_int equals the integer definition of section 5.6 (conv, floor requantisation, leaky, clamp)."""
    torch.manual_seed(0)
    layer = Q.QConv(3, 4, 3, in_frac=3)
    layer.export()
    x = torch.randint(-127, 128, (1, 3, 5, 6))
    got = layer.forward_int(x.float()).long()
    w, b, e = layer.w_int.long(), layer.b_int.long(), layer.e_int.long()
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    acc = b.view(1, -1, 1, 1).expand(1, 4, 5, 6).clone()
    for dy in range(3):
        for dx in range(3):
            acc += torch.einsum("nchw,oc->nohw", xp[:, :, dy:dy + 5, dx:dx + 6], w[:, :, dy, dx])
    y = torch.stack([acc[:, o] << s if s >= 0 else acc[:, o] >> -s
                     for o, s in enumerate((4 - 3 - e).tolist())], 1)
    y = torch.where(y >= 0, y, y >> 3).clamp(-127, 127)
    assert torch.equal(got, y)


# ---- section 4.3 / 5.3 / 5.10: tables, quantisation, range coder, symbol layout ---------------------

def test_entropy_constants():
    e = C["entropy"]
    model = zoo.load_model(FORMAT_V1_MODEL)
    t = model.tables
    assert entropy.QUARTERS == e["quarters"]
    assert entropy.FREQ_BITS == e["freq_bits"] and entropy.TAIL_UNITS == e["tail_units"]
    assert len(t.offsets) - 1 == e["table_count"] == P.NUM_SCALES * entropy.QUARTERS
    assert entropy.SCALE_ADJUST_BITS == e["scale_adjust_bits"]
    assert entropy.SCALE_ADJUST_ZERO == e["scale_adjust_zero"] == 1 << (e["scale_adjust_bits"] - 1)
    lengths = np.diff(t.offsets)
    zmax = t.zmax_of
    assert np.array_equal(lengths, eval(e["table_length"], {}, {"zmax": zmax}))  # noqa: S307 (our own file)
    assert zmax.min() >= e["min_zmax"]
    for j in range(P.NUM_SCALES):
        k = max(0, (j - P.SCALE_INDEX_OFFSET) // P.SCALES_PER_OCTAVE - e["low_bits_octave_offset"])
        assert entropy.low_bits(j) == k == t.k_of[j * entropy.QUARTERS]
        for f in range(entropy.QUARTERS):
            assert t.table_index(np.array([j]), np.array([f]))[0] == 4 * j + (f if k == 0 else 0)


def _spec_cdf(freqs) -> list[int]:
    """Section 5.3: constriction's fast quantisation to 24 bits, in binary64."""
    n = len(freqs)
    total = 0.0
    for x in freqs:
        total += float(x)
    scale = float((1 << 24) - n) / total
    cdf, cum = [], 0.0
    for i, x in enumerate(freqs):
        cdf.append(int(cum * scale) + i)
        cum += float(x)
    return cdf + [1 << 24]


def test_quantised_cdf_check_value():
    t = zoo.load_model(FORMAT_V1_MODEL).tables
    allc = []
    for i in range(len(t.offsets) - 1):
        cdf = _spec_cdf(t.freqs[t.offsets[i]:t.offsets[i + 1]].tolist())
        assert all(b > a for a, b in zip(cdf, cdf[1:]))
        allc += cdf
    assert hashlib.sha256(np.array(allc, dtype="<u4").tobytes()).hexdigest() == C["entropy"]["quantised_cdf_sha256"]


class _SpecRangeDecoder:
    """Section 5.3, written from the annex: u32 words, u64 state, 24-bit models."""
    M64 = (1 << 64) - 1

    def __init__(self, payload: bytes):
        self.words = list(struct.unpack(f"<{len(payload) // 4}I", payload))
        self.pos, self.lower, self.range, point, n = 0, 0, self.M64, 0, 0
        while n < 2 and self.pos < len(self.words):
            point, self.pos, n = (point << 32) | self.words[self.pos], self.pos + 1, n + 1
        self.point = point << 32 if n == 1 else point

    def decode(self, cdf):
        scale = self.range >> 24
        q = ((self.point - self.lower) & self.M64) // scale
        assert q < 1 << 24
        s = max(i for i in range(len(cdf) - 1) if cdf[i] <= q)
        self.lower = (self.lower + scale * cdf[s]) & self.M64
        self.range = scale * (cdf[s + 1] - cdf[s])
        if self.range < 1 << 32:
            self.lower = (self.lower << 32) & self.M64
            self.range <<= 32
            word = self.words[self.pos] if self.pos < len(self.words) else 0
            self.pos += 1
            self.point = ((self.point << 32) | word) & self.M64
        return s

    def uniform(self, m):
        return self.decode([s << (24 - m) for s in range((1 << m) + 1)])


def test_constriction_matches_the_annex_and_the_symbol_layout():
    """Residuals coded by the codec's StepEncoder (constriction) decode with the annex's range decoder,
    quantisation and symbol layout: adjustment, groups by table, symbols, low bits, escapes."""
    e = C["entropy"]
    tables = zoo.load_model(FORMAT_V1_MODEL).tables
    rng = np.random.default_rng(5)
    bits = 12
    n = 300
    j = rng.integers(0, P.NUM_SCALES, n)
    f = rng.integers(0, 4, n)
    r = np.round(rng.laplace(0, 2.0 ** ((j - 36) / 6))).astype(np.int64).clip(-(1 << bits), (1 << bits) - 1)
    j[::37], r[::37] = 10, (1 << bits) - 1                            # force escapes at both ends
    j[5::37], r[5::37] = 20, -(1 << bits)
    enc = entropy.StepEncoder(tables)
    enc.encode_uniform(np.array([7 + e["scale_adjust_zero"]]), e["scale_adjust_bits"])
    enc.encode_residuals(r, j, f, bits)
    payload = enc.finish()

    dec = _SpecRangeDecoder(payload)
    assert dec.uniform(e["scale_adjust_bits"]) - e["scale_adjust_zero"] == 7
    t = _spec_tables(j, f)
    _, out, escapes = _spec_decode_step(dec, tables, t, bits)
    assert escapes == len(r[::37]) + len(r[5::37])
    assert np.array_equal(out, r)


def _spec_tables(j, f) -> list[int]:
    """Section 5.10: table t = 4*j' + f, the quarter forced to 0 where k(j') > 0."""
    return [int(4 * jj + (ff if max(0, (jj - 36) // 6 - 2) == 0 else 0)) for jj, ff in zip(j, f)]


def _spec_decode_step(dec: "_SpecRangeDecoder", tables, t, bits):
    """Section 5.10 after the adjustment symbol: groups by table (stable), symbols, low bits, escapes.
    Returns (symbols, residuals, number of escapes), each list in the order of ``t``."""
    e = C["entropy"]
    n = len(t)
    syms_out, out, escapes = [0] * n, [0] * n, 0
    for table in sorted(set(t)):
        idx = [i for i in range(n) if t[i] == table]                  # raster order kept (stable)
        length = int(tables.offsets[table + 1] - tables.offsets[table])
        zmax = (length - 3) // 2
        k = max(0, (table // 4 - 36) // 6 - 2)
        cdf = _spec_cdf(tables.freqs[tables.offsets[table]:tables.offsets[table + 1]].tolist())
        syms = [dec.decode(cdf) for _ in idx]
        high = eval(e["escape_high_symbol"], {}, {"zmax": zmax})     # noqa: S307 (our own file)
        esc = [s in (e["escape_low_symbol"], high) for s in syms]
        vals = [(s - zmax - 1) << k for s in syms]
        if k:
            for q in range(len(idx)):
                if not esc[q]:
                    vals[q] += dec.uniform(k)
        for q in range(len(idx)):
            if esc[q]:
                width = eval(e["escape_value_bits"], {}, {"bits": bits})          # noqa: S307
                vals[q] = dec.uniform(width) - eval(e["escape_value_offset"], {}, {"bits": bits})  # noqa: S307
                escapes += 1
        for q, i in enumerate(idx):
            syms_out[i], out[i] = syms[q], vals[q]
    return syms_out, out, escapes


def test_near_lossless_shift():
    thresholds = zoo.load_model(FORMAT_V1_MODEL).net.thresholds
    for n, shift in C["near_lossless_shift"].items():
        assert pyramid_coder._nl_shift(int(n), thresholds) == shift == int(np.floor(6 * np.log2(2 * int(n) + 1) + 1e-9))


def test_verified_constriction_version_is_admitted_by_the_pin():
    """The annex restates constriction's coder as verified for one version; that version must be installable.
    (Behaviour of whichever version is installed is checked by the test above.)"""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (pin,) = re.findall(r'"constriction([^"]*)"', pyproject)
    verified = tuple(int(x) for x in C["entropy"]["constriction_verified"].split("."))
    for clause in filter(None, pin.split(",")):
        op, ver = re.match(r"\s*(>=|<=|==|~=|<|>)\s*([\d.*]+)", clause).groups()
        if ver.endswith(".*") or op == "~=":                          # prefix pins: ==0.5.*, ~=0.5.0
            prefix = tuple(int(x) for x in ver.rstrip(".*").split("."))[:None if op == "==" else -1]
            assert verified[:len(prefix)] == prefix, f"constriction {verified} is outside the pin {pin}"
            continue
        v = tuple(int(x) for x in ver.split("."))
        v = v + (0,) * (len(verified) - len(v))
        assert {">=": verified >= v, "<=": verified <= v, "<": verified < v, ">": verified > v,
                "==": verified == v}[op], f"constriction {verified} is outside the pin {pin}"


# ---- section 9: worked example ----------------------------------------------------------------------

def _example_format() -> PixelFormat:
    return PixelFormat(EX["rows"], EX["columns"], 1, EX["bits_allocated"], EX["bits_stored"],
                       bool(EX["pixel_representation"]), EX["photometric"])


def test_worked_example_bytes():
    img = np.array(EX["pixels"], dtype="<u2")
    fmt = _example_format()
    data = codec.encode_frame(img, fmt, max_error=EX["max_error"], model_id=EX["model_id"], device="cpu")
    assert data.hex() == EX["frame_hex"]
    h, payloads = B.unpack(data)
    assert h.header_size == EX["header_size"]
    assert h.pixel_crc == EX["pixel_crc"] == zlib.crc32(img.tobytes())
    assert int.from_bytes(data[h.size - 4:h.size], "little") == EX["frame_crc"]
    assert np.array_equal(codec.decode_frame(data, fmt, device="cpu"), img)
    dec = _SpecRangeDecoder(payloads[0])
    assert [dec.uniform(EX["bits_stored"]) for _ in range(4)] == EX["base"]
    assert dec.uniform(6) - 32 == EX["adjustments"]["D"]


def test_worked_example_trace():
    """The trace tables of section 9: loc, u, lu, mu4 and j from the code's network; m and s consistent
    with them (section 5.7); then the whole payload decoded with the annex's range decoder and symbol
    layout (sections 5.3, 5.9, 5.10), giving the listed adjustments, tables, symbols, residuals and pixels."""
    img = np.array(EX["pixels"], dtype=np.int64)
    bits = EX["bits_stored"]
    model = zoo.load_model(EX["model_id"])
    sizes = P.level_sizes(EX["rows"], EX["columns"])
    assert sizes == [(4, 4), (2, 2)]
    levels = P.level_images(torch.as_tensor(img)[None], sizes)
    seen = {}

    def code_step(phase, level, pred, mask):
        assert level == 0 and bool(mask.all())                        # every position of this example is coded
        seen[phase] = {"loc": pred.ctx.loc, "u": pred.ctx.u, "lu": pred.ctx.lu, "mu4": pred.mu4, "j": pred.j}
        return P.split_phases(levels[level], sizes[level + 1])[phase]

    with torch.no_grad():
        CM.PyramidRun(model.net, torch.tensor([bits]), sizes, integer=True).run(levels[-1], code_step)
    maxv = (1 << bits) - 1
    for phase in P.PHASES:
        st = EX["steps"][phase]
        for key in ("loc", "u", "lu", "mu4", "j"):
            assert seen[phase][key][0].flatten().tolist() == st[key], (phase, key)
        for q in range(4):
            loc, u, lu, m, s = (st[k][q] for k in ("loc", "u", "lu", "m", "s"))
            assert st["mu4"][q] == min(max(4 * loc + (m * u) // 4, 0), 4 * maxv)
            assert st["j"][q] == min(max(lu + 36 + (6 * s + 8) // 16, 0), 132)

    data = bytes.fromhex(EX["frame_hex"])
    _, payloads = B.unpack(data)
    dec = _SpecRangeDecoder(payloads[0])
    base = [dec.uniform(bits) for _ in range(4)]
    assert base == EX["base"] == img[0::2, 0::2].flatten().tolist()
    grids = {"B": img[0::2, 1::2], "C": img[1::2, 0::2], "D": img[1::2, 1::2]}
    for phase in P.PHASES:
        st = EX["steps"][phase]
        d = dec.uniform(6) - 32
        assert d == EX["adjustments"][phase]
        jp = [min(max(j + d, 0), 132) for j in st["j"]]
        t = _spec_tables(jp, [mu4 % 4 for mu4 in st["mu4"]])
        assert t == st["table"], phase
        syms, r, escapes = _spec_decode_step(dec, model.tables, t, bits)
        assert (syms, r, escapes) == (st["symbol"], st["r"], 0), phase
        assert [mu4 // 4 + rr for mu4, rr in zip(st["mu4"], r)] == grids[phase].flatten().tolist(), phase


@pytest.mark.parametrize("model_id", sorted(EX["other_models"]))
def test_worked_example_with_other_models(model_id):
    spec = EX["other_models"][model_id]
    img = np.array(EX["pixels"], dtype="<u2")
    fmt = _example_format()
    data = codec.encode_frame(img, fmt, max_error=EX["max_error"], model_id=model_id, device="cpu")
    assert data.hex() == spec["frame_hex"]
    h, _ = B.unpack(data)
    assert h.model_id == model_id and h.header_size == spec["header_size"] == 55 + len(model_id) + 4
    assert h.pixel_crc == EX["pixel_crc"]
    assert int.from_bytes(data[h.size - 4:h.size], "little") == spec["frame_crc"]
    assert len(data) == h.size + (len(model_id) % 2 == 0)                  # pad byte exactly when n is even
    assert np.array_equal(codec.decode_frame(data, fmt, device="cpu"), img)


# ---- section 4.2 / 11.8: LUTs ------------------------------------------------------------------------

def _lut(name: str) -> np.ndarray:
    spec = C["luts"][name]
    i = np.arange(spec["size"], dtype=np.float64)
    env = {"i": i, "floor": np.floor, "tanh": np.tanh, "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v))}
    return eval(spec["formula"], {}, env).astype(np.int64)          # noqa: S307 (our own file)


def test_lut_formulas():
    """Every LUT of every shipped weights file, and the cell's own tables, follow the formulas stated."""
    cell = Q.QConvLSTM(2, 2)
    seen = 0
    for name in C["luts"]:
        want = _lut(name)
        assert np.array_equal(getattr(cell, name).numpy(), want), name
        for model_id in C["weights"]["models"]:
            _, arrays = _spec_read_weights(zoo.available_models()[model_id].read_bytes())
            for key, arr in arrays.items():
                if key.endswith("." + name):
                    assert np.array_equal(arr.astype(np.int64), want), key
                    seen += 1
    assert seen == 3 * (1 + 4)        # nnc-lossless-1 has one cell, nnc-lossy-1 four


# ---- section 11: lossy mode --------------------------------------------------------------------------

LY = C["lossy"]


def test_lossy_constants():
    assert B.MODE_LOSSY == LY["mode"] == C["frame"]["modes"]["lossy"]
    assert (R.BLOCK, R.BITS_PER_BLOCK, R.ITERATIONS) == (LY["block"], LY["bits_per_block"], LY["iterations"])
    assert list(R.GAIN_SHIFT) == LY["gain_shift"] and len(R.GAIN_SHIFT) == R.ITERATIONS
    assert (R.RECON_FRAC, R.OUT_FRAC, R.OUT_CLAMP) == (LY["recon_frac"], LY["out_frac"], LY["out_clamp"])
    assert zoo.RNN_CONV_KIND == LY["kind"]
    cfg = C["weights"]["models"][zoo.DEFAULT_LOSSY_MODEL]["config"]
    assert zoo._rnnconv_config(cfg["width"]) == cfg and sorted(cfg) == LY["config_keys"]
    assert [struct.calcsize("<" + c) for c in lossy.PRELUDE.format.lstrip("<")] == [n for _, n in LY["prelude"]]
    assert lossy.PRELUDE.size == 8
    assert LY["contexts"] == R.ITERATIONS * R.BITS_PER_BLOCK * 3
    assert entropy.BIT_PROB_BITS == LY["bit_prob_bits"]
    assert (entropy.BIT_PROB_MIN, entropy.BIT_PROB_MAX) == (LY["bit_prob_min"], LY["bit_prob_max"])
    probs = zoo.load_model(zoo.DEFAULT_LOSSY_MODEL).tables.probs
    assert probs.shape == (LY["contexts"],) and probs.min() >= LY["bit_prob_min"] and probs.max() <= LY["bit_prob_max"]
    rc = LY["rate_control"]
    assert (codec.MIN_RATIO, codec.MAX_RATIO) == (rc["min_ratio"], rc["max_ratio"])
    assert entropy.COST_ONE == 1024
    for size in (1, 15, 16, 17, 33, 65535):
        assert lossy.padded_shape(size, size)[0] == eval(LY["padded_size"], {}, {"size": size})  # noqa: S307


def test_frame_overhead_counts_the_pad_byte():
    """Section 11.9 step 2: header, payload lengths, frame CRC and the pad byte (present when n is even)."""
    for model_id in ("nnc-lossy-1", "nnc-lossless-1", "x", "xy"):
        for planes in (1, 3):
            n = len(model_id)
            payloads = [b"\x00" * 8] * planes
            h = B.FrameHeader(B.MODE_LOSSY, 0, model_id, bytes(32), 1, 1, planes, 8, 8, False, 0, 0, ())
            assert B.header_size(model_id, planes) == len(B.pack(h, payloads)) - 8 * planes \
                == 55 + n + 4 * planes + 4 + (n % 2 == 0)


def test_mode_2_header_checks():
    """Section 2.4 checks 3, 8 and 10 for mode 2."""
    def frame(mode, max_error=0, spp=1, transform=0):
        h = B.FrameHeader(mode, max_error, "m", bytes(32), 1, 1, spp, 8, 8, False, transform, 0, ())
        return B.pack(h, [b"\x00" * 8] * spp)

    assert B.read_header(frame(2)).mode == B.MODE_LOSSY
    with pytest.raises(BitstreamError, match="^unknown coding mode 3$"):
        B.read_header(frame(3))
    with pytest.raises(BitstreamError, match="^corrupt frame header: lossy frame with a maximum error$"):
        B.read_header(frame(2, max_error=1))
    with pytest.raises(BitstreamError, match="colour transform only applies to lossless 3-sample frames"):
        B.read_header(frame(2, spp=3, transform=1))


def test_lossy_layers_as_specified():
    """Section 11.5 (layer parameters, cell sizes) and 11.8 (array names, shapes, dtypes) for any width."""
    for width in (16, 32):
        env = {"W": width}
        hidden, cins = (eval(LY[k], {}, env) for k in ("hidden", "cell_inputs"))          # noqa: S307
        enc_hidden, enc_in = (eval(LY[k], {}, env) for k in ("encoder_hidden", "encoder_inputs"))  # noqa: S307
        net = R.RNNConvCodec(width)
        dec = net.decoder
        layers = {"d_in": dec.d_in, "out": dec.out, **{f"gates{k}": cell.gates for k, cell in enumerate(dec.rnn)}}
        for key, m in layers.items():
            s = LY["layers"]["gates" if key.startswith("gates") else key]
            assert (m.k, m.in_frac, m.out_frac, m.act, m.out_clamp, m.in_max) == \
                (s["k"], s["in_frac"], s["out_frac"], s["act"], s["out_clamp"], s["in_max"]), key
        assert [cell.hidden for cell in dec.rnn] == hidden
        expected = {"decoder.d_in.w_int": [width, 160, 1, 1], "decoder.d_in.b_int": [width],
                    "decoder.d_in.e_int": [width], "decoder.out.w_int": [1, width // 8, 3, 3],
                    "decoder.out.b_int": [1], "decoder.out.e_int": [1],
                    "encoder.front_conv.weight": [width // 2, 1, 3, 3], "encoder.front_conv.bias": [width // 2],
                    "encoder.front_pool_conv.weight": [width // 2, 1, 1, 1],
                    "encoder.front_pool_conv.bias": [width // 2],
                    "encoder.bottleneck.weight": [160, 4 * width, 1, 1], "encoder.bottleneck.bias": [160]}
        for k, (h, i) in enumerate(zip(hidden, cins)):
            expected |= {f"decoder.rnn.{k}.gates.w_int": [4 * h, i + h, 3, 3], f"decoder.rnn.{k}.gates.b_int": [4 * h],
                         f"decoder.rnn.{k}.gates.e_int": [4 * h], f"decoder.rnn.{k}.sig_lut": [255],
                         f"decoder.rnn.{k}.tanh_z_lut": [255], f"decoder.rnn.{k}.tanh_c_lut": [2047]}
        for j, (h, i) in enumerate(zip(enc_hidden, enc_in)):
            expected |= {f"encoder.rnn.{j}.x_conv.weight": [4 * h, i, 3, 3], f"encoder.rnn.{j}.x_conv.bias": [4 * h],
                         f"encoder.rnn.{j}.h_conv.weight": [4 * h, h, 1, 1]}
        exported = {k: list(v.shape) for k, v in net.state_dict().items()
                    if k.startswith("encoder.") or k.endswith(("w_int", "b_int", "e_int", "_lut"))}
        assert exported == expected, width
        if width == C["weights"]["models"][zoo.DEFAULT_LOSSY_MODEL]["config"]["width"]:
            shipped = C["weights"]["models"][zoo.DEFAULT_LOSSY_MODEL]["arrays"]
            assert {k: v[1] for k, v in shipped.items()} == expected | {"tables.bit_probs": [LY["contexts"]]}


def test_lossy_formulas():
    """depth_to_space, the per-iteration increment, the pixel formula (sections 11.5, 11.6)."""
    x = torch.arange(4 * 3 * 2 * 5).reshape(1, 12, 2, 5)
    got = torch.nn.functional.pixel_shuffle(x, 2)[0]
    lhs, rhs = LY["depth_to_space"].split(" = ")
    for j in range(3):
        for y in range(2):
            for xx in range(5):
                for a in range(2):
                    for b in range(2):
                        env = {"j": j, "y": y, "x": xx, "a": a, "b": b}
                        out_idx = tuple(eval(lhs.replace("out", ""), {}, env))   # noqa: S307
                        in_idx = tuple(eval(rhs.replace("in", ""), {}, env))     # noqa: S307
                        assert got[out_idx] == x[0][in_idx]
    y = torch.arange(-32767, 32768, 4097, dtype=torch.float32)
    for t in range(R.ITERATIONS):
        want = eval(LY["recon_increment"], {}, {"y": y.long(), "recon_frac": R.RECON_FRAC,  # noqa: S307
                                                  "out_frac": R.OUT_FRAC, "gain_shift": R.GAIN_SHIFT, "t": t})
        assert torch.equal(R.recon_increment(y, t).long(), want)
    rng = np.random.default_rng(2)
    recon = torch.as_tensor(rng.integers(-(1 << 21), 1 << 21, (4, 7, 9)))
    recon[:, 0, :3] = torch.tensor([-(1 << 15) - 1, -(1 << 15), (1 << 15) - 1])
    lo = torch.tensor([0, 0, 1000, 7])
    span = torch.tensor([65536, 1, 3000, 256])
    got = R.pixels_of(recon, lo, span)
    for n in range(4):
        for v_recon, v in zip(recon[n].flatten().tolist(), got[n].flatten().tolist()):
            env = {"lo": int(lo[n]), "span": int(span[n]), "recon": v_recon, "min": min, "max": max}
            assert v == eval(LY["pixel"], {}, env)                        # noqa: S307


def test_lossy_context_and_order():
    """Section 11.3: BitTables.contexts is the stated formula, and _groups orders by (context, index)."""
    rng = np.random.default_rng(4)
    nbits, positions = R.BITS_PER_BLOCK, 6
    for t, depth in ((0, 160), (0, 37), (3, 160), (7, 5)):
        prev = None if t == 0 else rng.choice([-1, 1], (nbits, 2, 3))
        ctx = entropy.BitTables.contexts(t, prev, depth, nbits, positions)
        want = []
        for c in range(depth):
            for q in range(positions):
                s = 0 if t == 0 else (1 if prev[c].reshape(-1)[q] < 0 else 2)
                want.append(eval(LY["context"], {}, {"bits_per_block": nbits, "t": t, "c": c, "s": s}))  # noqa: S307
        assert ctx.tolist() == want
        order = [int(i) for _, idx in entropy._groups(ctx) for i in idx]
        assert order == sorted(range(len(want)), key=lambda i: (want[i], i))


def _spec_cdf1(p: int) -> int:
    return eval(LY["binary_cdf1"], {}, {"p": p})                          # noqa: S307


def test_binary_model_quantisation():
    """Section 11.4: the integer c1 equals the quantisation of section 5.3 for every allowed p."""
    for p in range(LY["bit_prob_min"], LY["bit_prob_max"] + 1):
        assert _spec_cdf([(1 << 16) - p, p]) == [0, _spec_cdf1(p), 1 << 24], p


def test_lossy_payload_checks():
    """Section 11.2: the prelude checks and their messages."""
    m = zoo.load_model(zoo.DEFAULT_LOSSY_MODEL)
    dec = lossy.LossyPlanes(m, torch.device("cpu"))
    good = lossy.PRELUDE.pack(10, 20, 1, 1, 0) + b"\x00" * 4
    assert dec.decode([good], 5, 5, [8]).shape == (1, 5, 5)
    with pytest.raises(BitstreamError, match="^truncated lossy payload$"):
        dec.decode([good[:7]], 5, 5, [8])
    for lo, hi, k, d, reserved in ((10, 9, 1, 1, 0), (0, 0, 0, 1, 0), (0, 0, LY["iterations"] + 1, 1, 0),
                                   (0, 0, 1, 0, 0), (0, 0, 1, LY["bits_per_block"] + 1, 0), (0, 0, 1, 1, 1),
                                   (0, 256, 1, 1, 0)):
        with pytest.raises(BitstreamError, match="^corrupt lossy payload header$"):
            dec.decode([good, lossy.PRELUDE.pack(lo, hi, k, d, reserved) + b"\x00" * 4], 5, 5, [8, 8])


# ---- a mode-2 decoder written from section 11 alone (numpy and Python integers) --------------------

def _spec_read_weights(data: bytes):
    """Section 4.1: header and arrays of a weights file."""
    header = _weights_header(data)
    base = len(zoo.MAGIC) + 4 + struct.unpack_from("<I", data, len(zoo.MAGIC))[0]
    arrays = {}
    for a in header["arrays"]:
        count = int(np.prod(a["shape"])) if a["shape"] else 1
        arrays[a["name"]] = np.frombuffer(data, np.dtype(a["dtype"]), count, base + a["offset"]).reshape(a["shape"])
    return header, arrays


def _spec_qconv(x, arrays, name, layer):
    """Section 5.6 on int64 arrays (channels, h, w)."""
    s = LY["layers"][layer]
    w, b, e = (arrays[f"{name}.{p}_int"].astype(np.int64) for p in "wbe")
    cout, cin, k, _ = w.shape
    pad = k // 2
    _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    cols = np.stack([xp[:, dy:dy + h, dx:dx + wd] for dy in range(k) for dx in range(k)], 1).reshape(cin * k * k, -1)
    acc = (w.reshape(cout, -1) @ cols).reshape(cout, h, wd) + b[:, None, None]
    sh = (s["out_frac"] - s["in_frac"] - e)[:, None, None]
    y = np.where(sh >= 0, acc << np.maximum(sh, 0), acc >> np.maximum(-sh, 0))
    if s["act"] == "leaky":
        y = np.maximum(y, y >> 3)
    return np.clip(y, -s["out_clamp"], s["out_clamp"])


def _spec_depth_to_space(x):
    out = np.empty((x.shape[0] // 4, 2 * x.shape[1], 2 * x.shape[2]), dtype=x.dtype)
    for a in range(2):
        for b in range(2):
            out[:, a::2, b::2] = x[2 * a + b::4]
    return out


def _spec_cell(arrays, k, x, h, c):
    hid = h.shape[0]
    z = _spec_qconv(np.concatenate([x, h]), arrays, f"decoder.rnn.{k}.gates", "gates") + 127
    sig, tanh_z, tanh_c = (arrays[f"decoder.rnn.{k}.{n}"].astype(np.int64) for n in ("sig_lut", "tanh_z_lut",
                                                                                     "tanh_c_lut"))
    i, f, o, g = sig[z[:hid]], sig[z[hid:2 * hid]], sig[z[2 * hid:3 * hid]], tanh_z[z[3 * hid:]]
    c = np.clip((f * c + i * g) >> 7, -1023, 1023)
    return (o * tanh_c[c + 1023]) >> 7, c


def _spec_decode_lossy_plane(payload: bytes, rows: int, cols: int, config: dict, arrays: dict) -> np.ndarray:
    """Sections 11.2 to 11.6."""
    nbits, gain = config["bits_per_block"], config["gain_shift"]
    lo, hi, k_iter, depth_last, reserved = struct.unpack_from("<HHBBH", payload)
    assert reserved == 0 and 1 <= k_iter <= config["iterations"] and 1 <= depth_last <= nbits and lo <= hi
    span = hi - lo + 1
    hb, wb = -(-rows // 16), -(-cols // 16)
    nb = hb * wb
    width = config["width"]
    hidden = [4 * width, 2 * width, width, width // 2]
    state = [(np.zeros((h, hb << k, wb << k), np.int64),) * 2 for k, h in enumerate(hidden)]
    recon = np.zeros((16 * hb, 16 * wb), np.int64)
    probs = arrays["tables.bit_probs"].astype(np.int64)
    dec = _SpecRangeDecoder(payload[8:])
    prev = None
    for t in range(k_iter):
        depth = nbits if t < k_iter - 1 else depth_last
        bits = np.zeros(nbits * nb, np.int64)
        ctx = [3 * (nbits * t + i // nb) + (0 if t == 0 else (1 if prev[i] < 0 else 2)) for i in range(depth * nb)]
        for i in sorted(range(depth * nb), key=lambda i: (ctx[i], i)):
            p = int(probs[ctx[i]])
            bits[i] = 1 if dec.decode([0, (65536 - p) * ((1 << 24) - 2) // (1 << 16) + 1, 1 << 24]) else -1
        prev = bits
        x = _spec_qconv(bits.reshape(nbits, hb, wb), arrays, "decoder.d_in", "d_in")
        new = []
        for k in range(4):
            h, c = _spec_cell(arrays, k, x, *state[k])
            new.append((h, c))
            x = _spec_depth_to_space(h)
        state = new
        y = _spec_qconv(x, arrays, "decoder.out", "out")[0]
        recon = recon + y * (1 << (16 - 12 - gain[t]))
    v = (np.maximum(recon + (1 << 15), 0) * span) >> 16
    return (lo + np.minimum(v, span - 1))[:rows, :cols]


def _spec_lossy_weights():
    header, arrays = _spec_read_weights(zoo.available_models()[zoo.DEFAULT_LOSSY_MODEL].read_bytes())
    return header["config"], arrays


def test_spec_decoder_decodes_reference_frames():
    """Frames of the reference encoder (grey, signed, RGB; sizes not multiples of 16) decode with the
    annex's decoder to the reference decoder's pixels, whose CRC-32 is pixel_crc; each frame meets its
    ratio (section 11.9) and carries the attributes' method value."""
    config, arrays = _spec_lossy_weights()
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:40, 0:53]
    smooth = 1000 + 300 * np.sin(xx / 7) + 200 * np.cos(yy / 5)
    cases = [
        (PixelFormat(37, 53, 1, 16, 12, False, "MONOCHROME2"), (smooth[:37] + rng.normal(0, 5, (37, 53))), (4, 12)),
        (PixelFormat(21, 35, 1, 16, 16, True, "MONOCHROME2"), (smooth[:21, :35] - 1500) * 9, (6,)),
        (PixelFormat(24, 40, 3, 8, 8, False, "RGB"),
         np.stack([smooth[:24, :40] / 8 - 50, smooth[:24, :40] / 10, 255 - smooth[:24, :40] / 9], -1), (5,)),
    ]
    decoded = 0
    for fmt, img, ratios in cases:
        img = np.asarray(np.round(img)).astype(fmt.dtype)
        for ratio in ratios:
            try:
                data = codec.encode_frame(img, fmt, ratio=ratio, device="cpu")
            except UnsupportedPixelData:
                continue
            raw = fmt.rows * fmt.columns * fmt.samples_per_pixel * fmt.bits_allocated // 8
            h, payloads = B.unpack(data)
            full = any(lossy.PRELUDE.unpack_from(p)[2:4] == (R.ITERATIONS, R.BITS_PER_BLOCK) for p in payloads)
            assert len(data) <= raw // ratio or full          # section 11.9; the exception: section 8.3 item 8
            assert (h.mode, h.max_error, h.transform) == (LY["mode"], 0, 0)
            assert D.lossy_method([data]) == C["rnn_conv_lossy_image_compression_method"]
            planes = [_spec_decode_lossy_plane(p, fmt.rows, fmt.columns, config, arrays) for p in payloads]
            b = fmt.bits_stored
            if fmt.samples_per_pixel == 1:                                # section 3.4, colour_transform 0
                frame = planes[0] - (1 << (b - 1)) if fmt.signed else planes[0]
            else:
                frame = np.stack(planes, -1)
            frame = frame.astype(fmt.dtype)
            assert zlib.crc32(frame.tobytes()) == h.pixel_crc
            assert np.array_equal(frame, codec.decode_frame(data, fmt, device="cpu"))
            decoded += 1
    assert decoded >= 3


def test_spec_decoder_on_every_iteration():
    """Payloads with all eight iterations and a partial last one, every context used, and planes of
    different K decoded together by the reference: the annex's decoder gives the same pixels."""
    config, arrays = _spec_lossy_weights()
    model = zoo.load_model(zoo.DEFAULT_LOSSY_MODEL)
    rng = np.random.default_rng(1)
    rows, cols = 33, 20
    hb, wb = -(-rows // 16), -(-cols // 16)
    plans = [lossy.PlanePlan(100, 4000, 8, 37), lossy.PlanePlan(0, 255, 3, 160), lossy.PlanePlan(7, 7, 1, 1),
             lossy.PlanePlan(0, 65535, 2, 159)]
    payloads = []
    for plan in plans:
        codes = [(rng.random((R.BITS_PER_BLOCK, hb, wb)) < rng.random((R.BITS_PER_BLOCK, 1, 1))).astype(np.int64)
                 for _ in range(plan.iterations)]
        payloads.append(lossy._payload(model.tables, plan, codes))
    ref = lossy.LossyPlanes(model, torch.device("cpu")).decode(payloads, rows, cols, [16] * len(payloads))
    for i, p in enumerate(payloads):
        assert np.array_equal(_spec_decode_lossy_plane(p, rows, cols, config, arrays), ref[i]), i
