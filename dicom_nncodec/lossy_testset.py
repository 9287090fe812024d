"""What ``dicom-nncodec bench --lossy / --near-lossless`` codes: seeded crops of PNG radiographs, and DICOM frames.

Why a module of its own: which pixels a lossy result is measured on decides
what it means.  Two kinds of input, told apart by the file suffix:

* PNG (8- or 16-bit greyscale; e.g. the NIH ChestX-ray14 chest X-rays of
  Sushmit et al.): random square crops of each requested size, drawn from a
  generator seeded by (seed, file name, size), so that a crop does not depend
  on which other files are in the run.  A crop whose standard deviation is
  below ``min_std`` grey levels (flat background: any codec is perfect there)
  is discarded and drawn again, at most ``DRAWS_PER_CROP`` times, as in the
  notes (codec-baselines.md, section 3.3).
* DICOM: whole frames, at most ``max_frames`` evenly spaced per object, read
  exactly as ``dicom-nncodec bench`` reads them (``bench.read_image``; lossy-
  derived images are skipped).  Colour and PALETTE COLOR images are skipped:
  PSNR/SSIM on palette indices or across colour models would mean nothing.

The patient-disjoint split: PNG files are named PATIENT_INDEX.png.  A model
trained on the first ``skip_first`` PNG files in sorted path order (what the
training loop's ``max_png`` takes) has seen those patients, so they and every
other image of the same patients are left out; ``patients`` (the
``--patients-from`` list) restricts the evaluation further.  The split is
returned as a record that the report prints.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .pixels import PixelFormat

DRAWS_PER_CROP = 20


@dataclass
class TestFrame:
    """One frame as every codec receives it: stored values in the Bits Allocated container."""
    source: str          # file path
    group: str           # "crop 128x128" for PNG crops, the folder group (e.g. "ct/wg04") for DICOM frames
    where: str           # "y=.. x=.." (crop) or "frame k of n"
    fmt: PixelFormat
    pixels: np.ndarray
    modality: str = ""


@dataclass
class PngSplit:
    """How the PNG files were split between the model's training and this evaluation."""
    skip_first: int
    patients_from: str | None
    files_found: int = 0
    training_files: int = 0
    training_patients: int = 0
    excluded_same_patient: int = 0
    excluded_not_listed: int = 0
    evaluated_files: int = 0
    evaluated_patients: int = 0
    first_evaluated: str = ""
    last_evaluated: str = ""

    def describe(self) -> str:
        if not self.files_found:
            return "no PNG files"
        s = (f"patient-disjoint split of {self.files_found} PNG files (sorted by path): the first "
             f"{self.training_files} ({self.training_patients} patients) are the training set and are left out")
        if self.excluded_same_patient:
            s += f", with {self.excluded_same_patient} later file(s) of the same patients"
        if self.patients_from:
            s += f"; only patients listed in {self.patients_from} ({self.excluded_not_listed} file(s) not listed)"
        s += f"; evaluated: {self.evaluated_files} files of {self.evaluated_patients} patients"
        if self.evaluated_files:
            s += f" ({self.first_evaluated} .. {self.last_evaluated})"
        return s


@dataclass
class TestSet:
    frames: list[TestFrame] = field(default_factory=list)
    split: PngSplit | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    crops_discarded: int = 0          # draws discarded for a standard deviation below min_std
    crops_missing: int = 0            # crops not found after DRAWS_PER_CROP draws, or images smaller than the crop

    def skip(self, reason: str, path) -> None:
        self.skipped.setdefault(reason, []).append(str(path))


def patient_of(path: Path) -> str:
    """The patient part of PATIENT_INDEX.png (the whole stem when there is no underscore)."""
    return path.stem.split("_")[0]


