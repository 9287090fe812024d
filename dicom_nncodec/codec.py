"""Frames in, bytes out, and back: the learned codec behind both transfer syntaxes.

This module dispatches by mode and format version, writes and checks the frame
header and the pixel CRC; the coding itself lives in its own rooms, imported
when a frame needs them (so ``import dicom_nncodec`` and reading a header stay
light):

* format version 2, lossless: the compiled engine (``engine/``, numba);
* format version 1, lossless and near-lossless: the torch pyramid (``pyramid_coder``);
* lossy: the RNN-Conv model (``lossy``).

Results never depend on the batch or the thread count: every plane has its own
coded stream and every number that reaches a coder is an integer computed exactly.

Thread safety: encode and decode may run in several threads at once; models,
networks and probability tables are shared read-only.

Modes: lossless; near-lossless with a guaranteed maximum absolute error
``max_error`` (residuals quantised with step 2*max_error+1, as JPEG-LS NEAR);
and lossy at a requested compression ``ratio`` with the RNN-Conv model
(``lossy.py``).
"""
from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np

from . import bitstream as B
from .errors import BitstreamError, NNCodecError, UnsupportedPixelData
from .pixels import PixelFormat, from_planes, to_planes
from .zoo import NEAR_LOSSLESS_MODEL, LoadedModel, default_lossy_model, default_model, load_model

MAX_NEAR_LOSSLESS_ERROR = B.MAX_ERROR
DEFAULT_BATCH = 8


