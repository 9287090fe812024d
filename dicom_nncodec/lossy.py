"""Planes in, lossy payloads out at a requested size, and back: the RNN-Conv mode.

Per plane the payload is::

    lo u16 | hi u16 | iterations u8 | last_depth u8 | reserved u16 (0) | range-coded codes

``iterations`` full iterations were sent, the last of them with only its first
``last_depth`` bit channels (the decoder treats the others as 0).  The codes
are entropy coded with the shipped ``BitTables``.

Rate control: the encoder runs iterations until the payload would exceed the
plane's byte budget, then keeps as many bit channels of the last iteration
as fit.  One bit channel of one iteration is 1/256 bit per pixel, so any
ratio the model can reach is met to within a few per cent, always at or
above the requested ratio.

Why per-plane (lo, hi): the network works on the plane normalised to its own
range, which is how one model serves 8- to 16-bit data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import constriction
import numpy as np
import torch
import torch.nn.functional as F

from .entropy import COST_ONE, BitTables
from .errors import BitstreamError, UnsupportedPixelData
from .models import rnnconv as R

PRELUDE = struct.Struct("<HHBBH")


@dataclass(frozen=True)
class PlanePlan:
    lo: int
    hi: int
    iterations: int
    last_depth: int

    def depth(self, t: int) -> int:
        """Bit channels sent in iteration t (0 when not sent)."""
        if t < self.iterations - 1:
            return R.BITS_PER_BLOCK
        return self.last_depth if t == self.iterations - 1 else 0


def padded_shape(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // R.BLOCK) * R.BLOCK, -(-cols // R.BLOCK) * R.BLOCK


def _pad(planes: torch.Tensor) -> torch.Tensor:
    n, h, w = planes.shape
    ph, pw = padded_shape(h, w)
    if (ph, pw) == (h, w):
        return planes
    return F.pad(planes[:, None].to(torch.float32), (0, pw - w, 0, ph - h), mode="replicate")[:, 0].to(planes.dtype)


def _symbols(bits: torch.Tensor) -> np.ndarray:
    return (bits.cpu().numpy() > 0).astype(np.int64)


def _coded(plan: PlanePlan, codes: list[np.ndarray]):
    """(0/1 symbols, their contexts) of each iteration the plan sends, in coding order."""
    for t in range(plan.iterations):
        d = plan.depth(t)
        ctx = BitTables.contexts(t, codes[t - 1] * 2 - 1 if t else None, d, R.BITS_PER_BLOCK, codes[t][0].size)
        yield codes[t][:d].reshape(-1), ctx


def _payload(tables: BitTables, plan: PlanePlan, codes: list[np.ndarray]) -> bytes:
    """codes[t]: 0/1 array (BITS_PER_BLOCK, rows/16, cols/16) of iteration t."""
    enc = constriction.stream.queue.RangeEncoder()
    for symbols, ctx in _coded(plan, codes):
        tables.encode(enc, symbols, ctx)
    words = enc.get_compressed().astype("<u4").tobytes()
    return PRELUDE.pack(plan.lo, plan.hi, plan.iterations, plan.last_depth, 0) + words


def _length(tables: BitTables, plan: PlanePlan, codes: list[np.ndarray]) -> int:
    """Estimated payload bytes (ideal code length), for choosing the depth before the real coding."""
    total = sum(tables.code_length(symbols, ctx) for symbols, ctx in _coded(plan, codes))
    return PRELUDE.size + 4 * (total // (32 * COST_ONE) + 1)


def _fit(tables: BitTables, lo: int, hi: int, codes: list[np.ndarray], budget: int) -> PlanePlan | None:
    """The largest last-iteration depth whose real payload fits ``budget`` bytes (None: not even
    one bit channel of the last iteration fits).  A binary search on the estimated length, then
    a few steps down until the real payload fits."""
    k = len(codes)
    a, b = 0, R.BITS_PER_BLOCK
    while a < b:
        m = (a + b + 1) // 2
        if _length(tables, PlanePlan(lo, hi, k, m), codes) <= budget:
            a = m
        else:
            b = m - 1
    for d in range(max(a, 1), max(a - 8, 0), -1):
        plan = PlanePlan(lo, hi, k, d)
        if len(_payload(tables, plan, codes)) <= budget:
            return plan
    return None


class LossyPlanes:
    """Encodes or decodes a batch of same-sized planes with one RNN-Conv model."""

    def __init__(self, model, dev):
        self.model, self.dev = model, dev
        self.net: R.RNNConvCodec = model.net_on(dev)
        self.tables: BitTables = model.tables

    def encode(self, planes: np.ndarray, budgets: list[int]) -> list[bytes]:
        """planes: (n, rows, cols) unsigned integers; budgets: payload bytes per plane."""
        n, rows, cols = planes.shape
        x = _pad(torch.as_tensor(planes.astype(np.int64), device=self.dev))
        lo = planes.reshape(n, -1).min(1).astype(np.int64)
        hi = planes.reshape(n, -1).max(1).astype(np.int64)
        u = R.normalise(x, torch.as_tensor(lo, device=self.dev), torch.as_tensor(hi - lo + 1, device=self.dev))
        run = R.Unroll(self.net, tuple(x.shape), self.dev, u=u, integer=True)
        codes: list[list[np.ndarray]] = [[] for _ in range(n)]
        plans: list[PlanePlan | None] = [None] * n
        with torch.no_grad():
            for t in range(R.ITERATIONS):
                open_ = [i for i in range(n) if plans[i] is None]
                if not open_:
                    break
                bits = run.encode_bits(t)
                sym = _symbols(bits)
                for i in open_:
                    codes[i].append(sym[i])
                    if _length(self.tables, PlanePlan(int(lo[i]), int(hi[i]), t + 1, R.BITS_PER_BLOCK),
                               codes[i]) > budgets[i]:
                        plans[i] = self._fit_or_refuse(i, lo, hi, codes[i], budgets[i], rows, cols)
                run.decode(bits, t)
        for i in range(n):
            if plans[i] is None:        # every iteration fits by the estimate: check the real payload
                plans[i] = self._fit_or_refuse(i, lo, hi, codes[i], budgets[i], rows, cols)
        return [_payload(self.tables, plans[i], codes[i]) for i in range(n)]

    def _fit_or_refuse(self, i, lo, hi, codes, budget, rows, cols) -> PlanePlan:
        """The plan for plane i, or UnsupportedPixelData when its budget cannot be met."""
        plan = _fit(self.tables, int(lo[i]), int(hi[i]), codes, budget)
        if plan is None and len(codes) > 1:      # not one channel of the newest iteration fits
            codes.pop()
            plan = _fit(self.tables, int(lo[i]), int(hi[i]), codes, budget)
        if plan is None:
            raise UnsupportedPixelData(f"the requested ratio leaves too few bytes for a {rows}x{cols} image; "
                                       "choose a lower ratio")
        return plan

    def decode(self, payloads: list[bytes], rows: int, cols: int, bits: list[int]) -> np.ndarray:
        """payloads of planes with ``bits`` bits each (values must lie below 2**bits)."""
        n = len(payloads)
        plans, decoders = [], []
        for p, b in zip(payloads, bits):
            if len(p) < PRELUDE.size:
                raise BitstreamError("truncated lossy payload")
            lo, hi, k, d, reserved = PRELUDE.unpack_from(p)
            if (reserved or not 1 <= k <= R.ITERATIONS or not 1 <= d <= R.BITS_PER_BLOCK or hi < lo
                    or hi >= 1 << int(b)):
                raise BitstreamError("corrupt lossy payload header")
            plans.append(PlanePlan(lo, hi, k, d))
            words = np.frombuffer(p, dtype="<u4", offset=PRELUDE.size).astype(np.uint32)
            decoders.append(constriction.stream.queue.RangeDecoder(words))
        ph, pw = padded_shape(rows, cols)
        positions = (ph // R.BLOCK) * (pw // R.BLOCK)
        lo = torch.as_tensor([p.lo for p in plans], device=self.dev)
        span = torch.as_tensor([p.hi - p.lo + 1 for p in plans], device=self.dev)
        run = R.Unroll(self.net, (n, ph, pw), self.dev, integer=True)
        prev: list[np.ndarray | None] = [None] * n
        with torch.no_grad():
            for t in range(max(p.iterations for p in plans)):
                bits = np.zeros((n, R.BITS_PER_BLOCK, ph // R.BLOCK, pw // R.BLOCK), dtype=np.float32)
                active = []
                for i, (p, dec) in enumerate(zip(plans, decoders)):
                    d = p.depth(t)
                    if not d:
                        continue
                    active.append(i)
                    ctx = BitTables.contexts(t, prev[i], d, R.BITS_PER_BLOCK, positions)
                    sym = self.tables.decode(dec, ctx).reshape(d, ph // R.BLOCK, pw // R.BLOCK)
                    bits[i, :d] = sym * 2 - 1
                    prev[i] = bits[i]
                before = run.recon
                run.decode(torch.as_tensor(bits, device=self.dev), t)
                if len(active) < n:        # planes already complete keep their reconstruction
                    done = torch.ones(n, dtype=torch.bool, device=self.dev)
                    done[active] = False
                    run.recon = torch.where(done.view(-1, 1, 1), before, run.recon)
        return R.pixels_of(run.recon, lo, span)[:, :rows, :cols].cpu().numpy()
