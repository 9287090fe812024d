"""Quantisation-aware training of the lossless context model, and export.

Reproducible: everything random is seeded, every ``log_every`` iterations a
JSON line goes to ``<out>/train.log``, and ``<out>/checkpoint.pt`` (model,
optimiser, sampler and iteration) is written every ``checkpoint_every``
iterations, so ``--resume`` continues exactly where a run stopped.  The loss
is the ideal code length in bits per pixel of the very integer grid the
exported model uses (straight-through rounding), so the exported weights
code at the trained rate.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import pyramid as P
from ..models.context_model import ContextModel, PyramidRun, logistic_bits
from .data import CropSampler, load_training_set
from .run_folder import RunFolder, cosine_lr, set_lr

log = logging.getLogger(__name__)
SMALL_CROP_SHARE = 0.3


@dataclass
class TrainConfig:
    roots: list[str]
    out: str
    model_id: str = "nnc-lossless-1"
    hold_out: list[str] = field(default_factory=list)
    use_lstm: bool = True
    width: int = 16
    iterations: int = 6000
    batch: int = 8
    crop: int = 128
    lr: float = 2e-3
    seed: int = 1
    threads: int = 1
    log_every: int = 50
    checkpoint_every: int = 250
    max_png: int | None = None


def batch_bits(model: ContextModel, crops: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Mean ideal code length (bits per pixel, base level excluded) of a batch, differentiable."""
    n, h, w = crops.shape
    sizes = P.level_sizes(h, w)
    levels = P.level_images(crops, sizes)
    total = []

    def code_step(phase, level, pred, mask):
        x = P.split_phases(levels[level], sizes[level + 1])[phase]
        mu = pred.mu4 / 4.0
        scale = torch.pow(2.0, (pred.j - P.SCALE_INDEX_OFFSET) / P.SCALES_PER_OCTAVE)
        b = logistic_bits(x.to(torch.float32), mu, scale)
        total.append((b * mask).sum())
        return torch.where(mask, x, pred.rounded_loc.detach().long())

    PyramidRun(model, bits, sizes, integer=False).run(levels[-1], code_step)
    return torch.stack(total).sum() / (n * h * w)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ts = load_training_set(cfg.roots, cfg.hold_out, cfg.max_png)
    run = RunFolder(cfg, ts.describe())
    sampler = CropSampler(ts, cfg.seed)
    model = ContextModel(width=cfg.width, use_lstm=cfg.use_lstm)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = run.resume(model, opt, sampler) if resume else 0
    t0, acc = time.time(), []
    for it in range(start, cfg.iterations):
        lr = cosine_lr(cfg.lr, it, cfg.iterations)
        set_lr(opt, lr)
        # small crops too, so the small (64-96 px) MR series of the training set are seen
        size = cfg.crop // 2 if sampler.rng.random() < SMALL_CROP_SHARE else cfg.crop
        crops, bits = sampler.batch(cfg.batch * (cfg.crop // size) ** 2, size)
        loss = batch_bits(model, torch.from_numpy(crops), torch.from_numpy(bits))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc.append(float(loss.detach()))
        if (it + 1) % cfg.log_every == 0:
            run.log({"iteration": it + 1, "bpp": float(np.mean(acc)), "lr": lr, "seconds": round(time.time() - t0, 1)})
            acc = []
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            run.checkpoint(model, opt, sampler, it + 1)
    run.close()
    return export(model, cfg)


def export(model: ContextModel, cfg: TrainConfig) -> Path:
    from ..zoo import write_weights

    model.export()
    path = Path(cfg.out) / f"{cfg.model_id}.nncw"
    digest = write_weights(path, cfg.model_id, model, extra={"hold_out": cfg.hold_out,
                                                               "iterations": cfg.iterations, "seed": cfg.seed})
    log.info("exported %s (sha256 %s)", path, digest.hex())
    return path
