"""Fixed-point layers that train in float and run in exact integer arithmetic.

Why this module exists: a lossless codec must compute the same probabilities on
the encoder and on every decoder, whatever the CPU, GPU, thread count or batch
size.  Float convolutions do not guarantee that (summation order, TF32, fused
kernels).  Every layer here therefore has two forward passes defined by one set
of quantisation rules:

* ``forward_qat`` (training): float tensors holding values on the fixed-point
  grid, with straight-through rounding so gradients flow.
* ``forward_int`` (coding): float32 tensors holding *integers*.  Weights are
  int8 (|w| <= 127), inputs are bounded by ``in_max`` and the export checks
  that ``sum|w| * in_max + |bias| < 2**24`` for every output channel, so every
  partial sum of the convolution is an integer below 2**24 and is represented
  exactly in float32 under any summation order.  Requantisation multiplies by a
  power of two (exact) and floors (exact).

A value ``v`` with ``frac`` fractional bits is stored as the integer
``v * 2**frac``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT32_EXACT_LIMIT = 1 << 24
WEIGHT_MAX = 127
BIAS_MAX = 1 << 22
LEAKY_SHIFT = 3  # negative slope 1/8: an arithmetic shift, exact in integers


def ste_floor(x: torch.Tensor) -> torch.Tensor:
    """floor() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.floor(x) - x).detach()


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round-half-up in the forward pass, identity gradient backwards."""
    return x + (torch.floor(x + 0.5) - x).detach()


def weight_exponents(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel power-of-two weight scale: the largest e with max|w|*2**e <= 127."""
    m = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
    e = torch.floor(torch.log2(WEIGHT_MAX / m))
    return e.clamp(0, 14)


