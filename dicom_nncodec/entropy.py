"""Integer probability tables and the adapter to the constriction range coder.

Why tables: the coder must see exactly the same probabilities on every
machine.  The network gives an integer scale index j and an integer location
in quarter pixels; (j, quarter) selects one of a fixed set of tables of
integer frequencies that ship inside the weights file.  No float computation
happens at coding time, so nothing can round differently on another CPU.

Symbol layout of a residual r = x - floor(mu) under table (j, f):
  * k = max(0, floor(log2 scale_j) - 2) low bits are sent uniformly, and the
    high part z = r >> k is coded with the table, over [-Z, Z];
  * z outside [-Z, Z] is an escape (two escape symbols at the ends of the
    table) followed by r itself, uniform over [-(2**b), 2**b).
The tables are the logistic of scale_j centred at f/4, integrated over each
bin (the same distribution the network was trained on).
"""
from __future__ import annotations

import math

import constriction
import numpy as np

from .models import pyramid as P

FREQ_BITS = 22
QUARTERS = 4
TAIL_UNITS = 12          # the table covers +-12 logistic scales; beyond that, escape


def low_bits(j: int) -> int:
    return max(0, (j - P.SCALE_INDEX_OFFSET) // P.SCALES_PER_OCTAVE - 2)


def build_tables() -> tuple[np.ndarray, np.ndarray]:
    """All (j, f) tables: returns (offsets int64 of length NUM_SCALES*QUARTERS+1, freqs uint32).

    Computed in float64 once, when weights are exported; the integers are what
    ships and what the coder uses."""
    freqs, offsets = [], [0]
    for j in range(P.NUM_SCALES):
        s = P.scale_of_index(j)
        k = low_bits(j)
        width = 1 << k
        zmax = max(2, math.ceil(TAIL_UNITS * s / width))
        for f in range(QUARTERS):
            mu = f / QUARTERS
            edges = (np.arange(-zmax, zmax + 2, dtype=np.float64) * width - 0.5 - mu) / s
            cdf = 1.0 / (1.0 + np.exp(-edges))
            mass = np.concatenate([[cdf[0]], np.diff(cdf), [1.0 - cdf[-1]]])
            q = np.maximum(1, np.floor(mass * (1 << FREQ_BITS) + 0.5)).astype(np.uint32)
            freqs.append(q)
            offsets.append(offsets[-1] + len(q))
    return np.array(offsets, dtype=np.int64), np.concatenate(freqs)


SCALE_ADJUST_BITS = 6                      # per-step scale adjustment, sent as a 6-bit uniform symbol
SCALE_ADJUST_ZERO = 1 << (SCALE_ADJUST_BITS - 1)
_ADJUST_COARSE = (-24, -16, -10, -6, -3, 0, 3, 6, 10)
ADJUST_SAMPLE = 1 << 14
COST_ONE = 1024


class TableSet:
    """The shipped tables, with constriction models built lazily (one per table used)."""

    def __init__(self, offsets: np.ndarray, freqs: np.ndarray):
        self.offsets, self.freqs = offsets, freqs
        self._models: dict[int, object] = {}
        self._uniform: dict[int, object] = {}
        n = len(offsets) - 1
        self.zmax_of = (np.diff(offsets) - 3) // 2
        self.k_of = np.array([low_bits(t // QUARTERS) for t in range(n)], dtype=np.int64)
        self.k_of_scale = self.k_of[::QUARTERS]
        totals = np.add.reduceat(freqs.astype(np.float64), offsets[:-1])
        # code lengths in 1/1024 bit, as integers: the encoder's choices are sums of integers,
        # independent of summation order
        self.cost = np.floor(-np.log2(freqs / np.repeat(totals, np.diff(offsets))) * COST_ONE + 0.5).astype(np.int64)

    def table_index(self, j: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Table of each position.  Where low bits are sent uniformly (k > 0) the bins are 2**k wide
        and the quarter-pixel offset no longer matters, so quarter 0 is used: fewer distinct tables
        per step, hence fewer coder calls."""
        return j * QUARTERS + np.where(self.k_of_scale[j] > 0, 0, f)

    def code_length(self, r: np.ndarray, t: np.ndarray, bits: int) -> int:
        """Approximate code length (1/1024 bit) of residuals r under tables t (for the encoder's choices only)."""
        k, zmax = self.k_of[t], self.zmax_of[t]
        z = r >> k
        esc = (z < -zmax) | (z > zmax)
        sym = np.where(z < -zmax, 0, np.where(z > zmax, 2 * zmax + 2, z + zmax + 1))
        c = self.cost[self.offsets[t] + sym] + np.where(esc, bits + 1, k) * COST_ONE
        return int(c.sum())

    def choose_adjustment(self, r: np.ndarray, j: np.ndarray, f: np.ndarray, bits: int) -> int:
        """The scale-index offset (sent once per step and plane) that codes this step's residuals
        in the fewest bits: per-image adaptation at a cost of 6 bits per step."""
        if len(r) > ADJUST_SAMPLE:
            sel = np.linspace(0, len(r) - 1, ADJUST_SAMPLE).astype(np.int64)
            r, j, f = r[sel], j[sel], f[sel]
        lo, hi = -SCALE_ADJUST_ZERO, SCALE_ADJUST_ZERO - 1

        def cost(d):
            return self.code_length(r, self.table_index(np.clip(j + d, 0, P.NUM_SCALES - 1), f), bits)

        best = min(_ADJUST_COARSE, key=cost)
        for step in (2, 1):
            best = min((d for d in (best - step, best, best + step) if lo <= d <= hi), key=cost)
        return best

    def table(self, t: int):
        # built at most once per table; a race only builds an identical model twice
        m = self._models.get(t)
        if m is None:
            f = self.freqs[self.offsets[t]:self.offsets[t + 1]].astype(np.float64)
            m = self._models.setdefault(t, constriction.stream.model.Categorical(f, perfect=False))
        return m

    def uniform(self, size: int):
        m = self._uniform.get(size)
        if m is None:
            m = self._uniform.setdefault(size, constriction.stream.model.Uniform(size))
        return m


def _groups(table_idx: np.ndarray):
    """Positions grouped by table, in a fixed order both sides can compute."""
    if len(table_idx) == 0:
        return
    order = np.argsort(table_idx.astype(np.int16), kind="stable")   # 16-bit keys: numpy's radix sort
    sorted_t = table_idx[order]
    cuts = np.flatnonzero(np.diff(sorted_t)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(order)]])
    for a, b in zip(starts, ends):
        yield int(sorted_t[a]), order[a:b]


class StepEncoder:
    """Collects the residuals of one plane, step after step, into one range-coded stream."""

    def __init__(self, tables: TableSet):
        self.tables = tables
        self.enc = constriction.stream.queue.RangeEncoder()

    def encode_uniform(self, values: np.ndarray, bits: int):
        if len(values):
            self.enc.encode(values.astype(np.int32), self.tables.uniform(1 << bits))

    def encode_residuals(self, r: np.ndarray, j: np.ndarray, f: np.ndarray, bits: int):
        """r: residuals (int64), j: scale index, f: quarter offset, for each coded position (1-D)."""
        t = self.tables.table_index(j, f)
        esc_size = 1 << (bits + 1)
        for table, idx in _groups(t):
            k = int(self.tables.k_of[table])
            zmax = int(self.tables.zmax_of[table])
            rr = r[idx]
            z = rr >> k
            esc = (z < -zmax) | (z > zmax)
            sym = np.where(z < -zmax, 0, np.where(z > zmax, 2 * zmax + 2, z + zmax + 1))
            self.enc.encode(sym.astype(np.int32), self.tables.table(table))
            if k:
                low = (rr - (z << k))[~esc]
                if len(low):
                    self.enc.encode(low.astype(np.int32), self.tables.uniform(1 << k))
            if esc.any():
                self.enc.encode((rr[esc] + (1 << bits)).astype(np.int32), self.tables.uniform(esc_size))

    def finish(self) -> bytes:
        return self.enc.get_compressed().astype("<u4").tobytes()


class StepDecoder:
    """Mirror of StepEncoder."""

    def __init__(self, tables: TableSet, data: bytes):
        if len(data) % 4:
            raise ValueError("payload length is not a multiple of 4")
        self.tables = tables
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        self.dec = constriction.stream.queue.RangeDecoder(words)

    def decode_uniform(self, n: int, bits: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.dec.decode(self.tables.uniform(1 << bits), n), dtype=np.int64)

    def decode_residuals(self, j: np.ndarray, f: np.ndarray, bits: int) -> np.ndarray:
        t = self.tables.table_index(j, f)
        r = np.empty(len(t), dtype=np.int64)
        esc_size = 1 << (bits + 1)
        for table, idx in _groups(t):
            k = int(self.tables.k_of[table])
            zmax = int(self.tables.zmax_of[table])
            sym = np.asarray(self.dec.decode(self.tables.table(table), len(idx)), dtype=np.int64)
            esc = (sym == 0) | (sym == 2 * zmax + 2)
            z = sym - zmax - 1
            rr = z << k
            if k:
                n = int((~esc).sum())
                if n:
                    rr[~esc] += np.asarray(self.dec.decode(self.tables.uniform(1 << k), n), dtype=np.int64)
            if esc.any():
                rr[esc] = np.asarray(self.dec.decode(self.tables.uniform(esc_size), int(esc.sum())),
                                     dtype=np.int64) - (1 << bits)
            r[idx] = rr
        return r


BIT_PROB_BITS = 16
BIT_PROB_MIN, BIT_PROB_MAX = 64, (1 << BIT_PROB_BITS) - 64


class BitTables:
    """Probabilities of the lossy codec's binary codes, one per context, shipped as integers.

    A context is (iteration t, bit channel c, the bit at the same channel and position in
    iteration t-1: none / -1 / +1); ``probs[ctx]`` is P(bit = +1) in units of 2**-16.  The codes
    of one iteration are coded context by context (positions in raster order within a context),
    so both sides need only the previous iteration to know every context."""

    def __init__(self, probs: np.ndarray):
        self.probs = np.asarray(probs, dtype=np.int64).reshape(-1)
        if self.probs.min(initial=BIT_PROB_MIN) < BIT_PROB_MIN or self.probs.max(initial=BIT_PROB_MAX) > BIT_PROB_MAX:
            raise ValueError("bit probabilities outside the allowed range")
        p1 = self.probs / float(1 << BIT_PROB_BITS)
        # ideal code lengths in 1/1024 bit, as integers (for the encoder's rate control only)
        self.cost = np.stack([np.floor(-np.log2(1 - p1) * COST_ONE + 0.5),
                              np.floor(-np.log2(p1) * COST_ONE + 0.5)], 1).astype(np.int64)
        self._models: dict[int, object] = {}

    @staticmethod
    def contexts(t: int, prev: np.ndarray | None, channels: int, n_channels: int, positions: int) -> np.ndarray:
        """Context of every code of iteration t (channels x positions, channel-major)."""
        base = (t * n_channels + np.arange(channels, dtype=np.int64)) * 3
        if prev is None:
            return np.repeat(base, positions)
        return (base[:, None] + np.where(prev[:channels].reshape(channels, -1) > 0, 2, 1)).reshape(-1)

    def code_length(self, symbols: np.ndarray, ctx: np.ndarray) -> int:
        """Approximate length (1/1024 bit) of 0/1 symbols under their contexts."""
        return int(self.cost[ctx, symbols].sum())

    def model(self, ctx: int):
        m = self._models.get(ctx)
        if m is None:
            p = int(self.probs[ctx])
            f = np.array([(1 << BIT_PROB_BITS) - p, p], dtype=np.float64)
            m = self._models.setdefault(ctx, constriction.stream.model.Categorical(f, perfect=False))
        return m

    def encode(self, enc, symbols: np.ndarray, ctx: np.ndarray) -> None:
        for c, idx in _groups(ctx):
            enc.encode(symbols[idx].astype(np.int32), self.model(c))

    def decode(self, dec, ctx: np.ndarray) -> np.ndarray:
        out = np.empty(len(ctx), dtype=np.int64)
        for c, idx in _groups(ctx):
            out[idx] = np.asarray(dec.decode(self.model(c), len(idx)), dtype=np.int64)
        return out


def estimate_bit_probs(counts: np.ndarray) -> np.ndarray:
    """counts[ctx] = (zeros, ones) observed on training data -> integer P(+1) per context."""
    n0, n1 = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
    p = (n1 + 1) / (n0 + n1 + 2)
    return np.clip(np.floor(p * (1 << BIT_PROB_BITS) + 0.5), BIT_PROB_MIN, BIT_PROB_MAX).astype(np.int64)