def split_pngs(pngs: Sequence[Path], skip_first: int, patients: set[str] | None = None,
               patients_from: str | None = None) -> tuple[list[Path], PngSplit]:
    """The PNG files to evaluate: after the first ``skip_first`` in sorted order, without their patients,
    and (when ``patients`` is given) only listed patients."""
    files = sorted(pngs, key=lambda p: p.as_posix())
    sp = PngSplit(skip_first, patients_from, files_found=len(files))
    train = files[:max(0, skip_first)]
    seen = {patient_of(p) for p in train}
    sp.training_files, sp.training_patients = len(train), len(seen)
    out = []
    for p in files[len(train):]:
        if patient_of(p) in seen:
            sp.excluded_same_patient += 1
        elif patients is not None and patient_of(p) not in patients:
            sp.excluded_not_listed += 1
        else:
            out.append(p)
    sp.evaluated_files, sp.evaluated_patients = len(out), len({patient_of(p) for p in out})
    if out:
        sp.first_evaluated, sp.last_evaluated = out[0].name, out[-1].name
    return out, sp


def read_png(path: Path) -> tuple[np.ndarray, int]:
    """(pixels, bits stored) of an 8- or 16-bit greyscale PNG; ValueError for anything else."""
    from PIL import Image
    with Image.open(path) as im:
        mode = im.mode
        a = np.asarray(im)
    if mode == "L":
        return np.ascontiguousarray(a, dtype=np.uint8), 8
    if mode in ("I;16", "I;16B", "I") and a.ndim == 2 and a.min(initial=0) >= 0 and a.max(initial=0) < 1 << 16:
        return np.ascontiguousarray(a, dtype=np.uint16), 16
    raise ValueError(f"PNG mode {mode} (8- or 16-bit greyscale only)")


def draw_crops(image: np.ndarray, size: int, count: int, seed: int, key: str, min_std: float
               ) -> tuple[list[tuple[int, int]], int, int]:
    """Top-left corners of ``count`` random size x size crops with standard deviation >= ``min_std``;
    the number of draws discarded, and of crops not found."""
    h, w = image.shape[:2]
    if h < size or w < size:
        return [], 0, count
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), size])
    corners, discarded, missing = [], 0, 0
    for _ in range(count):
        for _ in range(DRAWS_PER_CROP):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            if float(image[y:y + size, x:x + size].std()) >= min_std:
                corners.append((y, x))
                break
            discarded += 1
        else:
            missing += 1
    return corners, discarded, missing


def collect(paths: Sequence[str | Path], *, sizes: Sequence[int] = (128, 256), crops: int = 4, seed: int = 0,
            min_std: float = 2.0, skip_first: int = 0, patients: set[str] | None = None,
            patients_from: str | None = None, max_frames: int | None = 2) -> TestSet:
    """Every frame the lossy benchmarks code, from the PNG and DICOM files under ``paths``."""
    from .bench import Skipped, find_files, folder_groups, normalise, read_image

    files, missing = find_files(paths)
    ts = TestSet()
    for m in missing:
        ts.skip("path not found", m)
    pngs = [f for f in files if f.suffix.lower() == ".png"]
    others = [f for f in files if f.suffix.lower() != ".png"]
    if pngs:
        chosen, ts.split = split_pngs(pngs, skip_first, patients, patients_from)
        for path in chosen:
            try:
                image, bits = read_png(path)
            except Exception as exc:
                ts.skip(f"PNG not usable: {exc}", path)
                continue
            for size in sizes:
                fmt = PixelFormat(size, size, 1, 8 if bits == 8 else 16, bits, False, "MONOCHROME2")
                corners, discarded, lost = draw_crops(image, size, crops, seed, path.name, min_std)
                ts.crops_discarded += discarded
                ts.crops_missing += lost
                for y, x in corners:
                    ts.frames.append(TestFrame(str(path), f"crop {size}x{size}", f"y={y} x={x}", fmt,
                                               np.ascontiguousarray(image[y:y + size, x:x + size]), "PNG"))
    groups = folder_groups(others)
    for path in others:
        try:
            ds, fmt, idx, frames, n_total = read_image(path, max_frames)
        except Skipped as exc:
            ts.skip(str(exc), path)
            continue
        if fmt.samples_per_pixel != 1 or fmt.photometric == "PALETTE COLOR":
            ts.skip("colour or palette image (the lossy benchmarks measure greyscale only)", path)
            continue
        for k, f in zip(idx, frames):
            ts.frames.append(TestFrame(str(path), groups[path.resolve().parent], f"frame {k + 1} of {n_total}", fmt,
                                       normalise(f, fmt), str(ds.get("Modality", "") or "")))
    return ts
