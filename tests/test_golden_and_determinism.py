"""Committed golden bitstreams decode to their recorded pixels, whatever the thread count and batch size;
the encoder reproduces them byte for byte; the shipped weights are exact in float32."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_nncodec import bitstream as B
from dicom_nncodec import codec, zoo
from dicom_nncodec.models.quant import FLOAT32_EXACT_LIMIT, QConv

from .golden.sources import SOURCES, is_lossy

GOLDEN = Path(__file__).parent / "golden"
INDEX = json.loads((GOLDEN / "golden.json").read_text())


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _frames(name):
    return [(GOLDEN / f["file"]).read_bytes() for f in INDEX[name]["frames"]]


@pytest.mark.parametrize("name", sorted(INDEX))
@pytest.mark.parametrize("threads", [1, 2])
def test_golden_decodes_to_recorded_pixels(name, threads):
    torch.set_num_threads(threads)
    _, fmt, _, _ = SOURCES[name]
    out = codec.decode_frames(_frames(name), fmt)
    assert [_sha(o) for o in out] == [f["pixels_sha256"] for f in INDEX[name]["frames"]]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("name", ["emri_small_12u_3frames", "emri_small_lossy_3frames_ratio_6"])
def test_batch_size_does_not_change_pixels(batch_size, name):
    _, fmt, _, _ = SOURCES[name]
    out = codec.decode_frames(_frames(name), fmt, batch_size=batch_size)
    assert [_sha(o) for o in out] == [f["pixels_sha256"] for f in INDEX[name]["frames"]]


@pytest.mark.parametrize("name", sorted(n for n in INDEX if not is_lossy(SOURCES[n][2])))
def test_encoder_reproduces_golden_bytes(name):
    """Lossless and near-lossless encoders are integer-exact, so their bytes are reproducible too
    (the RNN-Conv encoder is float: any codes it picks are valid, its decoding is what is fixed)."""
    frames, fmt, options, model_id = SOURCES[name]
    assert codec.encode_frames(frames(), fmt, model_id=model_id, **options) == _frames(name)


def test_every_source_has_golden_frames():
    assert set(SOURCES) == set(INDEX)


def test_lossless_golden_equals_source_pixels():
    for name, (frames, fmt, options, _) in SOURCES.items():
        if options:
            continue
        assert [_sha(f.astype(fmt.dtype)) for f in frames()] == [f["pixels_sha256"] for f in INDEX[name]["frames"]]


def test_golden_names_a_shipped_model():
    for name in INDEX:
        h = B.read_header(_frames(name)[0])
        model = zoo.load_model(h.model_id, h.digest)
        assert model.digest == h.digest


@pytest.mark.parametrize("model_id", sorted(zoo.available_models()))
def test_shipped_weights_are_exact_in_float32(model_id):
    """Every partial sum of every layer stays below 2**24 for any admissible input."""
    net = zoo.load_model(model_id).net
    layers = [m for m in net.modules() if isinstance(m, QConv)]
    assert layers
    for m in layers:
        bound = m.w_int.abs().flatten(1).sum(1) * m.in_max + m.b_int.abs()
        assert float(bound.max()) < FLOAT32_EXACT_LIMIT
        assert torch.equal(m.w_int, m.w_int.round()) and float(m.w_int.abs().max()) <= 127