def resolve_device(device):
    """The torch device the version-1 and lossy networks run on.  ``auto`` picks CUDA when present.
    On CUDA, TF32 and non-deterministic algorithms are switched off: the integer-valued float32
    convolutions are exact only in IEEE float32."""
    import torch
    name = str(device or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NNCodecError("device 'cuda' requested but no CUDA device is available")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return dev


def pixel_crc(frame: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(frame).tobytes())


def _frame(mode: int, max_error: int, model: LoadedModel, fmt: PixelFormat, transform: int, decoded: np.ndarray,
           payloads: Sequence[bytes]) -> bytes:
    """One coded frame: the header (mode, the model's id, digest and format version, the pixel
    description, the CRC-32 of what every decoder reproduces) and its plane payloads."""
    header = B.FrameHeader(mode, max_error, model.model_id, model.digest, fmt.rows, fmt.columns,
                           fmt.samples_per_pixel, fmt.bits_allocated, fmt.bits_stored, fmt.signed, transform,
                           pixel_crc(decoded), (), version=model.format_version)
    return B.pack(header, payloads)


def encode_frames(frames: Iterable[np.ndarray], fmt: PixelFormat, *, max_error: int = 0,
                  ratio: float | None = None, model_id: str | None = None, device="auto",
                  batch_size: int = DEFAULT_BATCH) -> list[bytes]:
    """Encode frames (each (rows, cols) or (rows, cols, 3)) of one pixel format.

    ``ratio``: lossy, each frame at or up to 10 % above this compression ratio (uncompressed
    bytes at Bits Allocated over frame bytes); exclusive with ``max_error``."""
    fmt.validate()
    if (max_error or ratio is not None) and fmt.photometric == "PALETTE COLOR":
        raise UnsupportedPixelData("PALETTE COLOR is coded losslessly only: an index off by any amount is "
                                   "another colour")
    if ratio is not None:
        if max_error:
            raise UnsupportedPixelData("ratio and max_error exclude each other")
        return _encode_lossy(list(frames), fmt, float(ratio), model_id, device, batch_size)
    if not 0 <= int(max_error) <= MAX_NEAR_LOSSLESS_ERROR:
        raise UnsupportedPixelData(f"max_error must be between 0 and {MAX_NEAR_LOSSLESS_ERROR}")
    max_error = int(max_error)
    model = load_model(model_id or (NEAR_LOSSLESS_MODEL if max_error else default_model()))
    if model.lossy:
        raise UnsupportedPixelData(f"model {model.model_id!r} is lossy; it needs ratio=")
    transform = fmt.coding_transform(max_error)
    bits = np.array(fmt.plane_bits(transform), dtype=np.int64)
    frames = list(frames)
    if model.format_version == 2:
        if max_error:
            raise UnsupportedPixelData(f"model {model.model_id!r} codes lossless only; near-lossless max_error "
                                       f"is coded by {NEAR_LOSSLESS_MODEL!r}")
        return _encode_engine(frames, fmt, model, transform, bits)
    import torch
    from .pyramid_coder import PlaneBatch
    dev = resolve_device(device)
    out: list[bytes] = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        planes = np.concatenate([to_planes(f, fmt, transform) for f in chunk])           # (n*P, rows, cols)
        batch = PlaneBatch(model, dev, np.tile(bits, len(chunk)), (fmt.rows, fmt.columns), max_error)
        payloads, recon = batch.encode(torch.as_tensor(planes, dtype=torch.int64, device=dev))
        recon = recon.cpu().numpy()
        if max_error and np.abs(recon - planes).max(initial=0) > max_error:
            raise NNCodecError("internal error: near-lossless reconstruction exceeds the bound")
        if not max_error and not np.array_equal(recon, planes):
            raise NNCodecError("internal error: lossless reconstruction differs")
        p = len(bits)
        for i, f in enumerate(chunk):
            decoded = from_planes(recon[i * p:(i + 1) * p], fmt, transform)
            out.append(_frame(B.MODE_NEAR_LOSSLESS if max_error else B.MODE_LOSSLESS, max_error, model, fmt,
                              transform, decoded, payloads[i * p:(i + 1) * p]))
    return out


def _encode_engine(frames: list[np.ndarray], fmt: PixelFormat, model: LoadedModel, transform: int,
                   bits: np.ndarray) -> list[bytes]:
    """Lossless frames in format version 2: every plane of every frame through the compiled engine,
    in parallel threads."""
    from .engine import planes as EP
    p = len(bits)
    planes = [pl for f in frames for pl in to_planes(f, fmt, transform)]
    payloads = EP.encode_planes(planes, [int(b) for b in bits] * len(frames), model.engine)
    out = []
    for i, f in enumerate(frames):
        decoded = from_planes(np.stack(planes[i * p:(i + 1) * p]), fmt, transform)
        out.append(_frame(B.MODE_LOSSLESS, 0, model, fmt, transform, decoded, payloads[i * p:(i + 1) * p]))
    return out


MIN_RATIO = 1.5
MAX_RATIO = 1000.0
LOSSY_RATIO_TOLERANCE = 1.1      # a lossy frame's ratio is in [ratio, 1.1 * ratio]


def _encode_lossy(frames: list[np.ndarray], fmt: PixelFormat, ratio: float, model_id: str | None, device,
                  batch_size: int) -> list[bytes]:
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        raise UnsupportedPixelData(f"ratio must be between {MIN_RATIO} and {MAX_RATIO:.0f}")
    model = load_model(model_id or default_lossy_model())
    if not model.lossy:
        raise UnsupportedPixelData(f"model {model.model_id!r} is lossless; ratio= needs a lossy model")
    dev = resolve_device(device)
    transform = fmt.coding_transform(1)
    bits = fmt.plane_bits(transform)
    p = len(bits)
    raw = fmt.frame_bytes
    overhead = B.header_size(model.model_id, p)
    budget = int(raw / ratio) - overhead
    if budget < 16 * p:
        raise UnsupportedPixelData(f"ratio {ratio:g} leaves {int(raw / ratio)} bytes for a {fmt.rows}x{fmt.columns} "
                                   f"frame whose header alone takes {overhead}; choose a lower ratio")
    per_plane = [(budget // p) & ~3 for _ in range(p)]
    from .lossy import LossyPlanes
    coder = LossyPlanes(model, dev)
    out: list[bytes] = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        planes = np.concatenate([to_planes(f, fmt, transform) for f in chunk])
        payloads = coder.encode(planes, per_plane * len(chunk))
        recon = coder.decode(payloads, fmt.rows, fmt.columns, bits * len(chunk))   # what every decoder produces
        for i, f in enumerate(chunk):
            decoded = from_planes(recon[i * p:(i + 1) * p], fmt, transform)
            frame = _frame(B.MODE_LOSSY, 0, model, fmt, transform, decoded, payloads[i * p:(i + 1) * p])
            if raw / len(frame) > LOSSY_RATIO_TOLERANCE * ratio:
                raise UnsupportedPixelData(
                    f"ratio {ratio:g} is below what the lossy model reaches on this image (its finest coding "
                    f"gives {raw / len(frame):.2f}); choose a higher ratio, or near-lossless max_error")
            out.append(frame)
    return out


def encode_frame(frame: np.ndarray, fmt: PixelFormat, **kw) -> bytes:
    return encode_frames([frame], fmt, **kw)[0]


def frame_format(h: B.FrameHeader) -> PixelFormat:
    """The pixel format a frame header describes (the colour transform decides RGB or YBR_FULL)."""
    photometric = "RGB" if h.transform else ("YBR_FULL" if h.samples_per_pixel == 3 else "MONOCHROME2")
    return PixelFormat(h.rows, h.columns, h.samples_per_pixel, h.bits_allocated, h.bits_stored, h.signed, photometric)


def check_matches(h: B.FrameHeader, fmt: PixelFormat | None) -> None:
    """Refuse a frame whose description contradicts the dataset's (a foreign or misplaced frame)."""
    if fmt is None:
        return
    mine = (h.rows, h.columns, h.samples_per_pixel, h.bits_allocated, h.bits_stored, h.signed)
    theirs = (fmt.rows, fmt.columns, fmt.samples_per_pixel, fmt.bits_allocated, fmt.bits_stored, fmt.signed)
    if mine != theirs:
        raise BitstreamError(f"frame describes rows/columns/samples/bits allocated/bits stored/signed {mine}, "
                             f"the dataset says {theirs}")


def decode_frames(datas: Iterable[bytes], fmt: PixelFormat | None = None, *, device="auto",
                  batch_size: int = DEFAULT_BATCH, lossless_only: bool = False) -> list[np.ndarray]:
    """Decode frames; each result is checked against the CRC-32 stored at encoding time.

    ``lossless_only``: refuse near-lossless and lossy frames (data labelled with the lossless syntax)."""
    parsed = [B.unpack(d) for d in datas]
    dev = resolve_device(device) if any(h.version == 1 for h, _ in parsed) else None
    if lossless_only and any(h.mode != B.MODE_LOSSLESS for h, _ in parsed):
        raise BitstreamError("a lossy or near-lossless frame is stored under the lossless transfer syntax")
    out: list[np.ndarray | None] = [None] * len(parsed)
    # batch frames that share geometry and model
    keys: dict[tuple, list[int]] = {}
    for i, (h, _) in enumerate(parsed):
        check_matches(h, fmt)
        keys.setdefault((h.model_id, h.digest, h.rows, h.columns, h.samples_per_pixel, h.bits_stored,
                         h.transform, h.max_error, h.bits_allocated, h.signed, h.mode, h.version), []).append(i)
    for key, idx in keys.items():
        model = load_model(key[0], key[1])
        if model.format_version != key[-1]:
            raise BitstreamError(f"frame format version {key[-1]} does not match model {model.model_id!r} "
                                 f"(format version {model.format_version})")
        if key[-1] == 2:
            _decode_engine(parsed, idx, model, out)
            continue
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            h0 = parsed[chunk[0]][0]
            ffmt = frame_format(h0)
            bits = np.array(ffmt.plane_bits(h0.transform), dtype=np.int64)
            payloads = [p for i in chunk for p in parsed[i][1]]
            if (h0.mode == B.MODE_LOSSY) != model.lossy:
                raise BitstreamError(f"frame coding mode {B.MODE_NAMES[h0.mode]} does not match model "
                                     f"{model.model_id!r}")
            try:
                if model.lossy:
                    from .lossy import LossyPlanes
                    planes = LossyPlanes(model, dev).decode(payloads, h0.rows, h0.columns,
                                                            list(np.tile(bits, len(chunk))))
                else:
                    from .pyramid_coder import PlaneBatch
                    batch = PlaneBatch(model, dev, np.tile(bits, len(chunk)), (h0.rows, h0.columns), h0.max_error)
                    planes = batch.decode(payloads).cpu().numpy()
            except Exception as exc:  # constriction and numpy errors on garbage input
                raise BitstreamError(f"corrupt payload: {exc}") from None
            p = len(bits)
            for k, i in enumerate(chunk):
                frame = from_planes(planes[k * p:(k + 1) * p], ffmt)
                if pixel_crc(frame) != parsed[i][0].pixel_crc:
                    raise BitstreamError("decoded pixels fail the stored CRC-32 (corrupt payload, or a model "
                                         "that does not decode bit-exactly here)")
                out[i] = frame
    return out  # type: ignore[return-value]


def _decode_engine(parsed, idx: list[int], model: LoadedModel, out: list) -> None:
    """Format-version-2 frames of one geometry: every plane of every frame in parallel threads."""
    from .engine import planes as EP
    h0 = parsed[idx[0]][0]
    ffmt = frame_format(h0)
    bits = [int(b) for b in ffmt.plane_bits(h0.transform)]
    p = len(bits)
    payloads = [pl for i in idx for pl in parsed[i][1]]
    planes = EP.decode_planes(payloads, h0.rows, h0.columns, bits * len(idx), model.engine)
    for k, i in enumerate(idx):
        frame = from_planes(np.stack(planes[k * p:(k + 1) * p]), ffmt)
        if pixel_crc(frame) != parsed[i][0].pixel_crc:
            raise BitstreamError("decoded pixels fail the stored CRC-32 (corrupt payload)")
        out[i] = frame


def decode_frame(data: bytes, fmt: PixelFormat | None = None, **kw) -> np.ndarray:
    return decode_frames([data], fmt, **kw)[0]
