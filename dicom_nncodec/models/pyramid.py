"""The coarse-to-fine polyphase pyramid and the integer context features.

Why: coding all pixels of a phase in parallel gives a fixed, small number of
sequential steps per image (fast on CPU and GPU, and a preview for free), and
every step is conditioned on everything decoded before it.

Layout.  Level 0 is the image; level l+1 is the even-row, even-column phase
("A") of level l, so its size is ceil(h/2) x ceil(w/2).  Levels are halved
until both sides are at most 2; that smallest level is the *base*.  Going
from level l+1 to level l codes three phases, in this order:

* D (odd row, odd column) from the four surrounding A pixels,
* B (even row, odd column) from A left/right and D above/below,
* C (odd row, even column) from A above/below, D left/right and four B.

Each phase grid has the size of level l+1; positions that fall outside an
odd-sized level ("pad" positions) are not coded and are filled with the
rounded prediction, identically on both sides.

Everything here is integer arithmetic on int64 tensors, so it is exact on any
device.  These functions are shared by training, encoding and decoding.
"""
from __future__ import annotations

import math

import torch

SCALES_PER_OCTAVE = 6
SCALE_INDEX_OFFSET = 6 * SCALES_PER_OCTAVE          # index 0 is logistic scale 1/64; the last is 2**16
NUM_SCALES = SCALE_INDEX_OFFSET + 16 * SCALES_PER_OCTAVE + 1
FEATURE_FRAC = 3                                      # fractional bits of every input feature
PHASES = ("D", "B", "C")
NEIGHBOURS = {"D": 4, "B": 4, "C": 8}


def scale_of_index(j):
    """Logistic scale of table index j (float; used for training and for building tables)."""
    return 2.0 ** ((j - SCALE_INDEX_OFFSET) / SCALES_PER_OCTAVE)


def log_thresholds(count: int = 20 * SCALES_PER_OCTAVE) -> torch.Tensor:
    """Integers T_m = ceil(2**(m/Q)), m = 1..count: for an integer u >= 1,
    #{m : T_m <= u} = floor(Q * log2(u)) exactly, so the log is a table lookup."""
    return torch.tensor([math.ceil(2.0 ** (m / SCALES_PER_OCTAVE) - 1e-12) for m in range(1, count + 1)],
                        dtype=torch.int64)


def level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    while max(sizes[-1]) > 2:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def level_images(img: torch.Tensor, sizes) -> list[torch.Tensor]:
    """The pyramid of an original image (N, H, W): level l+1 = level l[::2, ::2]."""
    out = [img]
    for _ in sizes[1:]:
        out.append(out[-1][:, ::2, ::2])
    return out


def split_phases(x: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """B, C, D phase grids of level image x, each of size hw (edge-replicated where padded)."""
    h, w = hw
    H, W = x.shape[-2:]
    if H % 2:
        x = torch.cat([x, x[:, -1:, :]], 1)
    if W % 2:
        x = torch.cat([x, x[:, :, -1:]], 2)
    return {"B": x[:, 0::2, 1::2], "C": x[:, 1::2, 0::2], "D": x[:, 1::2, 1::2]}


def phase_masks(level_hw, hw, device) -> dict[str, torch.Tensor]:
    """Which positions of each phase grid are real pixels of the level (not padding)."""
    H, W = level_hw
    h, w = hw
    rows_odd = (torch.arange(h, device=device) * 2 + 1) < H
    cols_odd = (torch.arange(w, device=device) * 2 + 1) < W
    full_r = torch.ones(h, dtype=torch.bool, device=device)
    full_c = torch.ones(w, dtype=torch.bool, device=device)
    return {"D": rows_odd[:, None] & cols_odd[None, :],
            "B": full_r[:, None] & cols_odd[None, :],
            "C": rows_odd[:, None] & full_c[None, :]}


def interleave(a, b, c, d, level_hw) -> torch.Tensor:
    n, h, w = a.shape
    x = torch.empty((n, 2 * h, 2 * w), dtype=a.dtype, device=a.device)
    x[:, 0::2, 0::2] = a
    x[:, 0::2, 1::2] = b
    x[:, 1::2, 0::2] = c
    x[:, 1::2, 1::2] = d
    return x[:, :level_hw[0], :level_hw[1]]


def _right(t):
    return torch.cat([t[:, :, 1:], t[:, :, -1:]], 2)


def _left(t):
    return torch.cat([t[:, :, :1], t[:, :, :-1]], 2)


def _down(t):
    return torch.cat([t[:, 1:], t[:, -1:]], 1)


def _up(t):
    return torch.cat([t[:, :1], t[:, :-1]], 1)


def neighbours(phase: str, known: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, K, h, w) decoded neighbours of each position of a phase; the first four are the nearest."""
    a = known["A"]
    if phase == "D":
        n = [a, _right(a), _down(a), _down(_right(a))]
    elif phase == "B":
        d = known["D"]
        n = [a, _right(a), _up(d), d]
    else:
        d, b = known["D"], known["B"]
        n = [a, _down(a), _left(d), d, b, _left(b), _down(b), _down(_left(b))]
    return torch.stack(n, 1)


class StepContext:
    """Integer features of one phase step, and what prediction needs from them."""

    def __init__(self, phase, level, known, bits, thresholds):
        n = neighbours(phase, known)                                   # (N, K, h, w) int64
        self.loc = torch.div(n[:, :4].sum(1) + 2, 4, rounding_mode="floor")
        act = torch.div((n[:, :4] - self.loc[:, None]).abs().sum(1), 4, rounding_mode="floor")
        self.u = act + 1
        self.lu = torch.bucketize(self.u, thresholds, right=True)     # floor(Q*log2 u)
        dev = torch.div((n - self.loc[:, None]) * (1 << FEATURE_FRAC), self.u[:, None], rounding_mode="floor")
        dev = dev.clamp(-127, 127)
        b = bits.view(-1, 1, 1)
        intensity = torch.div(self.loc * 64, torch.pow(2, b), rounding_mode="floor")
        const = torch.ones_like(self.loc)
        extra = torch.stack([intensity, self.lu.clamp(max=127), const * (8 * min(level, 7)), const * 4 * b], 1)
        self.features = torch.cat([dev, extra], 1).to(torch.float32)
        self.maxv = torch.pow(2, b) - 1


def feature_channels(phase: str) -> int:
    return NEIGHBOURS[phase] + 4


def pool_half(x: torch.Tensor) -> torch.Tensor:
    """Integer 2x2 mean (rounded) with edge replication: size h -> ceil(h/2)."""
    if x.shape[-2] % 2:
        x = torch.cat([x, x[..., -1:, :]], -2)
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., :, -1:]], -1)
    s = x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]
    return torch.div(s + 2, 4, rounding_mode="floor")


def resample(x: torch.Tensor, sizes, src: int, dst: int, *, average: bool) -> torch.Tensor:
    """Map a map of level-``src`` size to level-``dst`` size.

    Coarser: 2x2 integer mean (``average``) or even-phase subsampling.
    Finer: nearest-neighbour repetition, cropped to the level size.
    """
    while src < dst:
        x = pool_half(x) if average else x[..., ::2, ::2]
        src += 1
    while src > dst:
        src -= 1
        h, w = sizes[src]
        x = x.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w]
    return x
