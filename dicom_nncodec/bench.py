"""``dicom-nncodec bench``: this codec beside JPEG-LS, JPEG 2000, HTJ2K and JPEG-XL, in one run.

Why one run on the same frames: sizes and speeds of codecs measured on
different days, machines or frame selections are not comparable; here every
codec codes exactly the same frames, one after the other, single-threaded
by default, and every lossless result is decoded and compared bit for bit
(a mismatch is an error row and a non-zero exit status, never a skipped
image).

What is reported, per image group and overall:

* pixel-level size: bits per pixel (Σ compressed bits / Σ pixels) and the
  geometric mean over images of the ratio raw/compressed, where raw is the
  Bits Allocated size (as DICOM's Lossy Image Compression Ratio); the
  geometric means of the size relative to JPEG-LS and to JPEG-XL effort 7;
* file-level size ("real files, headers included"): the same dataset
  written as a DICOM file with this codec (``dicom_nncodec.compress``),
  with JPEG-LS (pydicom's ``ds.compress(JPEGLSLossless)``), and with the
  baselines' verified frames encapsulated under their standard transfer
  syntaxes; uncompressed file size / compressed file size;
* throughput in MB/s of raw pixels (Bits Allocated bytes, 10**6 bytes),
  Σ raw / Σ time, each object's time the median of up to ``repeat`` runs
  (fewer when runs are long); this codec is timed end to end
  (``encode_frames`` / ``decode_frames``, network and entropy coding).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

OURS = "nncodec"
OURS_LABEL = "NNCodec"
REFERENCE = "jpegls"
REFERENCE_E7 = "jxl-e7"
GROUPINGS = ("folder", "modality", "file", "none")
RUN_BUDGET_S = 2.0   # stop repeating a measurement once this much time was spent on it

# Targets from the issue (on sources not used for training)
TARGET_FILE_VS_JPEGLS = 0.85
TARGET_FILE_VS_JXL_E7 = 0.95
TARGET_DECODE_MBPS = 20.0
TARGET_DECODE_WITHIN = 8.0     # decode at most 8x slower than JPEG-LS in the same run
TARGET_ENCODE_MBPS = 10.0


# ---------------------------------------------------------------------------------------------- records

@dataclass
class Measure:
    """One codec on one object.  status: ok, n/a (codec cannot code this format) or error."""
    status: str = "ok"
    bytes: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    runs: int = 0
    message: str = ""


@dataclass
class FileSize:
    status: str = "ok"
    bytes: int = 0
    message: str = ""


@dataclass
class ObjectResult:
    path: str
    group: str
    modality: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    frames: int                 # frames coded
    frames_total: int           # frames in the object
    held_out: bool | None       # path matches the model's recorded hold-out list (None: not recorded)
    codecs: dict[str, Measure] = field(default_factory=dict)
    files: dict[str, FileSize] = field(default_factory=dict)
    uncompressed_file_bytes: int = 0

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames

    @property
    def raw_bytes(self) -> int:
        return self.pixels * self.samples_per_pixel * self.bits_allocated // 8


# ---------------------------------------------------------------------------------------------- helpers

def _geomean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v and len(v) == len(values) else None


def _timed(fn: Callable[[], object], repeat: int, budget: float = RUN_BUDGET_S):
    """(result of the last run, median seconds, runs): up to ``repeat`` runs, fewer once ``budget`` is spent."""
    times, out = [], None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        if sum(times) >= budget:
            break
    return out, statistics.median(times), len(times)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a.astype(np.int64), b.astype(np.int64))


def normalise(frame: np.ndarray, fmt) -> np.ndarray:
    """The stored values the codecs must reproduce: bits above Bits Stored dropped, signed values
    sign-extended, in the Bits Allocated container (what pydicom returns for the decoded file)."""
    b = fmt.bits_stored
    x = np.asarray(frame).astype(np.int64) & ((1 << b) - 1)
    if fmt.signed:
        x = np.where(x >= 1 << (b - 1), x - (1 << b), x)
    return x.astype(fmt.dtype)


def select_frames(n: int, max_frames: int | None) -> list[int]:
    """Evenly spaced frame indices (all when ``max_frames`` is None or not smaller than ``n``)."""
    if not max_frames or max_frames >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_frames)})


def find_files(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files named or found recursively under the folders named; and the paths that do not exist."""
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            missing.append(str(p))
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out, missing


