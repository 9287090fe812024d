"""Classical lossless codecs as small uniform adapters, for ``dicom-nncodec bench``.

Why: the learned codec is only worth shipping if it beats what a PACS already
has.  Each adapter codes one frame the way the notes in
``shared/notes/codec-baselines.md`` measured it, so numbers are comparable:

* JPEG-LS: CharLS through pyjpegls with P = Bits Stored (imagecodecs'
  ``jpegls_encode`` always writes P = 16, which costs ~2 % on 14-bit CT);
* JPEG 2000: OpenJPEG, reversible 5/3, one layer, raw J2K codestream (as
  DICOM encapsulates it), precision = Bits Stored;
* HTJ2K: OpenJPH, reversible;
* JPEG-XL: libjxl lossless, efforts 3 and 7, bits per sample = Bits Stored.

Signed data go natively to JPEG 2000 / HTJ2K and as offset binary
(x + 2**(bits-1), a bijection) to JPEG-LS and JPEG-XL, which have no signed
samples.  Colour (rows, cols, 3) frames are coded as each library does
natively: JPEG-LS sample-interleaved without colour transform (as pydicom
writes Planar Configuration 0), JPEG 2000 / HTJ2K with the reversible
colour transform, JPEG-XL with its own.

Every adapter is single-threaded unless told otherwise, and one whose
library is missing is left out with a note (``available_baselines``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:  # the codecs are optional: a missing one is reported, not fatal
    import imagecodecs as _ic
except Exception:  # pragma: no cover - depends on the installation
    _ic = None
try:
    import jpeg_ls as _jls
except Exception:  # pragma: no cover
    _jls = None

# DICOM transfer syntaxes the frames of each codec would be encapsulated with
JPEGLS_LOSSLESS_UID = "1.2.840.10008.1.2.4.80"
JPEG2000_LOSSLESS_UID = "1.2.840.10008.1.2.4.90"
HTJ2K_LOSSLESS_UID = "1.2.840.10008.1.2.4.201"
JPEGXL_LOSSLESS_UID = "1.2.840.10008.1.2.4.110"


BASELINE_NAMES = ("jpegls", "j2k", "htj2k", "jxl-e3", "jxl-e7")


class BaselineUnsupported(ValueError):
    """The codec cannot code this pixel format (e.g. JPEG-LS with 1 bit); reported as n/a, not as an error."""


def _container(bits: int, signed: bool) -> np.dtype:
    if bits > 16:
        raise BaselineUnsupported(f"{bits} bits per sample (16 at most)")
    return np.dtype(("i" if signed else "u") + ("1" if bits <= 8 else "2"))


def _unsigned(frame: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Samples as unsigned integers < 2**bits (offset binary for signed data)."""
    x = np.asarray(frame)
    dt = _container(bits, False)
    if signed:
        return (x.astype(np.int32) + (1 << (bits - 1))).astype(dt)
    return x.astype(dt, copy=False)


