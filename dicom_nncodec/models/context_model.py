"""The lossless context model: per-phase CNNs plus a coarse ConvLSTM state.

What it predicts: for every pixel of a phase step, an integer location in
quarter-pixel units (``mu4``) and an integer scale index ``j`` into the
shipped probability tables.  Both are computed from integers only (see
``quant.py``), so encoder and decoder agree bit for bit on any device.

Where the ConvLSTM sits, and why there: per-pixel CNNs see a 5x5 window of
decoded neighbours, which is what predicts a pixel well, but they cannot know
how noisy this image is, or how badly the previous steps were predicted in
this region.  A ConvLSTM at 1/8 resolution (cheap: 1/64 of the pixels)
carries that state through the whole coarse-to-fine sequence of steps: after
each step it reads a pooled summary of how far the decoded pixels fell from
their predictions, and before each step its hidden state is projected to a
per-channel bias of the step CNN's first layer.  This is per-image,
per-region adaptation that both sides compute from decoded data, with no
side information.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import pyramid as P
from .quant import QConv, QConvLSTM, ste_floor

CONTEXT_LEVEL = 3          # the ConvLSTM runs at the size of pyramid level 3 (1/8 per side)
HIDDEN = 8
SUMMARY_CHANNELS = 6


class StepNet(nn.Module):
    """Three convolutions and a 1x1 head producing (location offset, log-scale offset)."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.conv1 = QConv(cin, width, 3, in_frac=P.FEATURE_FRAC)
        self.conv2 = QConv(width, width, 3, in_frac=4)
        self.conv3 = QConv(width, width, 1, in_frac=4)
        self.head = QConv(width, 2, 1, in_frac=4, act=None, out_clamp=2047)

    def forward(self, x, bias, integer: bool):
        if integer:
            y = self.conv1.forward_int(x, bias)
            y = self.conv3.forward_int(self.conv2.forward_int(y))
            return self.head.forward_int(y)
        y = self.conv1.forward_qat(x / (1 << P.FEATURE_FRAC), bias)
        return self.head.forward_qat(self.conv3.forward_qat(self.conv2.forward_qat(y)))


class ContextLSTM(QConvLSTM):
    """The integer ConvLSTM cell (``quant.QConvLSTM``) plus one projection of its hidden state per
    phase.  Its input is the integer step summary (not in Q7), hence the scaling in ``step``."""

    def __init__(self, width: int):
        super().__init__(SUMMARY_CHANNELS, HIDDEN, 3)
        self.proj = nn.ModuleDict({p: QConv(HIDDEN, width, 1, in_frac=7, act=None, in_max=128) for p in P.PHASES})

    def step(self, x, h, c, integer: bool):
        return super().step(x if integer else x / 128, h, c, integer)

    def bias(self, phase, h, integer: bool):
        if integer:
            return self.proj[phase].forward_int(h.to(torch.float32))
        return self.proj[phase].forward_qat(h)


class ContextModel(nn.Module):
    """All networks of one shipped model.  ``use_lstm=False`` gives the ablation without the state."""

    def __init__(self, width: int = 16, use_lstm: bool = True):
        super().__init__()
        self.width, self.use_lstm = width, use_lstm
        self.nets = nn.ModuleDict({p: StepNet(P.feature_channels(p), width) for p in P.PHASES})
        self.lstm = ContextLSTM(width) if use_lstm else None
        self.register_buffer("thresholds", P.log_thresholds())

    @torch.no_grad()
    def export(self):
        for m in self.modules():
            if isinstance(m, QConv):
                m.export()


class Prediction:
    """Integer location (quarter pixels) and scale index for one step, plus the
    float versions with straight-through gradients when training."""

    def __init__(self, mu4, j, ctx: P.StepContext):
        self.mu4, self.j, self.ctx = mu4, j, ctx

    @property
    def rounded_loc(self):
        return torch.div(self.mu4 + 2, 4, rounding_mode="floor")


