"""Lossy and near-lossless codecs as uniform adapters, for ``dicom-nncodec bench --lossy / --near-lossless``.

Why adapters: the lossy benchmark must code exactly the same frames with
every codec at the same operating point and measure each on the bytes it
really produced.  Each adapter takes frames of one ``PixelFormat`` and a
target (a compression ratio, or a maximum absolute error) and returns, per
frame, the bytes DICOM would encapsulate, or the reason it cannot code that
frame at that target.  This codec is one adapter among the others.

* ``nncodec``: this codec end to end, ``codec.encode_frames(..., ratio=R)``
  (RNN-Conv lossy model) or ``max_error=N`` (near-lossless); frame bytes as
  stored in the private transfer syntax.  A refused target
  (``UnsupportedPixelData``) is reported as n/a with its reason.
* ``j2k``: OpenJPEG through pylibjpeg-openjpeg (pydicom's JPEG 2000
  encoder), irreversible 9/7, one quality layer, raw J2K codestream.  Its
  rate control counts Bits Stored, not Bits Allocated, and lands a few %
  off, so the requested ratio is corrected per frame until the measured
  ratio is within ``RATE_TOLERANCE``.  When even its full-rate 9/7 quality
  is smaller than the target size the frame is reported "saturated" at the
  ratio it reached (as in the notes, section 3.2).
* ``htj2k``: OpenJPH through imagecodecs, irreversible.  It has no rate
  control: its quantisation step (imagecodecs' ``level``) is searched per
  frame until the ratio is within ``RATE_TOLERANCE``.
* ``jpegls``: CharLS through pyjpegls with NEAR = N (near-lossless only),
  offset binary for signed data, as ``baselines`` codes it losslessly.

The ratio is always raw / compressed with raw = rows x columns x samples x
Bits Allocated / 8 (DICOM's Lossy Image Compression Ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import baselines as bl
from .pixels import PixelFormat

RATE_TOLERANCE = 0.03          # a baseline's ratio counts as on target within 3 %
RATE_SEARCH_STEPS = 40         # encodes per frame at most while searching a baseline's parameter

try:  # pylibjpeg-openjpeg: the JPEG 2000 encoder with rate control (pydicom uses it for lossy JPEG 2000)
    import openjpeg as _opj
except Exception:  # pragma: no cover - depends on the installation
    _opj = None

JPEG2000_UID = "1.2.840.10008.1.2.4.91"           # JPEG 2000 Image Compression (lossy allowed)
HTJ2K_UID = "1.2.840.10008.1.2.4.203"             # High-Throughput JPEG 2000 Image Compression
JPEGLS_NEAR_LOSSLESS_UID = "1.2.840.10008.1.2.4.81"


@dataclass
class Coded:
    """One frame coded at one target: ``data`` (None when the codec refused the target, ``refused`` says why),
    and ``note`` when the target was not met, starting with its kind ("saturated: ...", "closest: ...",
    "out of reach: ...")."""
    data: bytes | None = None
    note: str = ""
    refused: str = ""


class LossyCodec:
    """Base of the adapters: ``encode(frames, fmt, ratio=R | max_error=N) -> [Coded]``,
    ``decode([bytes], fmt) -> [array]``.  ``modes`` lists the targets it accepts ("ratio", "max_error")."""
    name = ""
    label = ""
    note = ""
    transfer_syntax = ""
    modes: tuple[str, ...] = ()

    def encode(self, frames: Sequence[np.ndarray], fmt: PixelFormat, *, ratio: float | None = None,
               max_error: int | None = None) -> list[Coded]:
        return [self.encode_one(f, fmt, ratio=ratio, max_error=max_error) for f in frames]

    def encode_one(self, frame: np.ndarray, fmt: PixelFormat, *, ratio: float | None,
                   max_error: int | None) -> Coded:
        raise NotImplementedError

    def decode(self, datas: Sequence[bytes], fmt: PixelFormat) -> list[np.ndarray]:
        return [self.decode_one(d, fmt) for d in datas]

    def decode_one(self, data: bytes, fmt: PixelFormat) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "note": self.note, "transfer_syntax": self.transfer_syntax,
                "modes": list(self.modes)}


# --------------------------------------------------------------------------- rate search (J2K, HTJ2K)

def search_ratio(encode: Callable[[float], bytes], raw: int, target: float, start: float, lowest: float,
                 highest: float, what: str, tolerance: float = RATE_TOLERANCE,
                 steps: int = RATE_SEARCH_STEPS) -> Coded:
    """Find a parameter p in [lowest, highest] whose encoding has ratio raw / len(encode(p)) within
    ``tolerance`` of ``target``; the ratio must grow with p.

    Secant steps in log-log space inside a bracket, falling back to the bracket's geometric middle.  When
    ``lowest`` still gives a ratio above the target the result is "saturated"; when no p reaches the
    tolerance, the closest encoding is returned with a note saying so."""
    lo, lo_tested = lowest, False     # largest p known to give a ratio below target (or the bound)
    hi, hi_tested = highest, False    # smallest p known to give a ratio above target (or the bound)
    p = min(max(start, lowest), highest)
    best: tuple[float, bytes, float, float] | None = None
    prev: tuple[float, float] | None = None
    for _ in range(max(1, steps)):
        data = encode(p)
        got = raw / len(data)
        miss = abs(math.log(got / target))
        if best is None or miss < best[0]:
            best = (miss, data, got, p)
        if abs(got / target - 1) <= tolerance:
            return Coded(data)
        if got < target:
            if p >= highest:
                return Coded(data, f"out of reach: ratio {got:.3g} at the largest {what}")
            lo, lo_tested = p, True
        else:
            if p <= lowest:
                return Coded(data, f"saturated: ratio {got:.3g} at the smallest {what}")
            hi, hi_tested = p, True
        slope = None
        if prev is not None and prev[0] != p and prev[1] != got:
            slope = (math.log(got) - math.log(prev[1])) / (math.log(p) - math.log(prev[0]))
        prev = (p, got)
        nxt = p * (target / got) ** (1 / slope if slope and slope > 0 else 1.0)
        if nxt <= lo:
            nxt = lo if not lo_tested else math.sqrt(lo * hi)
        elif nxt >= hi:
            nxt = hi if not hi_tested else math.sqrt(lo * hi)
        if nxt == p:
            break
        p = nxt
    assert best is not None
    return Coded(best[1], f"closest: ratio {best[2]:.3g} (none within {tolerance:.0%})")


# --------------------------------------------------------------------------- JPEG 2000 (OpenJPEG 9/7)

class J2KAtRatio(LossyCodec):
    name, label, transfer_syntax, modes = "j2k", "J2K", JPEG2000_UID, ("ratio",)
    note = (f"OpenJPEG (pylibjpeg-openjpeg) irreversible 9/7, 1 layer, raw codestream; requested ratio corrected "
            f"per frame to within {RATE_TOLERANCE:.0%}")
    SMALLEST_REQUEST = 1.0001     # a request of exactly 1 switches pylibjpeg-openjpeg to reversible 5/3

    def encode_one(self, frame, fmt, *, ratio, max_error):
        x = bl._native(frame, fmt.bits_stored, fmt.signed)
        bits = fmt.bits_stored

        def enc(request: float) -> bytes:
            return bytes(_opj.encode(x, bits_stored=bits, compression_ratios=[request], photometric_interpretation=2,
                                     codec_format=0))

        # OpenJPEG's ratio counts Bits Stored per sample; ours counts Bits Allocated
        return search_ratio(enc, fmt.frame_bytes, ratio, ratio * bits / fmt.bits_allocated,
                            self.SMALLEST_REQUEST, 1e6, "requested ratio (full-rate 9/7 quality)")

    def decode_one(self, data, fmt):
        return _opj.decode(data)


# --------------------------------------------------------------------------- HTJ2K (OpenJPH)

class HTJ2KAtRatio(LossyCodec):
    name, label, transfer_syntax, modes = "htj2k", "HTJ2K", HTJ2K_UID, ("ratio",)
    note = (f"OpenJPH (imagecodecs) irreversible 9/7; no rate control: quantisation step searched per frame until "
            f"the ratio is within {RATE_TOLERANCE:.0%}")

    def encode_one(self, frame, fmt, *, ratio, max_error):
        x = bl._native(frame, fmt.bits_stored, fmt.signed)

        def enc(step: float) -> bytes:
            return bytes(bl._ic.htj2k_encode(x, level=step, reversible=False))

        return search_ratio(enc, fmt.frame_bytes, ratio, 1e-3, 1e-9, 10.0, "quantisation step")

    def decode_one(self, data, fmt):
        return bl._htj2k_decode(data, fmt.bits_stored, fmt.signed, 1)


# --------------------------------------------------------------------------- JPEG-LS near-lossless (CharLS)

class JPEGLSNearLossless(LossyCodec):
    name, label, transfer_syntax, modes = "jpegls", "JPEG-LS", JPEGLS_NEAR_LOSSLESS_UID, ("max_error",)
    note = "CharLS via pyjpegls, NEAR = N, P = Bits Stored (offset binary for signed data)"

    def encode_one(self, frame, fmt, *, ratio, max_error):
        try:
            return Coded(bytes(bl._jls_encode(frame, fmt.bits_stored, fmt.signed, 1, near=int(max_error))))
        except bl.BaselineUnsupported as exc:
            return Coded(refused=str(exc))

    def decode_one(self, data, fmt):
        return bl._jls_decode(data, fmt.bits_stored, fmt.signed, 1)


# --------------------------------------------------------------------------- this codec

class LearnedCodecAtRatio(LossyCodec):
    """This codec; several frames go through the network together (as ``dicom_nncodec.compress`` does)."""
    name, label, modes = "nncodec", "NNCodec", ("ratio", "max_error")
    note = "this codec end to end: codec.encode_frames(ratio=R) (RNN-Conv lossy model) or max_error=N"

    def __init__(self, device: str = "cpu"):
        from .syntax import NNCodecLossy as uid
        self.device = device
        self.transfer_syntax = str(uid)

    def encode(self, frames, fmt, *, ratio=None, max_error=None):
        from .codec import encode_frames
        from .errors import UnsupportedPixelData
        kw = {"ratio": ratio} if ratio is not None else {"max_error": int(max_error)}
        try:
            return [Coded(d) for d in encode_frames(list(frames), fmt, device=self.device, **kw)]
        except UnsupportedPixelData as exc:
            if len(frames) == 1:
                return [Coded(refused=str(exc))]
        return [c for f in frames for c in self.encode([f], fmt, ratio=ratio, max_error=max_error)]

    def decode(self, datas, fmt):
        from .codec import decode_frames
        return decode_frames(list(datas), fmt, device=self.device)


# --------------------------------------------------------------------------- registry

LOSSY_BASELINE_NAMES = ("j2k", "htj2k")
NEAR_LOSSLESS_BASELINE_NAMES = ("jpegls",)


def available_codecs(mode: str, device: str = "cpu", names: Sequence[str] | None = None
                     ) -> tuple[list[LossyCodec], list[str]]:
    """This codec first, then the baselines for ``mode`` ("ratio" or "max_error") whose libraries are present;
    and notes on those left out.  ``names`` restricts the baselines."""
    out: list[LossyCodec] = [LearnedCodecAtRatio(device)]
    notes: list[str] = []
    want = (lambda n: names is None or n in names)
    if mode == "ratio":
        if want("j2k"):
            if _opj is not None:
                out.append(J2KAtRatio())
            else:
                notes.append("J2K skipped: pylibjpeg-openjpeg is not installed")
        if want("htj2k"):
            if bl._ic_has("HTJ2K"):
                out.append(HTJ2KAtRatio())
            else:
                notes.append("HTJ2K skipped: imagecodecs with its HTJ2K codec is not installed")
    elif mode == "max_error":
        if want("jpegls"):
            if bl._jls is not None and bl._ic_has("JPEGLS"):
                out.append(JPEGLSNearLossless())
            else:
                notes.append("JPEG-LS near-lossless skipped: pyjpegls (encoder) or imagecodecs (decoder) missing")
    else:
        raise ValueError(f"mode must be 'ratio' or 'max_error', not {mode!r}")
    return out, notes


def library_versions() -> dict[str, str]:
    v = bl.library_versions()
    if _opj is not None:
        v["pylibjpeg-openjpeg"] = getattr(_opj, "__version__", "?")
        try:
            v["openjpeg (pylibjpeg)"] = ".".join(map(str, _opj.utils.get_openjpeg_version()))
        except Exception:
            pass
    return v
