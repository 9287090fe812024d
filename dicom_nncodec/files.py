"""Per-file operations behind the command line: compress, decompress, verify, describe.

Why a module of its own: the command line, its worker processes and the
tests all call the same functions, each taking one file and returning one
result line, so a failure is reported per file and never stops the others.
Inputs are only read; outputs are written to a temporary name, flushed and
renamed into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, HTJ2KLossless,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)

from . import dataset as D
from .bitstream import MODE_NAMES, read_header
from .codec import frame_format
from .errors import NNCodecError, UnsupportedPixelData
from .syntax import JPEGXLLossless, NNCodecLossless, NNCodecLossy, fix_transfer_syntax, registered

DECOMPRESS_TARGETS = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "jpegxl": JPEGXLLossless,        # lossless, effort 7 (dicom_nncodec.standard_plugin)
    "htj2k": HTJ2KLossless,
}


@dataclass
class Result:
    path: str
    status: str          # "ok", "copied", "skipped", "failed"
    message: str = ""
    bytes_in: int = 0
    bytes_out: int = 0


def plan(inputs: list[str], out: str | None, suffix_ok=(".dcm", ".dicom", "")) -> list[tuple[Path, Path | None]]:
    """Pairs (input file, output file) mirroring each input folder's tree under ``out``.

    A single input file with an ``out`` that is not an existing folder is
    written to ``out`` itself.  An output that resolves to its input is refused."""
    pairs: list[tuple[Path, Path | None]] = []
    outp = Path(out) if out else None
    single_file = len(inputs) == 1 and Path(inputs[0]).is_file() and outp is not None and not outp.is_dir()
    for item in map(Path, inputs):
        if item.is_dir():
            for f in sorted(p for p in item.rglob("*") if p.is_file()):
                pairs.append((f, outp / f.relative_to(item) if outp else None))
        elif item.is_file():
            pairs.append((item, outp if single_file else (outp / item.name if outp else None)))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    for src, dst in pairs:
        if dst is not None and dst.resolve() == src.resolve():
            raise ValueError(f"{src}: output would overwrite the input")
    return pairs


def _write_atomic(ds_or_src, dst: Path) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nncodec-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(ds_or_src, Path):
                with open(ds_or_src, "rb") as src:
                    shutil.copyfileobj(src, fh)
            else:
                D.save(ds_or_src, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    return dst.stat().st_size


def _read(src: Path):
    """Read a DICOM file; files without the Part 10 preamble are accepted when they parse as a
    dataset with a SOP Class UID (as written by some older systems)."""
    try:
        try:
            ds = pydicom.dcmread(src)
        except InvalidDicomError:
            ds = pydicom.dcmread(src, force=True)
            if "SOPClassUID" not in ds:
                raise InvalidDicomError("no DICOM preamble and no SOP Class UID") from None
            if "TransferSyntaxUID" not in ds.file_meta:
                ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if ds.original_encoding[0]
                                                  else ExplicitVRLittleEndian)
        return fix_transfer_syntax(ds)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise NNCodecError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def compress_file(src: Path, dst: Path, max_error: int = 0, device: str = "auto",
                  ratio: float | None = None) -> Result:
    size_in = src.stat().st_size
    try:
        ds = _read(src)
        ts = ds.file_meta.get("TransferSyntaxUID", "")
        if not D.is_image(ds):
            return Result(str(src), "copied", "not an image, copied unchanged", size_in, _write_atomic(src, dst))
        if registered(ts) is not None:
            return Result(str(src), "copied", "already dicom-nncodec, copied unchanged", size_in,
                          _write_atomic(src, dst))
        syntax = NNCodecLossy if max_error or ratio is not None else NNCodecLossless
        try:
            D.compress(ds, syntax, max_error=max_error, ratio=ratio, device=device)
        except UnsupportedPixelData as exc:
            return Result(str(src), "copied", f"{exc}; copied unchanged", size_in, _write_atomic(src, dst))
        return Result(str(src), "ok", "", size_in, _write_atomic(ds, dst))
    except Exception as exc:  # one line per failed file; the others go on
        return Result(str(src), "failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, NNCodecError)
                      else str(exc), size_in)


def decompress_file(src: Path, dst: Path, target: UID = ExplicitVRLittleEndian, device: str = "auto") -> Result:
    size_in = src.stat().st_size
    try:
        ds = _read(src)
        if registered(ds.file_meta.get("TransferSyntaxUID", "")) is None or not D.is_image(ds):
            return Result(str(src), "copied", "not dicom-nncodec, copied unchanged", size_in, _write_atomic(src, dst))
        D.decompress(ds, device=device)
        if target == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif target == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        elif target != ExplicitVRLittleEndian:
            ds.compress(target, generate_instance_uid=False)
        return Result(str(src), "ok", "", size_in, _write_atomic(ds, dst))
    except Exception as exc:
        return Result(str(src), "failed", str(exc) if isinstance(exc, NNCodecError) else
                      f"{type(exc).__name__}: {exc}", size_in)


def verify_file(src: Path, device: str = "auto") -> Result:
    """Decode every frame; the codec checks each against its stored CRC-32."""
    try:
        ds = _read(src)
        if registered(ds.file_meta.get("TransferSyntaxUID", "")) is None:
            return Result(str(src), "skipped", "not dicom-nncodec")
        n = D.verify(ds, device=device)
        return Result(str(src), "ok", f"{n} frame(s) verified")
    except Exception as exc:
        return Result(str(src), "failed", str(exc) if isinstance(exc, NNCodecError) else
                      f"{type(exc).__name__}: {exc}")


def describe(src: Path) -> str:
    """Text for ``info``: syntax, model, mode, and size and ratio per frame."""
    ds = _read(src)
    ts = ds.file_meta.get("TransferSyntaxUID", "")
    lines = [f"{src}", f"  transfer syntax: {ts} ({'NNCodecLossless' if ts == NNCodecLossless else 'NNCodecLossy' if ts == NNCodecLossy else UID(ts).name})"]
    if registered(ts) is None or not D.is_image(ds):
        lines.append("  not a dicom-nncodec image")
        return "\n".join(lines)
    frames = D.encoded_frames(ds)
    h0 = read_header(frames[0])
    raw = frame_format(h0).frame_bytes
    lines.append(f"  model: {h0.model_id} (weights sha256 {h0.digest.hex()[:16]}...)")
    lines.append(f"  mode: {MODE_NAMES[h0.mode]}" + (f", max error {h0.max_error}" if h0.max_error else ""))
    lines.append(f"  pixels: {h0.rows}x{h0.columns}, {h0.samples_per_pixel} sample(s), bits stored {h0.bits_stored} "
                 f"of {h0.bits_allocated}, {'signed' if h0.signed else 'unsigned'}, {len(frames)} frame(s)")
    total = 0
    for i, f in enumerate(frames):
        h = read_header(f)
        total += len(f)
        lines.append(f"  frame {i + 1}: {len(f)} bytes, ratio {raw / len(f):.2f}, {8 * len(f) / (h.rows * h.columns * h.samples_per_pixel):.3f} bits/sample")
    lines.append(f"  total: {total} bytes for {raw * len(frames)} raw, ratio {raw * len(frames) / max(1, total):.2f}")
    return "\n".join(lines)