class PyramidRun:
    """One pass of the model over a batch of same-sized planes, coarse to fine.

    ``integer=True`` for coding (exact), ``False`` for training (QAT floats).
    The caller supplies ``code_step(phase, level, prediction, mask) -> values``
    which returns the decoded (or, when encoding, reconstructed) phase grid.
    """

    def __init__(self, model: ContextModel, bits: torch.Tensor, sizes, integer: bool):
        self.model, self.bits, self.sizes, self.integer = model, bits, sizes, integer
        self.ctx_level = min(CONTEXT_LEVEL, len(sizes) - 1)
        n = bits.shape[0]
        if model.use_lstm:
            ch, cw = sizes[self.ctx_level]
            dev = bits.device
            self.h = torch.zeros(n, HIDDEN, ch, cw, device=dev)     # integers (Q7) when coding
            self.c = torch.zeros_like(self.h)

    def run(self, base: torch.Tensor, code_step) -> torch.Tensor:
        x = base
        for level in range(len(self.sizes) - 2, -1, -1):
            hw = self.sizes[level + 1]
            masks = P.phase_masks(self.sizes[level], hw, x.device)
            known = {"A": x}
            for phase in P.PHASES:
                pred = self.predict(phase, level, known)
                known[phase] = code_step(phase, level, pred, masks[phase])
                if self.model.use_lstm:
                    self.observe(phase, level, known[phase], pred, masks[phase])
            x = P.interleave(known["A"], known["B"], known["C"], known["D"], self.sizes[level])
        return x

    def predict(self, phase, level, known) -> Prediction:
        ctx = P.StepContext(phase, level, known, self.bits, self.model.thresholds)
        bias = None
        if self.model.use_lstm:
            b = self.model.lstm.bias(phase, self.h, self.integer)
            bias = P.resample(b, self.sizes, self.ctx_level, level + 1, average=False)
        feats = ctx.features.contiguous(memory_format=torch.channels_last) if self.integer else ctx.features
        out = self.model.nets[phase](feats, bias, self.integer)
        maxv4 = (ctx.maxv * 4).view(-1, 1, 1)
        if self.integer:
            m, s = out[:, 0].long(), out[:, 1].long()
            mu4 = torch.minimum((4 * ctx.loc + torch.div(m * ctx.u, 4, rounding_mode="floor")).clamp_min(0), maxv4)
            dj = torch.div(s * P.SCALES_PER_OCTAVE + 8, 16, rounding_mode="floor")
            j = (ctx.lu + P.SCALE_INDEX_OFFSET + dj).clamp(0, P.NUM_SCALES - 1)
            return Prediction(mu4, j, ctx)
        m, s = out[:, 0] * 16, out[:, 1] * 16                          # back to the integer scale
        mu4 = ste_floor(4 * ctx.loc + m * ctx.u / 4)
        mu4 = torch.minimum(mu4.clamp_min(0), maxv4.to(mu4.dtype))
        j = ste_floor(ctx.lu + P.SCALE_INDEX_OFFSET + (s * P.SCALES_PER_OCTAVE + 8) / 16)
        return Prediction(mu4, j.clamp(0, P.NUM_SCALES - 1), ctx)

    def observe(self, phase, level, values, pred: Prediction, mask):
        """Feed the ConvLSTM a pooled summary of how the step's pixels fell against the prediction."""
        with torch.no_grad():
            mu = torch.div(pred.mu4.detach().long() + 2, 4, rounding_mode="floor")
            r = (values.long() - mu) * mask
            u = pred.ctx.u
            e = torch.div(r.abs() * 32, u, rounding_mode="floor").clamp(0, 128)
            s = torch.div(r * 32, u, rounding_mode="floor").clamp(-128, 128)
            summ = torch.stack([e, s], 1)
            summ = P.resample(summ, self.sizes, level + 1, self.ctx_level, average=True)
            n, _, ch, cw = summ.shape
            const = torch.zeros(n, 4, ch, cw, dtype=torch.int64, device=summ.device)
            const[:, P.PHASES.index(phase)] = 128
            const[:, 3] = 16 * min(level, 7)
            x = torch.cat([summ, const], 1).to(torch.float32)
        self.h, self.c = self.model.lstm.step(x, self.h, self.c, self.integer)


def logistic_bits(x, mu, scale):
    """-log2 P(x) of a logistic discretised to integers (training loss; the tables are built the same way)."""
    p = (x + 0.5 - mu) / scale
    m = (x - 0.5 - mu) / scale
    logp = (torch.nn.functional.logsigmoid(p) + torch.nn.functional.logsigmoid(-m)
            + torch.log1p(-torch.exp(-1.0 / scale)))
    return -logp.clamp_min(math.log(2.0 ** -24)) / math.log(2.0)