class QConv(nn.Module):
    """Conv2d with int8 weights, per-channel power-of-two scales and a fixed-point output.

    ``in_frac``/``out_frac``: fractional bits of input and output.  ``act``:
    ``"leaky"`` (slope 1/8) or ``None``.  ``out_clamp``: saturation of the
    output integer.  ``in_max``: bound on |input integer|, used by the
    exactness check at export.
    """

    def __init__(self, cin: int, cout: int, k: int, *, in_frac: int, out_frac: int = 4,
                 act: str | None = "leaky", out_clamp: int = 127, in_max: int = 127):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.in_frac, self.out_frac, self.act = in_frac, out_frac, act
        self.out_clamp, self.in_max = out_clamp, in_max
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * math.sqrt(1.0 / (cin * k * k)))
        self.bias = nn.Parameter(torch.zeros(cout))
        # integer form, filled by export(); kept as buffers so state_dict carries them
        self.register_buffer("w_int", torch.zeros(cout, cin, k, k))
        self.register_buffer("b_int", torch.zeros(cout))
        self.register_buffer("e_int", torch.zeros(cout))
        self._int_scale = None   # 2**(out_frac - in_frac - e), cached on first integer use

    # ---- training -------------------------------------------------------------------------
    def forward_qat(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        e = weight_exponents(self.weight).view(-1, 1, 1, 1)
        scale = torch.pow(2.0, e)
        w = ste_round(self.weight.clamp(-WEIGHT_MAX / scale, WEIGHT_MAX / scale) * scale) / scale
        bscale = torch.pow(2.0, e.view(-1) + self.in_frac)
        b = ste_round((self.bias * bscale).clamp(-BIAS_MAX, BIAS_MAX)) / bscale
        y = F.conv2d(x, w, b, padding=self.k // 2)
        y = ste_floor(y * (1 << self.out_frac))
        if add is not None:
            y = y + add * (1 << self.out_frac)
        y = self._activate(y)
        return y / (1 << self.out_frac)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.act == "leaky":
            y = torch.where(y < 0, ste_floor(y / (1 << LEAKY_SHIFT)), y)
        return y.clamp(-self.out_clamp, self.out_clamp)

    # ---- export and exact inference -------------------------------------------------------
    @torch.no_grad()
    def export(self) -> None:
        e = weight_exponents(self.weight)
        scale = torch.pow(2.0, e).view(-1, 1, 1, 1)
        w = torch.floor(self.weight.clamp(-WEIGHT_MAX / scale, WEIGHT_MAX / scale) * scale + 0.5)
        b = torch.floor((self.bias * torch.pow(2.0, e + self.in_frac)).clamp(-BIAS_MAX, BIAS_MAX) + 0.5)
        bound = w.abs().flatten(1).sum(1) * self.in_max + b.abs()
        if float(bound.max()) >= FLOAT32_EXACT_LIMIT:
            raise ValueError(f"layer {self.cin}->{self.cout}: partial sums may reach {float(bound.max()):.0f}"
                             " >= 2**24; not exact in float32")
        self.w_int.copy_(w)
        self.b_int.copy_(b)
        self.e_int.copy_(e)
        self._int_scale = None

    def forward_int(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x: float32 tensor of integers with |x| <= in_max.  Returns integers (float32).

        In-place steps after the convolution: every one is exact on integers (a power-of-two
        scale, floor, add, max, clamp), so fusing or reordering them cannot change a result."""
        y = F.conv2d(x, self.w_int, self.b_int, padding=self.k // 2)
        scale = self._int_scale
        if scale is None or scale.device != y.device:
            shift = (self.out_frac - self.in_frac) - self.e_int
            scale = self._int_scale = torch.pow(2.0, shift).view(1, -1, 1, 1).to(y.device)
        y.mul_(scale).floor_()
        if add is not None:
            y.add_(add)
        if self.act == "leaky":
            neg = torch.mul(y, 1.0 / (1 << LEAKY_SHIFT)).floor_()
            torch.maximum(y, neg, out=y)
        return y.clamp_(-self.out_clamp, self.out_clamp)


def _lstm_luts():
    """sigmoid and tanh of the gate pre-activations (Q4, |z| <= 127) and tanh of the cell (Q7,
    |c| <= 1023), all in Q7: computed once in float64, rounded, and from then on only looked up."""
    z = torch.arange(-127, 128, dtype=torch.float64) / 16
    c = torch.arange(-1023, 1024, dtype=torch.float64) / 128
    return (torch.floor(128 * torch.sigmoid(z) + 0.5).long(), torch.floor(128 * torch.tanh(z) + 0.5).long(),
            torch.floor(128 * torch.tanh(c) + 0.5).long())


class QConvLSTM(nn.Module):
    """ConvLSTM cell in exact integer arithmetic.

    Input and hidden state in Q7 (|v| <= 128), gate pre-activations in Q4, cell in Q7; the
    non-linearities are lookup tables (buffers, so they ship with the weights).  In integer mode
    every product and sum is below 2**18 and the divisions are by 128 then floored, so results
    are exact in float32 on any device.  In training mode (``integer=False``) the same grid is
    followed with straight-through rounding, and ``x``/``h``/``c`` are the float values.
    """

    def __init__(self, cin: int, hidden: int, k: int = 3):
        super().__init__()
        self.hidden = hidden
        self.gates = QConv(cin + hidden, 4 * hidden, k, in_frac=7, act=None, in_max=128)
        sig, tanh_z, tanh_c = _lstm_luts()
        self.register_buffer("sig_lut", sig)
        self.register_buffer("tanh_z_lut", tanh_z)
        self.register_buffer("tanh_c_lut", tanh_c)

    def _float_lut(self, name):
        cache = self.__dict__.setdefault("_float_luts", {})
        lut = getattr(self, name)
        got = cache.get(name)
        if got is None or got.device != lut.device:
            got = cache[name] = lut.to(torch.float32)
        return got

    def step(self, x, h, c, integer: bool):
        hid = self.hidden
        if integer:
            z = self.gates.forward_int(torch.cat([x, h], 1).to(torch.float32)).to(torch.int64) + 127
            sig = torch.take(self._float_lut("sig_lut"), z[:, :3 * hid].contiguous())
            i, f, o = sig.chunk(3, 1)
            g = torch.take(self._float_lut("tanh_z_lut"), z[:, 3 * hid:].contiguous())
            c = torch.floor_((f * c + i * g) * (1.0 / 128)).clamp_(-1023, 1023)
            h = torch.floor_(o * torch.take(self._float_lut("tanh_c_lut"), c.to(torch.int64) + 1023) * (1.0 / 128))
            return h, c
        z = self.gates.forward_qat(torch.cat([x, h], 1))
        i, f, o, g = z.chunk(4, 1)
        i, f, o = (ste_round(128 * torch.sigmoid(t)) / 128 for t in (i, f, o))
        g = ste_round(128 * torch.tanh(g)) / 128
        c = (ste_floor(128 * (f * c + i * g)) / 128).clamp(-1023 / 128, 1023 / 128)
        h = ste_floor(128 * o * ste_round(128 * torch.tanh(c)) / 128) / 128
        return h, c

    def zero_state(self, n: int, rows: int, cols: int, device):
        h = torch.zeros(n, self.hidden, rows, cols, device=device)
        return h, torch.zeros_like(h)
