"""Training images: folders of DICOM files and PNGs turned into unsigned planes, and random crops.

Why a group per source folder: sources differ wildly in size and count (one CR
image against 200 chest PNGs), so crops are drawn per modality group with
fixed weights, and whole sources can be held out for evaluation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NNCodecError
from ..pixels import PixelFormat, to_planes

log = logging.getLogger(__name__)

MAX_FRAMES_PER_OBJECT = 16
GROUP_WEIGHTS = {"ct": 0.3, "mr": 0.3, "radiograph": 0.3, "other": 0.1}


@dataclass
class Plane:
    pixels: np.ndarray          # (h, w) uint16, values < 2**bits
    bits: int
    source: str


@dataclass
class TrainingSet:
    groups: dict[str, list[Plane]] = field(default_factory=dict)

    def add(self, group: str, plane: Plane):
        self.groups.setdefault(group, []).append(plane)

    def describe(self) -> dict:
        return {g: {"planes": len(v), "pixels": int(sum(p.pixels.size for p in v)),
                    "sources": sorted({p.source for p in v})} for g, v in sorted(self.groups.items())}


def modality_group(path: Path, modality: str | None) -> str:
    m = (modality or "").upper()
    if m == "CT":
        return "ct"
    if m == "MR":
        return "mr"
    if m in ("CR", "DX", "DR", "MG", "RG") or path.suffix.lower() == ".png":
        return "radiograph"
    return "other"


def _source_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return str(rel.parent) if rel.parent != Path(".") else root.name


def load_training_set(roots: list[str], hold_out: list[str], max_png: int | None = None) -> TrainingSet:
    """Read every usable image under ``roots`` whose path contains none of ``hold_out``."""
    import pydicom
    from PIL import Image

    ts = TrainingSet()
    for root in map(Path, roots):
        files = sorted(p for p in root.rglob("*") if p.is_file())
        pngs = 0
        for path in files:
            rel = str(path.relative_to(root.parent))
            if any(h in rel for h in hold_out):
                continue
            source = _source_of(path, root)
            try:
                if path.suffix.lower() == ".png":
                    if max_png is not None and pngs >= max_png:
                        continue
                    arr = np.asarray(Image.open(path))
                    if arr.ndim != 2:
                        continue
                    bits = 16 if arr.dtype == np.uint16 else 8
                    ts.add(modality_group(path, None), Plane(arr.astype(np.uint16), bits, source))
                    pngs += 1
                    continue
                ds = pydicom.dcmread(path)
                if "PixelData" not in ds or ds.get("LossyImageCompression", "00") == "01":
                    continue
                fmt = PixelFormat.from_dataset(ds).validate()
                if fmt.samples_per_pixel != 1 or fmt.photometric == "PALETTE COLOR":
                    continue
                arr = ds.pixel_array
                frames = arr[None] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else arr
                step = max(1, len(frames) // MAX_FRAMES_PER_OBJECT)
                for f in frames[::step][:MAX_FRAMES_PER_OBJECT]:
                    plane = to_planes(f, fmt)[0]
                    ts.add(modality_group(path, ds.get("Modality")),
                           Plane(plane.astype(np.uint16), fmt.bits_stored, source))
            except (NNCodecError, Exception) as exc:  # a bad training file is skipped, and said so
                log.info("skipping %s: %s", path, exc)
    return ts


class CropSampler:
    """Random crops (with flips and transposes) drawn group by group."""

    def __init__(self, ts: TrainingSet, seed: int, weights: dict[str, float] | None = None):
        self.ts = ts
        self.rng = np.random.default_rng(seed)
        weights = weights or GROUP_WEIGHTS
        self.groups = [g for g in weights if ts.groups.get(g)]
        w = np.array([weights[g] for g in self.groups])
        self.weights = w / w.sum()

    def batch(self, n: int, size: int):
        out, bits = [], []
        for _ in range(n):
            for _attempt in range(50):
                g = self.groups[self.rng.choice(len(self.groups), p=self.weights)]
                planes = self.ts.groups[g]
                p = planes[self.rng.integers(len(planes))]
                h, w = p.pixels.shape
                if h >= size and w >= size:
                    break
            y = self.rng.integers(h - size + 1)
            x = self.rng.integers(w - size + 1)
            c = p.pixels[y:y + size, x:x + size]
            if self.rng.random() < 0.5:
                c = c[:, ::-1]
            if self.rng.random() < 0.5:
                c = c[::-1]
            if self.rng.random() < 0.5:
                c = c.T
            out.append(np.ascontiguousarray(c))
            bits.append(p.bits)
        return np.stack(out).astype(np.int64), np.array(bits, dtype=np.int64)

    def state(self):
        return self.rng.bit_generator.state

    def restore(self, state):
        self.rng.bit_generator.state = state

