"""Training of the lossy RNN-Conv model (``models/rnnconv.py``), and export.

The loss is the mean over iterations of log10 of each crop's mean squared error
after that iteration (so every rate, not just the highest, is trained:
average PSNR over the rate ladder), plus the same term for one randomly
truncated iteration (only the first d bit channels sent), which teaches the
decoder to use partial iterations: that is how one model meets any requested
ratio.  Crops are normalised by their own range half of the time and by the
range of the whole plane otherwise, as the coder normalises whole frames.

Checkpoints, log lines and ``--resume`` work as in the lossless trainer.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import rnnconv as R
from .data import CropSampler, load_training_set
from .run_folder import RunFolder, cosine_lr, set_lr

log = logging.getLogger(__name__)
LOSSY_GROUP_WEIGHTS = {"radiograph": 0.5, "ct": 0.25, "mr": 0.25}
EPS = 1e-9


@dataclass
class LossyTrainConfig:
    roots: list[str]
    out: str
    model_id: str = "nnc-lossy-1"
    hold_out: list[str] = field(default_factory=list)
    width: int = 32
    iterations: int = 3000
    batch: int = 16
    crop: int = 64
    lr: float = 1e-3
    seed: int = 1
    threads: int = 2
    log_every: int = 25
    checkpoint_every: int = 100
    max_png: int | None = None


class RangeSampler(CropSampler):
    """Crops plus the (lo, span) used to normalise them: half the time the crop's own range, else a
    range up to 8 times wider that contains it (a crop of a frame with a wider range)."""

    def batch_with_range(self, n: int, size: int):
        c, _bits = self.batch(n, size)
        flat = c.reshape(n, -1)
        lo = flat.min(1)
        span = flat.max(1) - lo + 1
        widen = np.where(self.rng.random(n) < 0.5, 1.0, np.exp(self.rng.uniform(0, math.log(8), n)))
        wide = np.ceil(span * widen).astype(np.int64)
        lo = lo - np.floor(self.rng.random(n) * (wide - span)).astype(np.int64)
        return c, lo, wide


def batch_loss(model: R.RNNConvCodec, crops: torch.Tensor, lo: torch.Tensor, span: torch.Tensor,
               rng: np.random.Generator):
    n, h, w = crops.shape
    u = R.normalise(crops, lo, span)
    run = R.Unroll(model, (n, h, w), crops.device, u=u, integer=False, training=True)
    t_cut = int(rng.integers(R.ITERATIONS))
    depth = torch.from_numpy(rng.integers(1, R.BITS_PER_BLOCK + 1, size=n))
    keep = (torch.arange(R.BITS_PER_BLOCK).view(1, -1) < depth.view(-1, 1)).float().view(n, -1, 1, 1)
    logs, cut = [], None
    for t in range(R.ITERATIONS):
        bits = run.encode_bits(t)
        if t == t_cut:
            cut = _log_mse(u, run.decode(bits * keep, t, commit=False))
        logs.append(_log_mse(u, run.decode(bits, t)))
    per_iter = torch.stack(logs).mean(1)
    return (per_iter.sum() + cut.mean()) / (R.ITERATIONS + 1), per_iter.detach()


def _log_mse(u, recon):
    return torch.log10(((u - R.recon_float(recon)) ** 2).flatten(1).mean(1) + EPS)


def train(cfg: LossyTrainConfig, resume: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ts = load_training_set(cfg.roots, cfg.hold_out, cfg.max_png)
    run = RunFolder(cfg, ts.describe())
    sampler = RangeSampler(ts, cfg.seed, weights=LOSSY_GROUP_WEIGHTS)
    model = R.RNNConvCodec(cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = run.resume(model, opt, sampler) if resume else 0
    t0, acc = time.time(), []
    for it in range(start, cfg.iterations):
        lr = cosine_lr(cfg.lr, it, cfg.iterations)
        set_lr(opt, lr)
        crops, lo, span = sampler.batch_with_range(cfg.batch, cfg.crop)
        loss, per_iter = batch_loss(model, torch.from_numpy(crops), torch.from_numpy(lo), torch.from_numpy(span),
                                    sampler.rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc.append(per_iter.numpy())
        if (it + 1) % cfg.log_every == 0:
            m = np.mean(acc, 0)
            # -10*log10(mse) of the normalised range: PSNR with the plane's range as peak
            run.log({"iteration": it + 1, "psnr_per_iteration": [round(-10 * float(v), 2) for v in m],
                     "lr": lr, "seconds": round(time.time() - t0, 1)})
            acc = []
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            run.checkpoint(model, opt, sampler, it + 1)
    run.close()
    return export(cfg)


def estimate_code_counts(model: R.RNNConvCodec, sampler: RangeSampler, crops: int = 256, size: int = 128,
                         batch: int = 16) -> np.ndarray:
    """Counts of 0/1 codes per context (see ``entropy.BitTables``) over training crops, coded
    exactly as the codec codes them (integer decoder, deterministic binarisation)."""
    from ..entropy import BitTables

    counts = np.zeros((R.ITERATIONS * R.BITS_PER_BLOCK * 3, 2), dtype=np.int64)
    with torch.no_grad():
        for _ in range(crops // batch):
            c, lo, span = sampler.batch_with_range(batch, size)
            x = torch.from_numpy(c)
            run = R.Unroll(model, tuple(x.shape), x.device,
                           u=R.normalise(x, torch.from_numpy(lo), torch.from_numpy(span)), integer=True)
            prev = [None] * batch
            for t in range(R.ITERATIONS):
                bits = run.encode_bits(t)
                sym = (bits.numpy() > 0).astype(np.int64)
                for i in range(batch):
                    ctx = BitTables.contexts(t, prev[i], R.BITS_PER_BLOCK, R.BITS_PER_BLOCK, sym[i][0].size)
                    np.add.at(counts, (ctx, sym[i].reshape(-1)), 1)
                    prev[i] = sym[i] * 2 - 1
                run.decode(bits, t)
    return counts


def export(cfg: LossyTrainConfig) -> Path:
    """Weights file from the run's checkpoint: integer decoder, float encoder, code probabilities
    estimated on training crops."""
    from ..entropy import estimate_bit_probs
    from ..zoo import write_lossy_weights

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    model = R.RNNConvCodec(cfg.width)
    model.load_state_dict(state["model"])
    model.eval()
    model.export()
    ts = load_training_set(cfg.roots, cfg.hold_out, cfg.max_png)
    sampler = RangeSampler(ts, cfg.seed + 1, weights=LOSSY_GROUP_WEIGHTS)
    probs = estimate_bit_probs(estimate_code_counts(model, sampler, size=2 * cfg.crop))
    path = out / f"{cfg.model_id}.nncw"
    digest = write_lossy_weights(path, cfg.model_id, model, probs,
                                 extra={"hold_out": cfg.hold_out, "iterations": state["iteration"], "seed": cfg.seed,
                                        "max_png": cfg.max_png})
    log.info("exported %s (sha256 %s)", path, digest.hex())
    return path
