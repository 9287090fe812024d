"""The lossy RNN-Conv codec: iterative residual coding with ConvLSTM encoder and decoder.

Architecture (Sushmit et al. 2019 front end, Toderici et al. 2017 iterations):

* encoder (float; it only chooses bits, so it need not be exact): a two-branch
  front end (3x3 stride-2 convolution, and 2x2 average pooling then a 1x1
  convolution, averaged), three ConvLSTM layers with stride-2 input
  convolutions (1/4, 1/8, 1/16 of the size per side), and a 1x1 bottleneck of
  ``BITS_PER_BLOCK`` channels binarised to +-1: one bit per channel per 16x16
  block per iteration;
* decoder (exact integer arithmetic, ``quant.QConv``/``quant.QConvLSTM``): a
  1x1 convolution, four ConvLSTM modules each followed by depth-to-space x2,
  and a 3x3 output convolution; it adds its output to the reconstruction;
* iterations: iteration t codes the residual between the image and the
  reconstruction after t iterations, scaled by ``2**GAIN_SHIFT[t]``; the
  LSTM states carry what was sent before.  Fewer iterations, or fewer bit
  channels in the last one, give higher compression from the same model.

Pixels enter normalised: u = (x - lo + 0.5) / span - 0.5 with lo and span =
hi - lo + 1 of the plane, so 8- to 16-bit data use the same network.  The
reconstruction is an integer in units of 2**-RECON_FRAC, and the decoded pixel
is ``lo + floor((recon + 2**15) * span / 2**16)``: integers throughout, so
every decoder gives the same pixels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import QConv, QConvLSTM

BLOCK = 16                       # pixels per side of one bottleneck position
BITS_PER_BLOCK = 160             # bit channels per iteration
ITERATIONS = 8                   # iterations trained and allowed
GAIN_SHIFT = (0, 0, 1, 1, 2, 2, 3, 3)
RECON_FRAC = 16
OUT_FRAC = 12
OUT_CLAMP = (1 << 15) - 1


class _FloatConvLSTM(nn.Module):
    """Encoder ConvLSTM: 3x3 stride-2 input convolution, 1x1 hidden convolution (float)."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.x_conv = nn.Conv2d(cin, 4 * hidden, 3, stride=2, padding=1)
        self.h_conv = nn.Conv2d(hidden, 4 * hidden, 1, bias=False)

    def forward(self, x, state):
        z = self.x_conv(x)
        h, c = state if state is not None else (torch.zeros_like(z[:, :self.hidden]),) * 2
        i, f, o, g = (z + self.h_conv(h)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class Encoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.front_conv = nn.Conv2d(1, width // 2, 3, stride=2, padding=1)
        self.front_pool_conv = nn.Conv2d(1, width // 2, 1)
        self.rnn = nn.ModuleList([_FloatConvLSTM(width // 2, width), _FloatConvLSTM(width, 2 * width),
                                  _FloatConvLSTM(2 * width, 4 * width)])
        self.bottleneck = nn.Conv2d(4 * width, BITS_PER_BLOCK, 1)

    def forward(self, r, states):
        x = 0.5 * (self.front_conv(r) + self.front_pool_conv(F.avg_pool2d(r, 2)))
        x = F.relu(x)
        new_states = []
        for cell, st in zip(self.rnn, states):
            x, st = cell(x, st)
            new_states.append(st)
        return torch.tanh(self.bottleneck(x)), new_states


class Decoder(nn.Module):
    """Integer-exact decoder: ``step`` in training (straight-through) or integer mode."""

    def __init__(self, width: int):
        super().__init__()
        self.d_in = QConv(BITS_PER_BLOCK, width, 1, in_frac=0, out_frac=7, out_clamp=128, in_max=1)
        hidden = [4 * width, 2 * width, width, width // 2]
        cins = [width] + [h // 4 for h in hidden[:-1]]
        self.rnn = nn.ModuleList([QConvLSTM(ci, h, 3) for ci, h in zip(cins, hidden)])
        self.out = QConv(hidden[-1] // 4, 1, 3, in_frac=7, out_frac=OUT_FRAC, act=None, out_clamp=OUT_CLAMP,
                         in_max=128)

    def zero_states(self, n, rows, cols, device):
        """States for (rows, cols) bottleneck positions: one per ConvLSTM, at 1/16 .. 1/2 size."""
        return [cell.zero_state(n, rows << k, cols << k, device) for k, cell in enumerate(self.rnn)]

    def step(self, bits, states, integer: bool):
        """bits: (n, BITS_PER_BLOCK, rows, cols) of +-1 (0 where not sent).  Returns the output in
        units of 2**-OUT_FRAC (integers in integer mode, straight-through floats otherwise)."""
        x = self.d_in.forward_int(bits) if integer else self.d_in.forward_qat(bits)
        new_states = []
        for cell, (h, c) in zip(self.rnn, states):
            h, c = cell.step(x, h, c, integer)
            new_states.append((h, c))
            x = F.pixel_shuffle(h, 2)
        if integer:
            return self.out.forward_int(x), new_states
        return self.out.forward_qat(x) * (1 << OUT_FRAC), new_states


class RNNConvCodec(nn.Module):
    """Encoder, decoder and the binary-code probability tables of one shipped lossy model."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.encoder = Encoder(width)
        self.decoder = Decoder(width)

    @torch.no_grad()
    def export(self):
        for m in self.decoder.modules():
            if isinstance(m, QConv):
                m.export()


def recon_increment(y: torch.Tensor, t: int, integer: bool = False) -> torch.Tensor:
    """Decoder output of iteration t (units 2**-OUT_FRAC of the gained residual) in reconstruction
    units (2**-RECON_FRAC): a multiplication by 2**(RECON_FRAC - OUT_FRAC - GAIN_SHIFT[t]) >= 1."""
    mult = 1 << (RECON_FRAC - OUT_FRAC - GAIN_SHIFT[t])
    return y * mult


def normalise(x: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Pixels (n, h, w) to normalised floats in [-0.5, 0.5)."""
    return (x.to(torch.float32) - lo.view(-1, 1, 1) + 0.5) / span.view(-1, 1, 1) - 0.5


def pixels_of(recon: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Integer reconstruction (units 2**-RECON_FRAC, int64) to pixels, exactly."""
    half = 1 << (RECON_FRAC - 1)
    v = torch.div((recon + half).clamp_min(0) * span.view(-1, 1, 1), 1 << RECON_FRAC, rounding_mode="floor")
    return torch.minimum(v, span.view(-1, 1, 1) - 1) + lo.view(-1, 1, 1)


def recon_float(recon_q: torch.Tensor) -> torch.Tensor:
    """Reconstruction in normalised float units (training and the encoder's residual)."""
    return recon_q / (1 << RECON_FRAC)


def binarize(b: torch.Tensor, training: bool) -> torch.Tensor:
    """+-1 codes: stochastic in training (expected value b, straight-through), sign when coding."""
    if training:
        q = torch.where(torch.rand_like(b) < (1 + b) / 2, 1.0, -1.0)
        return b + (q - b).detach()
    return torch.where(b >= 0, 1.0, -1.0)



class Unroll:
    """The iterations over one batch of planes, shared by training, encoding and decoding.

    ``u``: normalised planes (n, H, W), H and W multiples of BLOCK; None when only decoding.
    ``integer``: exact decoder (coding) or straight-through decoder (training).  The
    reconstruction is int64 in integer mode, a float on the same integer grid otherwise."""

    def __init__(self, model: RNNConvCodec, shape, device, *, u: torch.Tensor | None = None,
                 integer: bool, training: bool = False):
        n, h, w = shape
        self.model, self.u, self.integer, self.training = model, u, integer, training
        self.enc_states = [None] * len(model.encoder.rnn)
        self.dec_states = model.decoder.zero_states(n, h // BLOCK, w // BLOCK, device)
        self.recon = torch.zeros(shape, dtype=torch.int64 if integer else torch.float32, device=device)

    def encode_bits(self, t: int) -> torch.Tensor:
        """The +-1 codes of iteration t for the residual left by iterations 0..t-1."""
        r = (self.u - recon_float(self.recon.to(torch.float32))).detach() * (1 << GAIN_SHIFT[t])
        b, self.enc_states = self.model.encoder(r[:, None], self.enc_states)
        return binarize(b, self.training)

    def decode(self, bits: torch.Tensor, t: int, commit: bool = True) -> torch.Tensor:
        """Reconstruction after iteration t given its codes; ``commit=False`` tries codes
        (e.g. a truncated set) without advancing the state."""
        if self.integer:
            bits = bits.to(torch.float32)
        y, states = self.model.decoder.step(bits, self.dec_states, self.integer)
        inc = recon_increment(y[:, 0], t, self.integer)
        recon = self.recon + (inc.to(torch.int64) if self.integer else inc)
        if commit:
            self.dec_states, self.recon = states, recon
        return recon
