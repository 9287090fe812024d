"""``dicom-nncodec bench --lossy`` and ``--near-lossless``: fidelity at a given size, beside JPEG 2000, HTJ2K, JPEG-LS.

Why: a lossy mode is only worth shipping if, at the same compression ratio,
it keeps more of the image than what a PACS already has; and the published
experiment it follows (Sushmit et al. 2019, RNN-Conv on NIH ChestX-ray
crops, Tables I and II) must be reproducible with its comparison run
correctly.  So, in one run on the same frames:

* ``--lossy``: every codec codes every frame at each target ratio (2, 4, 8,
  16, 32 for PNG crops; 4, 8, 16 for DICOM frames; ``--ratios``), and is
  measured on the bytes it produced: achieved ratio (raw at Bits Allocated /
  frame bytes), PSNR with peak 2**BitsStored - 1 and with the frame's own
  range, SSIM (``image_quality``).  The paper's own figures are printed
  beside the measured rows, marked as such.
* ``--near-lossless``: this codec's ``max_error=N`` beside JPEG-LS NEAR=N on
  the same frames; bits per pixel, ratio, the verified maximum absolute
  error (above N is an error row and exit status 1), PSNR.

A target this codec refuses (``UnsupportedPixelData``) is an n/a row with
its reason; any other failure is an error row, never a crash or a silently
missing frame.  Inputs (crops, the patient-disjoint split, DICOM frames) come
from ``lossy_testset``; the codecs from ``lossy_codecs``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import image_quality as iq
from .lossy_codecs import (LOSSY_BASELINE_NAMES, NEAR_LOSSLESS_BASELINE_NAMES, RATE_TOLERANCE, LossyCodec,
                           available_codecs, library_versions)
from .lossy_testset import TestFrame, TestSet, collect

CROP_RATIOS = (2, 4, 8, 16, 32)
FRAME_RATIOS = (4, 8, 16)
MAX_ERRORS = (1, 2, 4)
BATCH = 16                   # frames given to a codec at once (this codec runs them through the network together)
OFF_TARGET = 0.10            # an achieved ratio further than this from the target is counted in the notes
MODES = {"ratio": "lossy", "max_error": "near-lossless"}

PAPER = "Sushmit et al. 2019 (arXiv 1904.12271), Tables I and II: 8-bit NIH ChestX-ray8 crops"
# (crop size, ratio) -> approach -> (SSIM, PSNR dB), as printed in the paper; its ratio is the nominal 256/beta
PAPER_TABLES: dict[tuple[int, int], dict[str, tuple[float, float]]] = {
    (128, 2): {"Proposed": (0.9645, 36.0152), "Toderici et al.": (0.9387, 32.1130), "JPEG 2000": (0.9801, 25.1276)},
    (128, 4): {"Proposed": (0.9592, 35.9795), "Toderici et al.": (0.9119, 30.8696), "JPEG 2000": (0.9681, 25.0529)},
    (128, 8): {"Proposed": (0.9579, 35.9325), "Toderici et al.": (0.8970, 30.4720), "JPEG 2000": (0.9409, 24.8608)},
    (256, 2): {"Proposed": (0.9525, 34.9721), "Toderici et al.": (0.9013, 31.9197), "JPEG 2000": (0.9783, 25.1051)},
    (256, 4): {"Proposed": (0.9517, 34.9002), "Toderici et al.": (0.8933, 30.2135), "JPEG 2000": (0.9713, 25.0797)},
    (256, 8): {"Proposed": (0.9509, 34.8701), "Toderici et al.": (0.8755, 30.0150), "JPEG 2000": (0.9500, 25.0208)},
}


# ---------------------------------------------------------------------------------------------- records

@dataclass
class Measurement:
    """One codec, one frame, one target.  status: ok, n/a (the codec refused this target) or error."""
    source: str
    group: str
    where: str
    codec: str
    mode: str                    # "ratio" or "max_error"
    target: float
    status: str = "ok"
    bytes: int = 0
    raw_bytes: int = 0
    pixels: int = 0
    ratio: float | None = None
    psnr: float | None = None          # peak 2**BitsStored - 1
    psnr_range: float | None = None    # peak = the frame's max - min
    ssim: float | None = None          # data range 2**BitsStored - 1
    ssim_range: float | None = None    # data range = the frame's max - min
    max_abs_error: int | None = None
    note: str = ""


def crop_size(group: str) -> int | None:
    """128 for the group "crop 128x128"; None for DICOM frame groups."""
    if group.startswith("crop "):
        return int(group.split()[1].split("x")[0])
    return None


def _targets(mode: str, frame: TestFrame, ratios: Sequence[float] | None, max_errors: Sequence[int]):
    if mode == "max_error":
        return list(max_errors)
    if ratios:
        return list(ratios)
    return list(CROP_RATIOS if crop_size(frame.group) else FRAME_RATIOS)


# ---------------------------------------------------------------------------------------------- measuring

def measure_frame(frame: TestFrame, decoded: np.ndarray, data: bytes, m: Measurement) -> Measurement:
    """Fill ``m`` with the size and fidelity of ``decoded`` against ``frame``."""
    ref = frame.pixels
    dec = np.asarray(decoded)
    if dec.shape != ref.shape:
        m.status, m.note = "error", f"decoded shape {dec.shape}, expected {ref.shape}"
        return m
    fmt = frame.fmt
    peak, rng = iq.nominal_peak(fmt.bits_stored), iq.range_peak(ref)
    m.bytes, m.raw_bytes, m.pixels = len(data), fmt.frame_bytes, fmt.rows * fmt.columns
    m.ratio = m.raw_bytes / len(data)
    m.max_abs_error = iq.max_abs_error(ref, dec)
    m.psnr, m.psnr_range = iq.psnr(ref, dec, peak), iq.psnr(ref, dec, rng)
    m.ssim, m.ssim_range = iq.ssim(ref, dec, peak), iq.ssim(ref, dec, rng)
    if m.mode == "max_error" and m.max_abs_error > m.target:
        m.status = "error"
        m.note = f"max error {m.max_abs_error} exceeds the bound {int(m.target)}"
    return m


def code_batch(codec: LossyCodec, frames: list[TestFrame], mode: str, target) -> list[Measurement]:
    """Encode ``frames`` (one pixel format) at ``target``, decode, measure; every frame gets a Measurement."""
    fmt = frames[0].fmt
    ms = [Measurement(f.source, f.group, f.where, codec.name, mode, target) for f in frames]

    def fail(i_list, msg):
        for i in i_list:
            ms[i].status, ms[i].note = "error", msg

    try:
        coded = codec.encode([f.pixels for f in frames], fmt, **{mode: target})
    except Exception as exc:
        fail(range(len(frames)), f"encode: {type(exc).__name__}: {exc}")
        return ms
    ok = []
    for i, c in enumerate(coded):
        if c.data is None:
            ms[i].status, ms[i].note = "n/a", c.refused or "refused"
        else:
            ms[i].note = c.note
            ok.append(i)
    if not ok:
        return ms
    try:
        decoded = codec.decode([coded[i].data for i in ok], fmt)
    except Exception as exc:
        fail(ok, f"decode: {type(exc).__name__}: {exc}")
        return ms
    for i, d in zip(ok, decoded):
        try:
            measure_frame(frames[i], d, coded[i].data, ms[i])
        except Exception as exc:
            fail([i], f"measure: {type(exc).__name__}: {exc}")
    return ms


def run_mode(ts: TestSet, codecs: list[LossyCodec], mode: str, ratios: Sequence[float] | None,
             max_errors: Sequence[int], say: Callable[[str], None]) -> list[Measurement]:
    """Every codec on every frame at every target of ``mode``; frames batched by group and pixel format."""
    batches: dict[tuple, list[TestFrame]] = {}
    for f in ts.frames:
        batches.setdefault((f.group, f.fmt), []).append(f)
    out: list[Measurement] = []
    for (group, fmt), frames in batches.items():
        for start in range(0, len(frames), BATCH):
            chunk = frames[start:start + BATCH]
            for target in _targets(mode, chunk[0], ratios, max_errors):
                line = []
                for codec in codecs:
                    if mode not in codec.modes:
                        continue
                    ms = code_batch(codec, chunk, mode, target)
                    out += ms
                    good = [m.psnr for m in ms if m.status == "ok" and m.psnr is not None and math.isfinite(m.psnr)]
                    bad = sum(m.status != "ok" for m in ms)
                    line.append(f"{codec.label} " + (f"{statistics.fmean(good):.1f} dB" if good else "-")
                                + (f" ({bad} not ok)" if bad else ""))
                say(f"{MODES[mode]} {group} {start + len(chunk)}/{len(frames)} "
                    f"{'ratio' if mode == 'ratio' else 'N ='} {target:g}: " + ", ".join(line))
    return out


# ---------------------------------------------------------------------------------------------- summaries

def _mean(v):
    return statistics.fmean(v) if v else None


def summarise(ms: list[Measurement]) -> list[dict]:
    """One row per (mode, group, target, codec): counts, mean/min PSNR (finite values; identical frames are
    counted as exact), mean SSIM, mean achieved ratio, bits per pixel and pooled ratio (Σ raw / Σ bytes),
    largest error, and the notes (n/a reasons, saturated/closest counts, frames off target)."""
    rows: dict[tuple, list[Measurement]] = {}
    for m in ms:
        rows.setdefault((m.mode, m.group, m.target, m.codec), []).append(m)
    out = []
    for (mode, group, target, codec), v in rows.items():
        ok = [m for m in v if m.status == "ok"]
        fin = [m for m in ok if m.psnr is not None and math.isfinite(m.psnr)]
        fin_r = [m for m in ok if m.psnr_range is not None and math.isfinite(m.psnr_range)]
        r: dict = {"mode": mode, "group": group, "target": target, "codec": codec, "frames": len(v),
                   "ok": len(ok), "not_applicable": sum(m.status == "n/a" for m in v),
                   "errors": sum(m.status == "error" for m in v), "exact": len(ok) - len(fin)}
        if ok:
            nbytes, raw, px = sum(m.bytes for m in ok), sum(m.raw_bytes for m in ok), sum(m.pixels for m in ok)
            r.update(mean_ratio=_mean([m.ratio for m in ok]), pooled_ratio=raw / nbytes, bpp=8 * nbytes / px,
                     mean_psnr=_mean([m.psnr for m in fin]), min_psnr=min((m.psnr for m in fin), default=None),
                     mean_psnr_range=_mean([m.psnr_range for m in fin_r]),
                     min_psnr_range=min((m.psnr_range for m in fin_r), default=None),
                     mean_ssim=_mean([m.ssim for m in ok]), mean_ssim_range=_mean([m.ssim_range for m in ok]),
                     max_abs_error=max(m.max_abs_error for m in ok),
                     off_target=sum(abs(m.ratio / target - 1) > OFF_TARGET for m in ok) if mode == "ratio" else 0)
        kinds: dict[str, int] = {}
        for m in v:
            if m.note:
                k = m.note if m.status != "ok" else m.note.split(":")[0]
                kinds[k] = kinds.get(k, 0) + 1
        r["notes"] = kinds
        out.append(r)
    return out


def paper_rows(group: str, target: float) -> list[dict]:
    """The paper's figures for this crop group and ratio (none for DICOM groups or ratios it did not report)."""
    size = crop_size(group)
    ref = PAPER_TABLES.get((size, int(target))) if size and float(target).is_integer() else None
    return [{"approach": a, "ssim": s, "psnr": p} for a, (s, p) in (ref or {}).items()]


