"""Format version 1, lossless and near-lossless: planes through the torch ConvLSTM pyramid.

Why a module of its own: version-1 frames decode bit-exactly forever (golden
bitstreams guard it), but new lossless data is written in version 2 by the
compiled engine; only near-lossless still encodes here.  Keeping the torch
loop apart lets ``codec`` dispatch without importing torch, so reading a
version-2 frame never pays for it.

The network runs once per pyramid step for a whole batch of same-sized planes;
every plane has its own range-coded stream and every number that reaches the
coder is an integer computed exactly, so results never depend on the batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .entropy import SCALE_ADJUST_BITS, SCALE_ADJUST_ZERO, StepDecoder, StepEncoder
from .models import pyramid as P
from .models.context_model import PyramidRun
from .zoo import LoadedModel


def _nl_shift(max_error: int, thresholds: torch.Tensor) -> int:
    """Scale-index shift for residuals quantised by 2N+1: floor(Q*log2(2N+1)), by table lookup."""
    return int(torch.bucketize(torch.tensor([2 * max_error + 1]), thresholds, right=True)[0])


def _positions(mask: torch.Tensor):
    """The coded positions of a step (raster order); None when every position is coded."""
    return None if bool(mask.all()) else mask.nonzero(as_tuple=True)


def _gather(t: torch.Tensor, sel) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if sel is None else t[:, sel[0], sel[1]]


def _scatter(fill: torch.Tensor, sel, values: np.ndarray, dev) -> torch.Tensor:
    """The step's grid: decoded values at coded positions, ``fill`` at pad positions."""
    v = torch.as_tensor(values, device=dev)
    if sel is None:
        return v.reshape(fill.shape)
    out = fill.clone()
    out[:, sel[0], sel[1]] = v
    return out


class PlaneBatch:
    """Runs the pyramid over a batch of planes, encoding (``x`` given) or decoding (``payloads`` given)."""

    def __init__(self, model: LoadedModel, dev, bits: np.ndarray, shape, max_error: int):
        self.model, self.dev, self.max_error = model, dev, max_error
        self.bits = bits
        self.n = len(bits)
        self.sizes = P.level_sizes(*shape)
        self.net = model.net_on(dev)
        self.nl_shift = _nl_shift(max_error, model.net.thresholds) if max_error else 0

    def _residual_params(self, pred, sel):
        mu4 = _gather(pred.mu4, sel).cpu().numpy()
        j = _gather(pred.j, sel).cpu().numpy()
        if self.max_error:
            return (mu4 + 2) >> 2, np.clip(j - self.nl_shift, 0, P.NUM_SCALES - 1), np.zeros_like(j)
        return mu4 >> 2, j, mu4 & 3

    def encode(self, x: torch.Tensor) -> tuple[list[bytes], torch.Tensor]:
        levels = P.level_images(x, self.sizes)
        coders = [StepEncoder(self.model.tables) for _ in range(self.n)]
        base = levels[-1].cpu().numpy().reshape(self.n, -1)
        for i, c in enumerate(coders):
            c.encode_uniform(base[i], int(self.bits[i]))
        step = 2 * self.max_error + 1
        maxv = torch.as_tensor((1 << self.bits) - 1, device=self.dev).view(-1, 1, 1)

        def code_step(phase, level, pred, mask):
            orig = P.split_phases(levels[level], self.sizes[level + 1])[phase]
            sel = _positions(mask)
            loc, j, f = self._residual_params(pred, sel)
            xo = _gather(orig, sel).cpu().numpy()
            r = xo - loc
            if self.max_error:
                q = np.sign(r) * ((np.abs(r) + self.max_error) // step)
                rec = np.clip(loc + q * step, 0, ((1 << self.bits) - 1)[:, None])
                r = q
            else:
                rec = xo
            for i, c in enumerate(coders):
                b = int(self.bits[i])
                d = self.model.tables.choose_adjustment(r[i], j[i], f[i], b) if len(r[i]) else 0
                c.encode_uniform(np.array([d + SCALE_ADJUST_ZERO]), SCALE_ADJUST_BITS)
                c.encode_residuals(r[i], np.clip(j[i] + d, 0, P.NUM_SCALES - 1), f[i], b)
            return _scatter(torch.minimum(pred.rounded_loc.clamp_min(0), maxv), sel, rec, self.dev)

        with torch.no_grad():
            recon = PyramidRun(self.net, torch.as_tensor(self.bits, device=self.dev), self.sizes,
                               integer=True).run(levels[-1], code_step)
        return [c.finish() for c in coders], recon

    def decode(self, payloads: Sequence[bytes]) -> torch.Tensor:
        coders = [StepDecoder(self.model.tables, p) for p in payloads]
        hb, wb = self.sizes[-1]
        base = np.stack([c.decode_uniform(hb * wb, int(b)) for c, b in zip(coders, self.bits)]).reshape(self.n, hb, wb)
        step = 2 * self.max_error + 1
        maxv = torch.as_tensor((1 << self.bits) - 1, device=self.dev).view(-1, 1, 1)

        def code_step(phase, level, pred, mask):
            sel = _positions(mask)
            loc, j, f = self._residual_params(pred, sel)
            r = np.zeros_like(loc)
            for i, c in enumerate(coders):
                d = int(c.decode_uniform(1, SCALE_ADJUST_BITS)[0]) - SCALE_ADJUST_ZERO
                r[i] = c.decode_residuals(np.clip(j[i] + d, 0, P.NUM_SCALES - 1), f[i], int(self.bits[i]))
            rec = loc + r * step
            rec = np.clip(rec, 0, ((1 << self.bits) - 1)[:, None])
            return _scatter(torch.minimum(pred.rounded_loc.clamp_min(0), maxv), sel, rec, self.dev)

        with torch.no_grad():
            return PyramidRun(self.net, torch.as_tensor(self.bits, device=self.dev), self.sizes,
                              integer=True).run(torch.as_tensor(base, device=self.dev), code_step)