class Skipped(Exception):
    """A file the benchmark does not code; the message is the reason listed under "skipped"."""


def read_image(path: Path, max_frames: int | None):
    """(dataset, pixel format, frame indices, frames, frames in the object) of a DICOM image that the
    benchmarks can code: at most ``max_frames`` evenly spaced frames.  Raises ``Skipped`` with the reason
    for anything else (not DICOM, no pixels, lossy-derived, unsupported or undecodable pixel data)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from .dataset import frames_of, is_image, number_of_frames
    from .errors import UnsupportedPixelData
    from .pixels import PixelFormat

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise Skipped("not a DICOM Part 10 file") from None
    except Exception as exc:
        raise Skipped(f"unreadable ({type(exc).__name__})") from None
    if not is_image(ds):
        raise Skipped("not an image (no Pixel Data)")
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        raise Skipped("lossy-derived image (Lossy Image Compression 01)")
    try:
        fmt = PixelFormat.from_dataset(ds).validate()
        n_total = number_of_frames(ds)
        all_frames = frames_of(ds)
    except UnsupportedPixelData as exc:
        raise Skipped(f"unsupported: {exc}") from None
    except Exception as exc:
        raise Skipped(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    idx = select_frames(len(all_frames), max_frames)
    return ds, fmt, idx, [all_frames[k] for k in idx], n_total


def folder_groups(files: Sequence[Path]) -> dict[Path, str]:
    """Group name of each file's folder: its path below the common folder, with at least two parts
    (``ct/wg04``), so that the modality/source layout of the data shows."""
    parents = sorted({f.resolve().parent for f in files})
    if not parents:
        return {}
    common = Path(os.path.commonpath([str(p) for p in parents]))
    names = {}
    for p in parents:
        rel = p.relative_to(common)
        if not rel.parts:
            name = "/".join(common.parts[-2:])
        elif len(rel.parts) == 1:
            name = f"{common.name}/{rel.as_posix()}"
        else:
            name = rel.as_posix()
        names[p] = name
    return names


def _model_hold_out() -> list[str] | None:
    from .zoo import default_model, load_model
    try:
        extra = load_model(default_model()).config.get("extra") or {}
    except Exception:
        return None
    ho = extra.get("hold_out")
    return list(ho) if ho else None


# ---------------------------------------------------------------------------------------------- files

def _write(ds, force_ts: bool = False) -> bytes:
    from pydicom import dcmwrite
    buf = io.BytesIO()
    kw = dict(implicit_vr=False, little_endian=True, force_encoding=True) if force_ts else {}
    try:
        dcmwrite(buf, ds, enforce_file_format=True, **kw)
    except (ValueError, AttributeError, KeyError):  # incomplete File Meta: write the dataset as it is
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=False, **kw)
    return buf.getvalue()


def source_dataset(ds, refs: list[np.ndarray], fmt, frames_total: int, idx: list[int] | None = None):
    """``ds`` (consumed) as uncompressed Explicit VR Little Endian holding exactly the benchmarked frames
    (``idx``, indices into the object's frames), and only their Per-frame Functional Groups, so that the
    header does not outweigh the pixels of a reduced multi-frame object.  Every codec's file carries this
    same header."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    for kw in ("PixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if kw in ds:
            delattr(ds, kw)
    data = b"".join(np.ascontiguousarray(r).tobytes() for r in refs)
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OW" if fmt.bits_allocated > 8 else "OB"
    ds["PixelData"].is_undefined_length = False
    if "NumberOfFrames" in ds or frames_total > 1:
        ds.NumberOfFrames = len(refs)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if idx is not None and per_frame is not None and len(per_frame) == frames_total and len(idx) < frames_total:
        ds.PerFrameFunctionalGroupsSequence = [per_frame[k] for k in idx]
    if fmt.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds._pixel_array = None
    ds._pixel_id = {}
    return ds


def _encapsulated_file(src, frames: list[bytes], ts_uid: str) -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID
    ds = copy.deepcopy(src)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(ts_uid)
    return _write(ds, force_ts=True)


def measure_files(obj: ObjectResult, src, refs, ours_frames, baseline_frames: dict, baselines, device,
                  errors: list) -> None:
    """File sizes, headers included, for every codec that coded the object; JPEG-LS and ours written
    through the real paths (pydicom's and ours) and read back / checked."""
    import pydicom
    from pydicom.uid import JPEGLSLossless

    from . import dataset as nnds
    from .codec import decode_frames

    obj.uncompressed_file_bytes = len(_write(src))

    if ours_frames is not None:
        try:
            ds = nnds.compress(copy.deepcopy(src), device=device)
            blob = _write(ds)
            written = nnds.encoded_frames(ds)
            if written != ours_frames:  # deterministic encoder: should be the bytes already verified
                back = decode_frames(written, device=device)
                if not all(_same(a, b) for a, b in zip(back, refs)) or len(back) != len(refs):
                    raise AssertionError("file frames decode to different pixels")
            obj.files[OURS] = FileSize(bytes=len(blob))
        except Exception as exc:
            obj.files[OURS] = FileSize("error", message=f"{type(exc).__name__}: {exc}")
            errors.append({"path": obj.path, "codec": OURS, "what": "file", "message": obj.files[OURS].message})

    for b in baselines:
        frames = baseline_frames.get(b.name)
        if frames is None:
            continue
        try:
            if b.name == REFERENCE:
                ds = copy.deepcopy(src)
                ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
                blob = _write(ds)
                back = pydicom.dcmread(io.BytesIO(blob))
                pix = nnds.frames_of(back)
                if len(pix) != len(refs) or not all(_same(a, r) for a, r in zip(pix, refs)):
                    raise AssertionError("pydicom's JPEG-LS file does not decode to the original pixels")
            else:
                blob = _encapsulated_file(src, frames, b.transfer_syntax)
            obj.files[b.name] = FileSize(bytes=len(blob))
        except Exception as exc:
            obj.files[b.name] = FileSize("error", message=f"{type(exc).__name__}: {exc}")
            errors.append({"path": obj.path, "codec": b.name, "what": "file", "message": obj.files[b.name].message})


# ---------------------------------------------------------------------------------------------- coding

def measure_ours(frames, refs, fmt, device, repeat) -> tuple[Measure, list[bytes] | None]:
    from .codec import decode_frames, encode_frames
    from .errors import UnsupportedPixelData
    try:
        enc, t_enc, n1 = _timed(lambda: encode_frames(frames, fmt, device=device), repeat)
    except UnsupportedPixelData:
        raise
    except Exception as exc:
        return Measure("error", message=f"encode: {type(exc).__name__}: {exc}"), None
    try:
        dec, t_dec, n2 = _timed(lambda: decode_frames(enc, fmt, device=device), repeat)
    except Exception as exc:
        return Measure("error", bytes=sum(map(len, enc)), message=f"decode: {type(exc).__name__}: {exc}"), None
    if len(dec) != len(refs) or not all(_same(d, r) for d, r in zip(dec, refs)):
        return Measure("error", bytes=sum(map(len, enc)), message="MISMATCH: decoded pixels differ"), None
    return Measure("ok", sum(map(len, enc)), t_enc, t_dec, min(n1, n2)), enc


def measure_baseline(b, refs, fmt, repeat) -> tuple[Measure, list[bytes] | None]:
    from .baselines import BaselineUnsupported
    bits, signed = fmt.bits_stored, fmt.signed
    try:
        enc, t_enc, n1 = _timed(lambda: [b.encode(r, bits, signed) for r in refs], repeat)
    except BaselineUnsupported as exc:
        return Measure("n/a", message=str(exc)), None
    except Exception as exc:  # the library refuses this input: the codec is left out here, and said so
        return Measure("n/a", message=f"encoder failed: {type(exc).__name__}: {exc}"), None
    try:
        dec, t_dec, n2 = _timed(lambda: [b.decode(e, bits, signed) for e in enc], repeat)
    except Exception as exc:
        return Measure("error", bytes=sum(map(len, enc)), message=f"decode: {type(exc).__name__}: {exc}"), None
    if not all(_same(d, r) for d, r in zip(dec, refs)):
        return Measure("error", bytes=sum(map(len, enc)), message="MISMATCH: decoded pixels differ"), None
    return Measure("ok", sum(map(len, enc)), t_enc, t_dec, min(n1, n2)), enc


# ---------------------------------------------------------------------------------------------- summaries

def summarise(objs: list[ObjectResult], codecs: list[str]) -> dict:
    """Per codec: Σ sizes, bits per pixel, geometric means of ratio and of size relative to JPEG-LS and
    JPEG-XL e7 (over the images both coded), throughput Σ raw / Σ time, file-level sizes likewise."""
    s: dict = {"objects": len(objs), "frames": sum(o.frames for o in objs), "pixels": sum(o.pixels for o in objs),
               "raw_bytes": sum(o.raw_bytes for o in objs), "bits_stored": sorted({o.bits_stored for o in objs}),
               "codecs": {}}

    def rel(name, ref, files=False):
        pairs = []
        for o in objs:
            d = o.files if files else o.codecs
            a, r = d.get(name), d.get(ref)
            if a is not None and r is not None and a.status == r.status == "ok":
                pairs.append(a.bytes / r.bytes)
        return _geomean(pairs), len(pairs)

    for c in codecs:
        ok = [o for o in objs if c in o.codecs and o.codecs[c].status == "ok"]
        fok = [o for o in objs if c in o.files and o.files[c].status == "ok"]
        row: dict = {"objects": len(ok), "errors": sum(1 for o in objs if c in o.codecs and o.codecs[c].status == "error")
                     + sum(1 for o in objs if c in o.files and o.files[c].status == "error"),
                     "not_applicable": sum(1 for o in objs if c in o.codecs and o.codecs[c].status == "n/a")}
        if ok:
            nbytes = sum(o.codecs[c].bytes for o in ok)
            raw = sum(o.raw_bytes for o in ok)
            enc_s = sum(o.codecs[c].enc_s for o in ok)
            dec_s = sum(o.codecs[c].dec_s for o in ok)
            row.update(bytes=nbytes, bpp=8 * nbytes / sum(o.pixels for o in ok),
                       ratio=_geomean([o.raw_bytes / o.codecs[c].bytes for o in ok]),
                       enc_mbps=raw / 1e6 / enc_s if enc_s else None, dec_mbps=raw / 1e6 / dec_s if dec_s else None)
            row["rel_jpegls"], row["n_rel_jpegls"] = rel(c, REFERENCE)
            row["rel_jxl_e7"], row["n_rel_jxl_e7"] = rel(c, REFERENCE_E7)
        if fok:
            row.update(file_bytes=sum(o.files[c].bytes for o in fok),
                       file_ratio=_geomean([o.uncompressed_file_bytes / o.files[c].bytes for o in fok]))
            row["file_rel_jpegls"], row["n_file_rel_jpegls"] = rel(c, REFERENCE, files=True)
            row["file_rel_jxl_e7"], row["n_file_rel_jxl_e7"] = rel(c, REFERENCE_E7, files=True)
        s["codecs"][c] = row
    return s


def check_targets(results: dict) -> dict:
    """The issue's targets, evaluated on held-out images when the model records its hold-out list."""
    objs = results["_objects"]
    held = [o for o in objs if o.held_out]
    basis = "held-out images (per the model's hold-out list)" if held else \
        "all images (the model records no hold-out list matching them: make sure these sources were not used " \
        "for training)"
    use = held or objs
    codecs = [c["name"] for c in results["codecs"]]
    summ = summarise(use, codecs)
    ours, jls = summ["codecs"].get(OURS, {}), summ["codecs"].get(REFERENCE, {})
    groups = {}
    for o in use:
        groups.setdefault(o.group, []).append(o)
    worst = None
    for g, go in groups.items():
        r = summarise(go, codecs)["codecs"].get(OURS, {}).get(
            "file_rel_jxl_e7" if results["settings"]["files"] else "rel_jxl_e7")
        if r is not None and (worst is None or r > worst[1]):
            worst = (g, r)
    t = []

    def add(name, value, ok, detail):
        t.append({"target": name, "value": value, "pass": None if value is None else bool(ok), "detail": detail})

    level = "file" if results["settings"]["files"] else "pixel-level"
    pre = "file_" if results["settings"]["files"] else ""
    v = ours.get(pre + "rel_jpegls")
    add(f"{level} size vs JPEG-LS (geo-mean) <= 0.85", v, v is not None and v <= TARGET_FILE_VS_JPEGLS, "")
    v = ours.get(pre + "rel_jxl_e7")
    add(f"{level} size vs JXL-e7 (geo-mean) <= 0.95", v, v is not None and v <= TARGET_FILE_VS_JXL_E7, "")
    add(f"no group worse than JXL-e7 (worst group {level} size vs JXL-e7 <= 1)", worst[1] if worst else None,
        worst is not None and worst[1] <= 1.0, f"worst group {worst[0]}" if worst else "")
    v, ref = ours.get("dec_mbps"), jls.get("dec_mbps")
    add("decode >= 20 MB/s", v, v is not None and v >= TARGET_DECODE_MBPS, "")
    add("decode within 8x of JPEG-LS (JPEG-LS decode speed / ours <= 8)", (ref / v) if v and ref else None,
        v is not None and ref is not None and ref / v <= TARGET_DECODE_WITHIN,
        f"JPEG-LS decodes {ref:.1f} MB/s" if ref else "")
    v = ours.get("enc_mbps")
    add("encode >= 10 MB/s", v, v is not None and v >= TARGET_ENCODE_MBPS, "")
    return {"basis": basis, "objects": len(use), "targets": t}


# ---------------------------------------------------------------------------------------------- output

def _f(v, fmt="{:.3f}", width=0):
    s = "-" if v is None else fmt.format(v)
    return s.rjust(width) if width else s


def _mbps(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def format_table(results: dict) -> str:
    codecs = results["codecs"]
    lines = []
    st = results["settings"]
    lines.append(f"dicom-nncodec bench: {results['overall']['objects']} images, {results['overall']['frames']} frames, "
                 f"{results['overall']['raw_bytes'] / 1e6:.2f} MB raw; device {st['device']}, {st['threads']} thread(s), "
                 f"median of up to {st['repeat']} runs, max frames per image {st['max_frames'] or 'all'}")
    lines.append("bpp = compressed bits per pixel; ratio = geo-mean raw (Bits Allocated) / compressed; "
                 "vs JLS / vs e7 = geo-mean size relative to JPEG-LS / JXL-e7; MB/s of raw pixels; "
                 "file = whole DICOM file, headers included")
    head = (f"{'codec':<9}{'bpp':>7}{'ratio':>7}{'vs JLS':>8}{'vs e7':>7}{'enc MB/s':>10}{'dec MB/s':>10}"
            f"{'file ratio':>11}{'file/JLS':>9}{'file/e7':>8}  notes")

    def block(title, s):
        lines.append("")
        bs = ",".join(str(b) for b in s["bits_stored"])
        lines.append(f"== {title}: {s['objects']} images, {s['frames']} frames, {s['raw_bytes'] / 1e6:.2f} MB raw, "
                     f"bits stored {bs}")
        lines.append(head)
        for c in codecs:
            r = s["codecs"].get(c["name"], {})
            notes = []
            if r.get("errors"):
                notes.append(f"{r['errors']} ERROR(S)")
            if r.get("not_applicable"):
                notes.append(f"{r['not_applicable']} n/a")
            if r.get("objects", 0) < s["objects"] and not notes:
                notes.append(f"{r.get('objects', 0)} of {s['objects']} images")
            lines.append(f"{c['label']:<9}{_f(r.get('bpp'), '{:.3f}', 7)}{_f(r.get('ratio'), '{:.2f}', 7)}"
                         f"{_f(r.get('rel_jpegls'), '{:.3f}', 8)}{_f(r.get('rel_jxl_e7'), '{:.3f}', 7)}"
                         f"{_mbps(r.get('enc_mbps')):>10}{_mbps(r.get('dec_mbps')):>10}"
                         f"{_f(r.get('file_ratio'), '{:.2f}', 11)}{_f(r.get('file_rel_jpegls'), '{:.3f}', 9)}"
                         f"{_f(r.get('file_rel_jxl_e7'), '{:.3f}', 8)}  {'; '.join(notes)}")

    for g, s in results["groups"].items():
        block(g, s)
    block("overall", results["overall"])

    lines.append("")
    lines.append("== this codec by group (geo-means; file = headers included)")
    lines.append(f"{'group':<32}{'imgs':>5}{'frames':>7}{'px/JLS':>8}{'px/e7':>7}{'file/JLS':>9}{'file/e7':>8}"
                 f"{'enc MB/s':>9}{'dec MB/s':>9}{'JLS dec':>9}")
    rows = list(results["groups"].items()) + [("overall", results["overall"])]
    for g, s in rows:
        o, j = s["codecs"].get(OURS, {}), s["codecs"].get(REFERENCE, {})
        lines.append(f"{g[:31]:<32}{s['objects']:>5}{s['frames']:>7}{_f(o.get('rel_jpegls'), '{:.3f}', 8)}"
                     f"{_f(o.get('rel_jxl_e7'), '{:.3f}', 7)}{_f(o.get('file_rel_jpegls'), '{:.3f}', 9)}"
                     f"{_f(o.get('file_rel_jxl_e7'), '{:.3f}', 8)}{_mbps(o.get('enc_mbps')):>9}"
                     f"{_mbps(o.get('dec_mbps')):>9}{_mbps(j.get('dec_mbps')):>9}")

    tg = results.get("targets")
    if tg:
        lines.append("")
        lines.append(f"== targets, over {tg['objects']} image(s): {tg['basis']}")
        for t in tg["targets"]:
            mark = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
            lines.append(f"  [{mark}] {t['target']}: {_f(t['value'], '{:.3f}')}"
                         + (f"  ({t['detail']})" if t["detail"] else ""))

    if results["skipped"]:
        n = sum(len(v) for v in results["skipped"].values())
        lines.append("")
        lines.append(f"skipped {n} file(s):")
        for reason, paths in sorted(results["skipped"].items(), key=lambda kv: -len(kv[1])):
            ex = f" (e.g. {paths[0]})" if paths else ""
            lines.append(f"  {len(paths):>5}  {reason}{ex}")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    if results["errors"]:
        lines.append("")
        lines.append(f"ERRORS ({len(results['errors'])}): lossless results that failed verification or coding")
        for e in results["errors"]:
            lines.append(f"  ERROR  {e['codec']:<8} {e['what']:<6} {e['path']}: {e['message']}")
    return "\n".join(lines)


def check_plotting(parser: argparse.ArgumentParser, plot) -> None:
    """Refuse ``--plot`` before any work when matplotlib is missing, not after a long run (whose
    results would be lost with the traceback)."""
    import importlib.util
    if plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install 'dicom-nncodec[plot]'")


def write_plot(results: dict, path: str | os.PathLike) -> None:
    """Size against decode speed, one point per codec (overall), decode speed on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ov = results["overall"]["codecs"]
    use_rel = any(r.get("rel_jpegls") for r in ov.values())
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for c in results["codecs"]:
        r = ov.get(c["name"], {})
        x, y = r.get("dec_mbps"), (r.get("rel_jpegls") if use_rel else r.get("bpp"))
        if not x or y is None:
            continue
        ours = c["name"] == OURS
        ax.scatter([x], [y], s=70 if ours else 45, marker="*" if ours else "o", color="C3" if ours else "C0",
                   zorder=3)
        ax.annotate(c["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)
    ax.axvline(TARGET_DECODE_MBPS, color="grey", ls=":", lw=1)
    if use_rel:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(TARGET_FILE_VS_JPEGLS, color="C3", ls=":", lw=1)
        ax.set_ylabel("size relative to JPEG-LS (geo-mean; lower is better)")
    else:
        ax.set_ylabel("bits per pixel (lower is better)")
    ax.set_xlabel("decode throughput, MB/s of raw pixels (log)")
    ov_all = results["overall"]
    ax.set_title(f"{ov_all['objects']} images, {ov_all['frames']} frames, "
                 f"{results['settings']['threads']} thread(s), device {results['settings']['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def to_json(results: dict) -> dict:
    out = {k: v for k, v in results.items() if not k.startswith("_")}
    out["objects"] = [dict(asdict(o), pixels=o.pixels, raw_bytes=o.raw_bytes) for o in results["_objects"]]
    return out


# ---------------------------------------------------------------------------------------------- run

def run(paths: Sequence[str | os.PathLike], groups_by: str = "folder", plot: str | os.PathLike | None = None,
        device: str = "cpu", threads: int = 1, max_frames: int | None = None, repeat: int = 3,
        codecs: Sequence[str] | None = None, files: bool = True, json_path: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark every usable DICOM image under ``paths``; returns the results (see ``format_table``).

    ``codecs`` restricts the baselines (``jpegls``, ``j2k``, ``htj2k``, ``jxl-e3``, ``jxl-e7``); this codec
    always runs.  ``files=False`` skips the file-level sizes (they cost one more encode per image)."""
    import pydicom
    import torch

    from . import baselines as bl
    from .codec import encode_frames, resolve_device
    from .errors import UnsupportedPixelData
    from .pixels import PixelFormat
    from .zoo import default_model, load_model

    if groups_by not in GROUPINGS:
        raise ValueError(f"groups_by must be one of {', '.join(GROUPINGS)}")
    say = progress or (lambda msg: None)
    torch.set_num_threads(max(1, int(threads)))
    dev = str(resolve_device(device))
    if codecs:
        unknown = sorted(set(codecs) - set(bl.BASELINE_NAMES))
        if unknown:
            raise ValueError(f"unknown codec(s) {', '.join(unknown)} (known: {', '.join(bl.BASELINE_NAMES)})")
    baselines, notes = bl.available_baselines(threads=threads, names=list(codecs) if codecs else None)
    names = [OURS] + [b.name for b in baselines]
    if REFERENCE not in names:
        notes.append("JPEG-LS is not in this run: the 'vs JLS' columns are empty")
    if REFERENCE_E7 not in names:
        notes.append("JXL-e7 is not in this run: the 'vs e7' columns are empty")

    hold_out = _model_hold_out()
    load_model(default_model())
    warm = np.zeros((32, 32), np.uint16)   # first-call costs (model load, kernel set-up) stay out of the timings
    encode_frames([warm], PixelFormat(32, 32, 1, 16, 12, False, "MONOCHROME2"), device=dev)

    all_files, missing = find_files(paths)
    groups_of = folder_groups(all_files)
    skipped: dict[str, list[str]] = {}
    if missing:
        skipped["path not found"] = missing
    objs: list[ObjectResult] = []
    errors: list[dict] = []
    masked = 0

    def skip(reason, path):
        skipped.setdefault(reason, []).append(str(path))

    for i, path in enumerate(all_files, 1):
        try:
            ds, fmt, idx, frames, n_total = read_image(path, max_frames)
        except Skipped as exc:
            skip(str(exc), path)
            continue
        refs = [normalise(f, fmt) for f in frames]
        if any(not _same(f, r) for f, r in zip(frames, refs)):
            masked += 1
        if groups_by == "folder":
            group = groups_of[path.resolve().parent]
        elif groups_by == "modality":
            group = str(ds.get("Modality", "") or "unknown")
        elif groups_by == "file":
            group = path.name
        else:
            group = "all"
        obj = ObjectResult(str(path), group, str(ds.get("Modality", "") or ""), fmt.rows, fmt.columns,
                           fmt.samples_per_pixel, fmt.bits_allocated, fmt.bits_stored, fmt.signed, fmt.photometric,
                           len(idx), n_total, (any(h in path.resolve().as_posix() for h in hold_out)
                                               if hold_out else None))
        try:
            m, ours_frames = measure_ours(frames, refs, fmt, dev, repeat)
        except UnsupportedPixelData as exc:
            skip(f"unsupported by this codec: {exc}", path)
            continue
        obj.codecs[OURS] = m
        coded: dict[str, list[bytes]] = {}
        for b in baselines:
            obj.codecs[b.name], enc = measure_baseline(b, refs, fmt, repeat)
            if enc is not None:
                coded[b.name] = enc
        for c, mm in obj.codecs.items():
            if mm.status == "error":
                errors.append({"path": obj.path, "codec": c, "what": "frames", "message": mm.message})
        if files:
            measure_files(obj, source_dataset(ds, refs, fmt, n_total, idx), refs, ours_frames, coded, baselines, dev,
                          errors)
        objs.append(obj)
        o, j = obj.codecs[OURS], obj.codecs.get(REFERENCE)
        say(f"[{i}/{len(all_files)}] {group}/{path.name} {fmt.rows}x{fmt.columns}"
            f"{' ' + fmt.photometric if fmt.samples_per_pixel == 3 else ''}, {len(idx)} of {n_total} frame(s), "
            f"{fmt.bits_stored} bits {'signed' if fmt.signed else 'unsigned'}: "
            + (f"{OURS_LABEL} {8 * o.bytes / obj.pixels:.3f} bpp" if o.status == "ok" else f"{OURS_LABEL} {o.status}")
            + (f", JPEG-LS {8 * j.bytes / obj.pixels:.3f} bpp" if j is not None and j.status == "ok" else ""))
    na: dict[tuple[str, str], int] = {}
    for o in objs:
        for c, mm in o.codecs.items():
            if mm.status == "n/a":
                na[(c, mm.message)] = na.get((c, mm.message), 0) + 1
    for (c, msg), n in sorted(na.items()):
        notes.append(f"{c} left out on {n} image(s): {msg}")
    if masked:
        notes.append(f"{masked} image(s) had bits set above High Bit; all codecs code the Bits Stored values")
    if files and objs:
        notes.append("file sizes: NNCodec via dicom_nncodec.compress, JPEG-LS via pydicom ds.compress"
                     "(JPEGLSLossless) (two's complement for signed data, as pydicom writes it; the frame-level "
                     "JPEG-LS column uses offset binary), others = their verified frames encapsulated under their "
                     "standard transfer syntaxes; all with the same header")
    if max_frames and any(o.frames < o.frames_total for o in objs):
        notes.append("--max-frames: multi-frame images were reduced to evenly spaced frames"
                     + ("; their files keep only those frames' Per-frame Functional Groups" if files else ""))

    results: dict = {
        "settings": {"paths": [str(p) for p in paths], "groups_by": groups_by, "device": dev, "threads": threads,
                     "max_frames": max_frames, "repeat": repeat, "files": files, "torch": torch.__version__,
                     "pydicom": pydicom.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "cpu_count": os.cpu_count(),
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "libraries": bl.library_versions(),
                     "model": default_model(), "model_hold_out": hold_out},
        "codecs": [{"name": OURS, "label": OURS_LABEL, "note": "this codec, end to end (encode_frames/decode_frames)",
                    "transfer_syntax": "NNCodecLossless"}]
        + [{"name": b.name, "label": b.label, "note": b.note, "transfer_syntax": b.transfer_syntax} for b in baselines],
        "skipped": skipped, "errors": errors, "notes": notes, "_objects": objs,
    }
    by_group: dict[str, list[ObjectResult]] = {}
    for o in objs:
        by_group.setdefault(o.group, []).append(o)
    results["groups"] = {g: summarise(v, names) for g, v in sorted(by_group.items())}
    results["overall"] = summarise(objs, names)
    results["targets"] = check_targets(results) if objs else None
    if plot and objs:
        write_plot(results, plot)
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(results), indent=1))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--lossy" in argv or "--near-lossless" in argv:
        from . import bench_lossy
        return bench_lossy.main(argv)
    p = argparse.ArgumentParser(
        prog="dicom-nncodec bench",
        description="Size and speed of this codec beside JPEG-LS, JPEG 2000, HTJ2K and JPEG-XL (efforts 3, 7), "
                    "on the same frames in one run; every lossless result verified bit-exact.",
        epilog="Lossy and near-lossless: dicom-nncodec bench --lossy / --near-lossless (see bench --lossy --help).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--plot", metavar="FILE.png", help="write size against decode speed to this PNG")
    p.add_argument("--json", metavar="FILE", help="write every measurement to this JSON file")
    p.add_argument("--group-by", choices=GROUPINGS, default="folder",
                   help="image groups: source folder (default), Modality, file, or none")
    p.add_argument("--model", default=None, help="shipped model to encode with (default: the current default; "
                   "e.g. nnc-lossless-1-nolstm for the ablation without the ConvLSTM)")
    p.add_argument("--device", default="cpu", help="device for this codec: cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="threads for every codec (default 1)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="code at most N evenly spaced frames per image")
    p.add_argument("--repeat", type=int, default=3,
                   help=f"timing runs per measurement, median taken (fewer once {RUN_BUDGET_S:g} s are spent)")
    p.add_argument("--codecs", default=None,
                   help="comma-separated baselines to run (jpegls,j2k,htj2k,jxl-e3,jxl-e7; default all)")
    p.add_argument("--no-files", action="store_true", help="skip the file-level sizes (saves one encode per image)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeat < 1 or (a.max_frames is not None and a.max_frames < 1):
        p.error("--threads, --repeat and --max-frames must be at least 1")
    check_plotting(p, a.plot)

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    from .errors import NNCodecError

    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()] if a.codecs else None
    if a.model:
        os.environ["DICOM_NNCODEC_MODEL"] = a.model      # read by codec.encode_frames via zoo.default_model()
    try:
        results = run(a.paths, groups_by=a.group_by, plot=a.plot, device=a.device, threads=a.threads,
                      max_frames=a.max_frames, repeat=a.repeat, codecs=codecs, files=not a.no_files,
                      json_path=a.json, progress=None if a.quiet else progress)
    except (NNCodecError, ValueError, OSError) as exc:  # a setup problem (device, model, codec names)
        print(f"dicom-nncodec bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not results["_objects"]:
        print(format_table(results) if results["skipped"] else "no DICOM images found")
        return 2
    print(format_table(results))
    if a.plot:
        print(f"plot written to {a.plot}")
    if a.json:
        print(f"results written to {a.json}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