# ---------------------------------------------------------------------------------------------- output

def _f(v, fmt="{:.2f}"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _notes(r: dict) -> str:
    parts = []
    for k, n in r["notes"].items():
        parts.append(f"{n}x {k}")
    if r.get("off_target"):
        parts.append(f"{r['off_target']} off target by > {OFF_TARGET:.0%}")
    if r.get("exact"):
        parts.append(f"{r['exact']} exact (PSNR inf, left out of the PSNR means)")
    return "; ".join(parts)


def format_tables(results: dict) -> str:
    """Markdown: the split and settings, then one table per mode and group."""
    st = results["settings"]
    labels = {c["name"]: c["label"] for c in results["codecs"]}
    lines = [f"# dicom-nncodec bench: {', '.join(MODES[m] for m in st['modes'])}", ""]
    lines.append(f"- inputs: {', '.join(st['paths'])}; {results['frames']} frames "
                 f"({', '.join(f'{g}: {n}' for g, n in results['frames_by_group'].items())})")
    if results.get("split"):
        lines.append(f"- split: {results['split']['text']}")
    if any(crop_size(g) for g in results["frames_by_group"]):
        lines.append(f"- crops: {st['crops']} per image and size, seed {st['seed']}, discarded when the standard "
                     f"deviation is below {st['min_std']:g} grey levels ({results['crops_discarded']} draws discarded "
                     f"and redrawn, {results['crops_missing']} crops not found)")
    lines.append(f"- ratio = raw (Bits Allocated) / bytes produced (J2K/HTJ2K: raw codestream; JPEG-LS: its "
                 f"codestream; NNCodec: frame bytes); PSNR peak 2^BitsStored-1; 'range' = peak/data range of the "
                 f"frame's own max-min; {iq.SSIM_DEFINITION}")
    lines.append(f"- device {st['device']}, {st['threads']} thread(s)")
    for c in results["codecs"]:
        lines.append(f"- {c['label']}: {c['note']}")

    for mode in st["modes"]:
        rows = [r for r in results["summary"] if r["mode"] == mode]
        for group in dict.fromkeys(r["group"] for r in rows):
            g = [r for r in rows if r["group"] == group]
            lines += ["", f"## {MODES[mode]}: {group}", ""]
            if mode == "ratio":
                lines.append("| target | codec | n | mean ratio | mean PSNR | min PSNR | mean PSNR (range) "
                             "| mean SSIM | mean SSIM (range) | notes |")
                lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
            else:
                lines.append("| N | codec | n | bpp | ratio | max abs error | mean PSNR | min PSNR "
                             "| mean PSNR (range) | notes |")
                lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
            for target in dict.fromkeys(r["target"] for r in g):
                for r in (x for x in g if x["target"] == target):
                    n = f"{r['ok']}" + (f" of {r['frames']}" if r["ok"] < r["frames"] else "")
                    label = labels.get(r["codec"], r["codec"])
                    if mode == "ratio":
                        lines.append(f"| {target:g} | {label} | {n} | {_f(r.get('mean_ratio'))} "
                                     f"| {_f(r.get('mean_psnr'))} | {_f(r.get('min_psnr'))} "
                                     f"| {_f(r.get('mean_psnr_range'))} | {_f(r.get('mean_ssim'), '{:.4f}')} "
                                     f"| {_f(r.get('mean_ssim_range'), '{:.4f}')} | {_notes(r)} |")
                    else:
                        lines.append(f"| {target:g} | {label} | {n} | {_f(r.get('bpp'), '{:.3f}')} "
                                     f"| {_f(r.get('pooled_ratio'))} | {_f(r.get('max_abs_error'), '{:d}')} "
                                     f"| {_f(r.get('mean_psnr'))} | {_f(r.get('min_psnr'))} "
                                     f"| {_f(r.get('mean_psnr_range'))} | {_notes(r)} |")
                if mode == "ratio":
                    for p in paper_rows(group, target):
                        lines.append(f"| {target:g} | paper: {p['approach']} | - | {target:g} (nominal) "
                                     f"| {p['psnr']:.2f} | - | - | {p['ssim']:.4f} | - | {PAPER.split(':')[0]} |")
    if results["notes"]:
        lines += ["", "## notes", ""] + [f"- {n}" for n in results["notes"]]
    if results["skipped"]:
        lines += ["", "## skipped", ""]
        for reason, paths in sorted(results["skipped"].items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {len(paths)} file(s): {reason} (e.g. {paths[0]})")
    if results["errors"]:
        lines += ["", f"## ERRORS ({len(results['errors'])})", ""]
        for e in results["errors"][:50]:
            lines.append(f"- {e['codec']} {MODES[e['mode']]} {e['target']:g} {e['source']} {e['where']}: {e['note']}")
        if len(results["errors"]) > 50:
            lines.append(f"- ... {len(results['errors']) - 50} more in the JSON")
    return "\n".join(lines)


def write_plot(results: dict, path: str | os.PathLike) -> None:
    """Rate-distortion: mean PSNR against mean achieved ratio.  One panel for the PNG crops (one line per
    codec per crop size, the paper's points marked) and one per DICOM group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if r["mode"] == "ratio" and r.get("mean_psnr") is not None]
    crop_groups = sorted({r["group"] for r in rows if crop_size(r["group"])}, key=crop_size)
    frame_groups = sorted({r["group"] for r in rows if not crop_size(r["group"])})
    panels = ([("PNG crops", crop_groups)] if crop_groups else []) + [(g, [g]) for g in frame_groups]
    if not panels:
        return
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.2 * nrow), dpi=110, squeeze=False)
    codecs = [c["name"] for c in results["codecs"]]
    labels = {c["name"]: c["label"] for c in results["codecs"]}
    styles = ["-", "--", ":", "-."]
    paper_markers = {"Proposed": "*", "Toderici et al.": "x", "JPEG 2000": "s"}
    for ax, (title, groups) in zip(axes.flat, panels):
        for gi, group in enumerate(groups):
            for ci, c in enumerate(codecs):
                pts = sorted((r["mean_ratio"], r["mean_psnr"]) for r in rows if r["group"] == group and r["codec"] == c)
                if pts:
                    ax.plot(*zip(*pts), styles[gi % len(styles)], marker="o", ms=3, color=f"C{ci}",
                            label=f"{labels[c]} {group}" if len(groups) > 1 else labels[c])
            size = crop_size(group)
            for approach, marker in paper_markers.items():
                pts = sorted((r, v[approach][1]) for (s, r), v in PAPER_TABLES.items() if s == size)
                if pts:
                    ax.plot(*zip(*pts), styles[gi % len(styles)], marker=marker, ms=7, color="grey", lw=0.8,
                            mfc="none" if gi else "grey", label=f"paper: {approach} {group}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("achieved compression ratio (raw / bytes, log)")
        ax.set_ylabel("mean PSNR, dB (peak 2^BitsStored-1)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(groups) > 1 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- run

def run(paths: Sequence[str | os.PathLike], *, lossy: bool = True, near_lossless: bool = False,
        ratios: Sequence[float] | None = None, max_errors: Sequence[int] = MAX_ERRORS,
        sizes: Sequence[int] = (128, 256), crops: int = 4, seed: int = 0, min_std: float = 2.0,
        skip_first: int = 0, patients_from: str | None = None, max_frames: int | None = 2,
        codecs: Sequence[str] | None = None, device: str = "cpu", threads: int = 1,
        json_path: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """The benchmark; returns the results (``format_tables`` prints them)."""
    import torch

    from .codec import resolve_device

    say = progress or (lambda msg: None)
    torch.set_num_threads(max(1, int(threads)))
    dev = str(resolve_device(device))
    patients = None
    if patients_from:
        patients = {ln.strip().split("_")[0] for ln in Path(patients_from).read_text().splitlines() if ln.strip()}
    ts = collect(paths, sizes=sizes, crops=crops, seed=seed, min_std=min_std, skip_first=skip_first,
                 patients=patients, patients_from=patients_from, max_frames=max_frames)
    modes = (["ratio"] if lossy else []) + (["max_error"] if near_lossless else [])
    notes: list[str] = []
    used: dict[str, LossyCodec] = {}
    ms: list[Measurement] = []
    for mode in modes:
        cs, n = available_codecs(mode, device=dev, names=codecs)
        notes += n
        used.update({c.name: c for c in cs})
        if ts.frames:
            ms += run_mode(ts, cs, mode, ratios, max_errors, say)
    by_group: dict[str, int] = {}
    for f in ts.frames:
        by_group[f.group] = by_group.get(f.group, 0) + 1
    na: dict[tuple[str, str], int] = {}
    for m in ms:
        if m.status == "n/a":
            na[(m.codec, m.note)] = na.get((m.codec, m.note), 0) + 1
    for (c, msg), k in sorted(na.items()):
        notes.append(f"{c} n/a on {k} frame-target(s): {msg}")
    results = {
        "settings": {"paths": [str(p) for p in paths], "modes": modes, "ratios": list(ratios) if ratios else
                     {"png_crops": list(CROP_RATIOS), "dicom_frames": list(FRAME_RATIOS)},
                     "max_errors": list(max_errors), "sizes": list(sizes), "crops": crops, "seed": seed,
                     "min_std": min_std, "skip_first": skip_first, "patients_from": patients_from,
                     "max_frames": max_frames, "device": dev, "threads": threads, "torch": torch.__version__,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "libraries": library_versions(), "ssim": iq.SSIM_DEFINITION,
                     "rate_tolerance_baselines": RATE_TOLERANCE},
        "codecs": [c.describe() for c in used.values()],
        "split": dict(asdict(ts.split), text=ts.split.describe()) if ts.split else None,
        "frames": len(ts.frames), "frames_by_group": by_group,
        "crops_discarded": ts.crops_discarded, "crops_missing": ts.crops_missing,
        "paper": {"source": PAPER, "tables": [{"size": s, "ratio": r, "approach": a, "ssim": v[0], "psnr": v[1]}
                                              for (s, r), d in PAPER_TABLES.items() for a, v in d.items()]},
        "summary": summarise(ms), "notes": notes, "skipped": ts.skipped,
        "errors": [asdict(m) for m in ms if m.status == "error"],
        "_measurements": ms,
    }
    if plot and not any(r["mode"] == "ratio" and r.get("mean_psnr") is not None for r in results["summary"]):
        notes.append("no plot written: it shows the lossy (--lossy) results, and there are none")
    elif plot:
        write_plot(results, plot)
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(results), indent=1))
    return results


def to_json(results: dict) -> dict:
    def clean(v):   # JSON has no inf: identical frames have PSNR "inf"
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    out = {k: v for k, v in results.items() if not k.startswith("_")}
    out["measurements"] = [asdict(m) for m in results["_measurements"]]
    return clean(out)


def _numbers(text: str, kind=float) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dicom-nncodec bench",
        description="Lossy: PSNR/SSIM at target compression ratios beside JPEG 2000 (OpenJPEG 9/7) and HTJ2K, on "
                    "seeded crops of PNG radiographs (the experiment of Sushmit et al. 2019, their figures printed "
                    "beside) and on DICOM frames. Near-lossless: max_error=N beside JPEG-LS NEAR=N. Same frames for "
                    "every codec, each measured on the bytes it produced.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="PNG and DICOM files or folders (searched recursively)")
    p.add_argument("--lossy", action="store_true", help="lossy at target ratios")
    p.add_argument("--near-lossless", action="store_true", help="near-lossless at maximum errors")
    p.add_argument("--ratios", type=_numbers, default=None,
                   help=f"target ratios (default {','.join(map(str, CROP_RATIOS))} for PNG crops, "
                        f"{','.join(map(str, FRAME_RATIOS))} for DICOM frames)")
    p.add_argument("--max-errors", type=lambda s: _numbers(s, int), default=list(MAX_ERRORS),
                   help=f"near-lossless bounds N (default {','.join(map(str, MAX_ERRORS))})")
    p.add_argument("--sizes", type=lambda s: _numbers(s, int), default=[128, 256], help="crop sizes (default 128,256)")
    p.add_argument("--crops", type=int, default=4, help="crops per PNG image and size (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop positions (default 0)")
    p.add_argument("--min-std", type=float, default=2.0,
                   help="discard crops whose standard deviation is below this, in grey levels (default 2)")
    p.add_argument("--skip-first", type=int, default=150, metavar="N",
                   help="leave out the first N PNG files in sorted order and all images of their patients "
                        "(files are PATIENT_INDEX.png): the training set (default 150, what the model was trained on)")
    p.add_argument("--patients-from", metavar="FILE",
                   help="evaluate only PNGs of the patients listed in FILE (one PATIENT or file name per line)")
    p.add_argument("--max-frames", type=int, default=2, metavar="N",
                   help="DICOM: at most N evenly spaced frames per object (default 2)")
    p.add_argument("--codecs", default=None, help="comma-separated baselines to run (j2k,htj2k,jpegls; default all)")
    p.add_argument("--device", default="cpu", help="device for this codec: cpu (default), cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="threads (default 1)")
    p.add_argument("--json", metavar="FILE", help="write every measurement to this JSON file")
    p.add_argument("--plot", metavar="FILE.png", help="write the rate-distortion plot (PSNR against ratio)")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the tables to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    if not (a.lossy or a.near_lossless):
        p.error("give --lossy and/or --near-lossless")
    if a.crops < 1 or a.threads < 1 or (a.max_frames is not None and a.max_frames < 1) or a.skip_first < 0:
        p.error("--crops, --threads and --max-frames must be at least 1, --skip-first at least 0")
    if a.ratios is not None and any(r <= 1 for r in a.ratios):
        p.error("--ratios must be above 1")
    if any(n < 1 for n in a.max_errors):
        p.error("--max-errors must be at least 1")
    from .bench import check_plotting
    check_plotting(p, a.plot)
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()] if a.codecs else None
    if codecs:
        unknown = sorted(set(codecs) - set(LOSSY_BASELINE_NAMES) - set(NEAR_LOSSLESS_BASELINE_NAMES))
        if unknown:
            p.error(f"unknown codec(s) {', '.join(unknown)}")

    from .errors import NNCodecError
    try:
        results = run(a.paths, lossy=a.lossy, near_lossless=a.near_lossless, ratios=a.ratios, max_errors=a.max_errors,
                      sizes=a.sizes, crops=a.crops, seed=a.seed, min_std=a.min_std, skip_first=a.skip_first,
                      patients_from=a.patients_from, max_frames=a.max_frames, codecs=codecs, device=a.device,
                      threads=a.threads, json_path=a.json, plot=a.plot,
                      progress=None if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    except (NNCodecError, ValueError, OSError) as exc:
        print(f"dicom-nncodec bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    text = format_tables(results)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if not results["frames"]:
        print("no frames to code (see skipped)", file=sys.stderr)
        return 2
    for what, path in (("plot", a.plot), ("results", a.json), ("tables", a.markdown)):
        if path and Path(path).exists():
            print(f"{what} written to {path}", file=sys.stderr)
    return 1 if results["errors"] else 0
