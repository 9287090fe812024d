"""The version-2 lossless model: per-pixel integer MLPs over a wide decoded neighbourhood.

Why this shape: the engine's budget is a few hundred integer multiply-adds per
coded pixel (the finest pyramid level holds 75 % of the pixels), so instead of
3x3 convolution stacks over the phase grid the network sees 12 (D) or 14
(B, C) decoded neighbours directly, normalised by the local activity, and a
two-layer MLP of 16 channels gives the location and scale.  Image adaptation
moves to the entropy coder (adaptive context tables, ``engine``), where it
costs nothing in the network.

The same module serves training (QAT floats, all steps of a crop at once,
since every neighbour a step reads is a true pixel) and exact integer
inference on any torch device (the GPU path and the tests against the
compiled engine).  The integer rules are those of ``quant.QConv`` and of
``engine/kernels.py``; the annex section 12 is normative.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..engine import kernels as K
from .context_model import logistic_bits
from .quant import QConv, ste_floor

FEATURE_FRAC = 3


class PhaseMLP(nn.Module):
    def __init__(self, cin: int, width: int = K.HIDDEN):
        super().__init__()
        self.l1 = QConv(cin, width, 1, in_frac=FEATURE_FRAC)
        self.l2 = QConv(width, width, 1, in_frac=4)
        self.head = QConv(width, 2, 1, in_frac=4, act=None, out_clamp=2047)

    def forward(self, x, integer: bool):
        if integer:
            return self.head.forward_int(self.l2.forward_int(self.l1.forward_int(x)))
        return self.head.forward_qat(self.l2.forward_qat(self.l1.forward_qat(x / (1 << FEATURE_FRAC))))


def clamp_parity(v: torch.Tensor, n: int) -> torch.Tensor:
    """Parity-preserving clamp into [0, n), n even (as the engine's ``_clampp``)."""
    v = torch.where(v < 0, v + 2 * torch.div(1 - v, 2, rounding_mode="floor"), v)
    return torch.where(v > n - 1, v - 2 * torch.div(v - n + 2, 2, rounding_mode="floor"), v)


def neighbour_index(ph: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, h, w) row and column indices, in the padded 2h x 2w level grid, of each phase position's
    neighbours."""
    k = int(K.NEI_K[ph])
    dy = torch.as_tensor(K.NEI_DY[ph, :k], device=device).view(-1, 1, 1)
    dx = torch.as_tensor(K.NEI_DX[ph, :k], device=device).view(-1, 1, 1)
    yy = (2 * torch.arange(h, device=device) + int(K.ORIGIN_Y[ph])).view(1, -1, 1)
    xx = (2 * torch.arange(w, device=device) + int(K.ORIGIN_X[ph])).view(1, 1, -1)
    ny = clamp_parity(yy + dy, 2 * h).expand(k, h, w)
    nx = clamp_parity(xx + dx, 2 * w).expand(k, h, w)
    return ny, nx


class PhaseFeatures:
    """Integer features (N, F, h, w) of one phase over a batch of padded level grids (N, 2h, 2w)."""

    def __init__(self, X: torch.Tensor, ph: int, level: int, bits: torch.Tensor, thresholds: torch.Tensor):
        n, H2, W2 = X.shape
        h, w = H2 // 2, W2 // 2
        ny, nx = neighbour_index(ph, h, w, X.device)
        nb = X[:, ny, nx]                                                     # (N, K, h, w) int64
        self.loc = torch.div(nb[:, :4].sum(1) + 2, 4, rounding_mode="floor")
        act = torch.div((nb[:, :4] - self.loc[:, None]).abs().sum(1), 4, rounding_mode="floor")
        self.u = act + 1
        inv = torch.div(torch.full_like(self.u, 1 << 16), self.u, rounding_mode="floor")
        dev = torch.div((nb - self.loc[:, None]) * inv[:, None], 1 << 13, rounding_mode="floor").clamp(-127, 127)
        self.lu = torch.bucketize(self.u, thresholds, right=True)
        b = bits.view(-1, 1, 1)
        intensity = torch.div(self.loc * 64, torch.pow(2, b), rounding_mode="floor")
        const = torch.ones_like(self.loc)
        extra = torch.stack([intensity, self.lu.clamp(max=127), const * (8 * min(level, 7)), const * 4 * b], 1)
        self.features = torch.cat([dev, extra], 1)
        self.maxv = torch.pow(2, b) - 1


class PixelMLPModel(nn.Module):
    """Three phase MLPs (D, B, C), shared by all levels (the level is an input feature)."""

    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleList([PhaseMLP(K.feature_count(p)) for p in range(3)])
        self.register_buffer("thresholds", torch.as_tensor(K.THRESHOLDS))

    @torch.no_grad()
    def export(self):
        for m in self.modules():
            if isinstance(m, QConv):
                m.export()

    def predict_int(self, X: torch.Tensor, ph: int, level: int, bits: torch.Tensor):
        """Exact integer (mu4, j) of every position of a phase, (N, h, w) int64 each, on X's device."""
        f = PhaseFeatures(X, ph, level, bits, self.thresholds)
        out = self.nets[ph](f.features.to(torch.float32), integer=True)
        m, s = out[:, 0].long(), out[:, 1].long()
        mu4 = (4 * f.loc + torch.div(m * f.u, 4, rounding_mode="floor")).clamp_min(0)
        mu4 = torch.minimum(mu4, 4 * f.maxv)
        j = (f.lu + K.SCALE_INDEX_OFFSET + torch.div(s * K.SCALES_PER_OCTAVE + 8, 16, rounding_mode="floor"))
        return mu4, j.clamp(0, K.NUM_SCALES - 1)

    def phase_bits(self, X: torch.Tensor, ph: int, level: int, bits: torch.Tensor) -> torch.Tensor:
        """Differentiable ideal code length (bits) of every position of a phase, for training."""
        f = PhaseFeatures(X, ph, level, bits, self.thresholds)
        out = self.nets[ph](f.features.to(torch.float32), integer=False) * 16
        m, s = out[:, 0], out[:, 1]
        mu4 = ste_floor(4 * f.loc + m * f.u / 4)
        mu4 = torch.minimum(mu4.clamp_min(0), (4 * f.maxv).to(mu4.dtype))
        jf = f.lu + (s * K.SCALES_PER_OCTAVE + 8) / 16
        scale = torch.pow(2.0, jf / K.SCALES_PER_OCTAVE)
        target = X[:, int(K.ORIGIN_Y[ph])::2, int(K.ORIGIN_X[ph])::2]
        return logistic_bits(target.to(torch.float32), mu4 / 4.0, scale)

    def batch_bits(self, crops: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Mean ideal bits per coded pixel over a batch of crops whose sides are powers of two."""
        total, count = 0.0, 0
        x = crops
        levels = [x]
        while max(levels[-1].shape[-2:]) > 2:
            levels.append(levels[-1][:, ::2, ::2])
        for level in range(len(levels) - 2, -1, -1):
            X = levels[level]
            for ph in range(3):
                b = self.phase_bits(X, ph, level, bits)
                total = total + b.sum()
                count += b.numel()
        return total / count

    def engine_arrays(self) -> dict[str, np.ndarray]:
        """The exported integer weights in the engine's layout (phase-major, zero-padded to MAX_F)."""
        H = K.HIDDEN
        a = {"w1": np.zeros((3, H, K.MAX_F), np.int64), "b1": np.zeros((3, H), np.int64),
             "s1": np.zeros((3, H), np.int64), "w2": np.zeros((3, H, H), np.int64),
             "b2": np.zeros((3, H), np.int64), "s2": np.zeros((3, H), np.int64),
             "w3": np.zeros((3, 2, H), np.int64), "b3": np.zeros((3, 2), np.int64),
             "s3": np.zeros((3, 2), np.int64)}
        for ph, net in enumerate(self.nets):
            for name, layer in (("1", net.l1), ("2", net.l2), ("3", net.head)):
                w = layer.w_int.detach().cpu().numpy()[:, :, 0, 0].astype(np.int64)
                a["w" + name][ph, :, :w.shape[1]] = w
                a["b" + name][ph] = layer.b_int.detach().cpu().numpy().astype(np.int64)
                a["s" + name][ph] = ((layer.out_frac - layer.in_frac)
                                     - layer.e_int.detach().cpu().numpy()).astype(np.int64)
        return a

    def load_engine_arrays(self, a: dict[str, np.ndarray]) -> None:
        """Inverse of ``engine_arrays``: integer weights back into the layers (for the GPU path)."""
        with torch.no_grad():
            for ph, net in enumerate(self.nets):
                for name, layer in (("1", net.l1), ("2", net.l2), ("3", net.head)):
                    cin = layer.cin
                    w = torch.as_tensor(a["w" + name][ph, :, :cin], dtype=torch.float32)
                    layer.w_int.copy_(w.view(layer.cout, cin, 1, 1))
                    layer.b_int.copy_(torch.as_tensor(a["b" + name][ph], dtype=torch.float32))
                    e = (layer.out_frac - layer.in_frac) - torch.as_tensor(a["s" + name][ph], dtype=torch.float32)
                    layer.e_int.copy_(e)
                    layer._int_scale = None