def _from_unsigned(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    if signed:
        return (x.astype(np.int32) - (1 << (bits - 1))).astype(_container(bits, True))
    return x


def _native(frame: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Samples in the smallest container of their signedness (for codecs with signed samples)."""
    return np.ascontiguousarray(np.asarray(frame).astype(_container(bits, signed), copy=False))


@dataclass
class Baseline:
    """One classical codec: ``encode(frame, bits, signed) -> bytes`` and ``decode(data, bits, signed) -> array``.

    ``frame`` is (rows, cols) or (rows, cols, 3) of integers that fit in
    ``bits`` bits (two's complement when ``signed``); ``decode`` returns the
    same values (the dtype may be a smaller container)."""
    name: str
    label: str
    transfer_syntax: str
    _encode: Callable[[np.ndarray, int, bool, int], bytes] = field(repr=False)
    _decode: Callable[[bytes, int, bool, int], np.ndarray] = field(repr=False)
    threads: int = 1
    note: str = ""

    def encode(self, frame: np.ndarray, bits: int, signed: bool) -> bytes:
        return bytes(self._encode(frame, int(bits), bool(signed), self.threads))

    def decode(self, data: bytes, bits: int, signed: bool) -> np.ndarray:
        return self._decode(data, int(bits), bool(signed), self.threads)


# --------------------------------------------------------------------------- JPEG-LS (CharLS)

def _jls_encode(frame, bits, signed, threads, near=0):
    """``near`` > 0: near-lossless, every sample within ``near`` (pyjpegls only)."""
    if bits < 2:
        raise BaselineUnsupported("JPEG-LS needs at least 2 bits per sample")
    x = np.ascontiguousarray(_unsigned(frame, bits, signed))
    spp = 1 if x.ndim == 2 else x.shape[2]
    if _jls is not None:
        return _jls.encode_buffer(x.tobytes(), x.shape[0], x.shape[1], spp, bits, lossy_error=near,
                                  interleave_mode=2 if spp > 1 else None)
    if near:  # pragma: no cover
        raise BaselineUnsupported("JPEG-LS near-lossless needs pyjpegls")
    return _ic.jpegls_encode(x)  # pragma: no cover - P = 16 fallback


def _jls_decode(data, bits, signed, threads):
    if _ic is not None and _ic.JPEGLS.available:
        x = _ic.jpegls_decode(data)
    else:  # pragma: no cover
        buf, meta = _jls.decode_buffer(data)
        dt = np.uint8 if meta["bits_per_sample"] <= 8 else np.dtype("<u2")
        shape = (meta["height"], meta["width"]) + ((meta["components"],) if meta["components"] > 1 else ())
        if meta["components"] > 1 and meta["interleave_mode"] == 0:
            x = np.frombuffer(buf, dt).reshape(meta["components"], meta["height"], meta["width"]).transpose(1, 2, 0)
        else:
            x = np.frombuffer(buf, dt).reshape(shape)
    return _from_unsigned(x, bits, signed)


# --------------------------------------------------------------------------- JPEG 2000 (OpenJPEG)

def _j2k_encode(frame, bits, signed, threads):
    x = _native(frame, bits, signed)
    return _ic.jpeg2k_encode(x, level=0, codecformat="J2K", reversible=True, bitspersample=bits,
                             mct=x.ndim == 3, numthreads=threads)


def _j2k_decode(data, bits, signed, threads):
    return _ic.jpeg2k_decode(data, numthreads=threads)


# --------------------------------------------------------------------------- HTJ2K (OpenJPH)

def _htj2k_encode(frame, bits, signed, threads):
    x = _native(frame, bits, signed)
    return _ic.htj2k_encode(x, reversible=True, rgb=True if x.ndim == 3 else None)


def _htj2k_decode(data, bits, signed, threads):
    return _ic.htj2k_decode(data)


# --------------------------------------------------------------------------- JPEG-XL (libjxl)

def _jxl_encoder(effort: int):
    def enc(frame, bits, signed, threads):
        x = np.ascontiguousarray(_unsigned(frame, bits, signed))
        return _ic.jpegxl_encode(x, lossless=True, effort=effort, bitspersample=bits,
                                 photometric="RGB" if x.ndim == 3 else None, numthreads=threads)
    return enc


def _jxl_decode(data, bits, signed, threads):
    return _from_unsigned(_ic.jpegxl_decode(data, numthreads=threads), bits, signed)


# --------------------------------------------------------------------------- registry

def _ic_has(name: str) -> bool:
    return _ic is not None and getattr(getattr(_ic, name, None), "available", False)


def available_baselines(threads: int = 1, names: list[str] | None = None) -> tuple[list[Baseline], list[str]]:
    """The baselines whose libraries are present, in report order, and notes on those left out.

    ``names`` restricts the selection (``jpegls``, ``j2k``, ``htj2k``, ``jxl-e3``, ``jxl-e7``)."""
    out: list[Baseline] = []
    notes: list[str] = []

    def want(name):
        return names is None or name in names

    if want("jpegls"):
        if _jls is not None:
            out.append(Baseline("jpegls", "JPEG-LS", JPEGLS_LOSSLESS_UID, _jls_encode, _jls_decode, threads,
                                "CharLS via pyjpegls, P = Bits Stored"))
        elif _ic_has("JPEGLS"):
            out.append(Baseline("jpegls", "JPEG-LS", JPEGLS_LOSSLESS_UID, _jls_encode, _jls_decode, threads,
                                "CharLS via imagecodecs, P = 16 (pyjpegls missing)"))
            notes.append("JPEG-LS: pyjpegls is missing; imagecodecs writes P = 16 (about 2 % larger on 14-bit data)")
        else:
            notes.append("JPEG-LS skipped: neither pyjpegls nor imagecodecs' JPEG-LS codec is installed")
    for name, label, cls, uid, enc, dec, note in (
            ("j2k", "J2K", "JPEG2K", JPEG2000_LOSSLESS_UID, _j2k_encode, _j2k_decode, "OpenJPEG reversible 5/3"),
            ("htj2k", "HTJ2K", "HTJ2K", HTJ2K_LOSSLESS_UID, _htj2k_encode, _htj2k_decode, "OpenJPH reversible"),
            ("jxl-e3", "JXL-e3", "JPEGXL", JPEGXL_LOSSLESS_UID, _jxl_encoder(3), _jxl_decode,
             "libjxl lossless effort 3"),
            ("jxl-e7", "JXL-e7", "JPEGXL", JPEGXL_LOSSLESS_UID, _jxl_encoder(7), _jxl_decode,
             "libjxl lossless effort 7")):
        if not want(name):
            continue
        if _ic_has(cls):
            out.append(Baseline(name, label, uid, enc, dec, threads, note))
        else:
            notes.append(f"{label} skipped: imagecodecs with its {cls} codec is not installed")
    return out, notes


def library_versions() -> dict[str, str]:
    v: dict[str, str] = {}
    if _ic is not None:
        v["imagecodecs"] = _ic.__version__
        for key, attr in (("charls", "jpegls"), ("openjpeg", "jpeg2k"), ("openjph", "htj2k"), ("libjxl", "jpegxl")):
            try:
                v[key] = str(getattr(_ic, f"{attr}_version")())
            except Exception:
                pass
    if _jls is not None:
        try:
            from importlib.metadata import version
            v["pyjpegls"] = version("pyjpegls")
        except Exception:
            pass
    return v
