"""Training of the version-2 lossless model (``models/pixel_mlp.py``) from a crop file.

Why a crop file: training reads a fixed, compact set of crops drawn once from
the training sources (``make_crops``), so the same command trains on this CPU
or on a lent GPU with nothing but torch and numpy, and the crops say exactly
what the model saw.  The loss is the ideal code length of the integer grid the
exported model computes (straight-through rounding).  Every ``checkpoint_every``
iterations ``checkpoint.pt`` is written; ``resume`` continues from it; the run
ends at ``iterations`` or after ``minutes`` of wall time, whichever is first,
and exports the integer weights as ``engine.npz``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..models.pixel_mlp import PixelMLPModel

CROP = 128
GROUP_WEIGHTS_V2 = {"ct": 0.3, "mr": 0.25, "radiograph": 0.25, "other": 0.2}


def make_crops(roots: list[str], hold_out: list[str], out: str, count: int, seed: int = 0,
               max_png: int | None = None) -> dict:
    """Draw ``count`` crops of 128x128 (group-weighted, flipped and transposed at random) from every
    usable image under ``roots`` outside ``hold_out``; write them, their bit depths and the list of
    sources to ``out`` (compressed npz)."""
    from .data import CropSampler, load_training_set

    ts = load_training_set(roots, hold_out, max_png=max_png)
    sampler = CropSampler(ts, seed, GROUP_WEIGHTS_V2)
    crops, bits = sampler.batch(count, CROP)
    desc = ts.describe()
    np.savez_compressed(out, crops=crops.astype(np.uint16), bits=bits.astype(np.uint8),
                        sources=np.array(json.dumps(desc)))
    return desc


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-2)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.transpose(-1, -2)
    return x


def train(crops_file: str, out: str, *, iterations: int = 20000, minutes: float | None = None, batch: int = 32,
          lr: float = 3e-3, seed: int = 1, device: str = "cpu", checkpoint_every: int = 500,
          log_every: int = 100, resume: bool = False) -> PixelMLPModel:
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    data = np.load(crops_file)
    crops = torch.as_tensor(data["crops"].astype(np.int64), device=dev)
    bits = torch.as_tensor(data["bits"].astype(np.int64), device=dev)
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model = PixelMLPModel().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = 0
    ck = outp / "checkpoint.pt"
    if resume and ck.exists():
        state = torch.load(ck, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["it"]
    t0 = time.time()
    log = open(outp / "train.log", "a")
    ema = None
    it = start
    for it in range(start, iterations):
        frac = it / iterations
        if minutes:
            frac = max(frac, (time.time() - t0) / (60 * minutes))
            if frac >= 1:
                break
        for g in opt.param_groups:
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        idx = torch.randint(0, crops.shape[0], (batch,), generator=gen).to(dev)
        x = _augment(crops[idx], gen)
        loss = model.batch_bits(x, bits[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = float(loss)
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        if it % log_every == 0:
            line = {"it": it, "bpp": round(v, 4), "ema": round(ema, 4), "s": round(time.time() - t0, 1)}
            log.write(json.dumps(line) + "\n")
            log.flush()
            print(json.dumps(line), flush=True)
        if (it + 1) % checkpoint_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "it": it + 1}, ck)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "it": it + 1}, ck)
    model = model.cpu()
    model.export()
    np.savez(outp / "engine.npz", **model.engine_arrays())
    (outp / "summary.json").write_text(json.dumps({"iterations": it + 1, "seconds": round(time.time() - t0, 1),
                                                   "final_ema_bpp": ema, "batch": batch, "lr": lr,
                                                   "device": device, "crops": crops_file}))
    return model
