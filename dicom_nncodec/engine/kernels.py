"""The compiled engine of bitstream version 2: one call codes a whole plane.

Why numba: the engine must run the pyramid's per-pixel network and the
entropy coder with no Python between pixels (the version-1 path spent its time
in dozens of small tensor operations per step and in per-table coder calls).
numba compiles this file with LLVM at first use and caches the machine code
beside it; users install it as a wheel from the package index and need no
compiler.  Every function releases the GIL, so planes code in parallel threads.

Everything here is integer arithmetic (int32 / int64), so results are the same
on every CPU and in every thread.  The normative description of each step is
``conformance/PRIVATE_TRANSFER_SYNTAX.md`` section 12; ``reference.py`` is a
plain-Python transcription used as the oracle in tests.

Plane coding, in short (section 12 of the annex has the details):

* the pyramid and phase order of version 1 (D, B, C per level, coarse to fine);
* per position, integer features from 12 or 14 decoded neighbours and a small
  integer MLP per phase give a prediction ``mu4`` (quarter pixels) and a scale
  index ``j``;
* the residual is coded under one of ``NC`` adaptive context tables chosen by
  ``j``: a token (small alphabet, as JPEG-XL's hybrid integers) through rANS,
  then raw bits; the tables' integer counts adapt after every ``CHUNK`` grid
  positions, identically in encoder and decoder.
"""
from __future__ import annotations

import numpy as np
from numba import njit

PREC = 15                       # rANS probability precision: frequencies sum to 2**15
TOTAL = 1 << PREC
RANS_L = 1 << 16                # rANS state lives in [2**16, 2**32); 16-bit words
RAW_CHUNK = 15                  # raw bits go through the coder in chunks of at most 15
NT = 46                         # tokens: 0..15 direct, then 15 exponents x 2 mantissa halves
DIRECT = 16
NC = 45                         # context tables: scale index j // 3
NUM_SCALES = 133
SCALE_INDEX_OFFSET = 36
SCALES_PER_OCTAVE = 6
CHUNK = 4096                    # grid positions between two table updates
BLOCK = 256                      # positions whose network runs together; not normative, but must divide CHUNK
HIDDEN = 16
assert CHUNK % BLOCK == 0, "table updates happen at block boundaries: BLOCK must divide CHUNK"
MAX_K = 14
MAX_F = MAX_K + 4
LEAKY_SHIFT = 3
LUT_SHIFT = 9                   # decoder's token search starts from a table over slot >> LUT_SHIFT (not normative)
LUT_SIZE = TOTAL >> LUT_SHIFT
ERR_OK, ERR_TRUNCATED, ERR_RANGE, ERR_TRAILING = 0, 1, 2, 3

# Neighbour offsets (row, column) in the level's coordinates, per phase D, B, C; the first four are
# the nearest, whose mean is the location and whose spread is the activity.
_OFFS = {
    0: [(-1, -1), (-1, 1), (1, -1), (1, 1), (-1, -3), (-1, 3), (1, -3), (1, 3), (-3, -1), (-3, 1), (3, -1), (3, 1)],
    1: [(0, -1), (0, 1), (-1, 0), (1, 0), (0, -3), (0, 3), (-2, -1), (-2, 1), (2, -1), (2, 1), (-1, -2), (-1, 2),
        (1, -2), (1, 2)],
    2: [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1), (-3, 0), (3, 0), (-2, -1), (-2, 1),
        (2, -1), (2, 1)],
}
NEI_K = np.array([len(_OFFS[p]) for p in range(3)], dtype=np.int64)
NEI_DY = np.zeros((3, MAX_K), dtype=np.int64)
NEI_DX = np.zeros((3, MAX_K), dtype=np.int64)
for _p, _o in _OFFS.items():
    for _i, (_dy, _dx) in enumerate(_o):
        NEI_DY[_p, _i], NEI_DX[_p, _i] = _dy, _dx
ORIGIN_Y = np.array([1, 0, 1], dtype=np.int64)       # D (odd, odd), B (even, odd), C (odd, even)
ORIGIN_X = np.array([1, 1, 0], dtype=np.int64)
THRESHOLDS = np.array([int(np.ceil(2.0 ** (m / SCALES_PER_OCTAVE) - 1e-12)) for m in range(1, 121)], dtype=np.int64)
SMALL_U = 1 << 12              # activities below this take their log index and reciprocal from tables
LOG_LUT = np.searchsorted(THRESHOLDS, np.arange(SMALL_U), side="right").astype(np.int32)
INV_LUT = np.array([(1 << 16) // max(u, 1) for u in range(SMALL_U)], dtype=np.int32)
# raw low bits of each context: floor(log2 of the context's middle scale) - 3, at least 0
LOW_BITS = np.array([max(0, (3 * c + 1 - SCALE_INDEX_OFFSET) // SCALES_PER_OCTAVE - 3) for c in range(NC)],
                    dtype=np.int64)


def feature_count(phase: int) -> int:
    return int(NEI_K[phase]) + 4


# ---------------------------------------------------------------------------------------------------
# integer helpers

@njit(cache=True, nogil=True, inline="always")
def _clampp(v, n):
    """Parity-preserving clamp into [0, n) (n even): the nearest index of v's parity inside."""
    if v < 0:
        return v + 2 * ((1 - v) // 2)
    if v > n - 1:
        return v - 2 * ((v - n + 2) // 2)
    return v


@njit(cache=True, nogil=True)
def _log_index(u, thr):
    """#{m : T_m <= u} = floor(6 log2 u) for u >= 1, by binary search in the threshold table."""
    lo, hi = 0, thr.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if thr[mid] <= u:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------------
# adaptive tables

@njit(cache=True, nogil=True)
def _build(counts, freq, cdf, lut, c):
    """Frequencies (summing to 2**PREC, each at least 1, the rounding spare to the likeliest token),
    their cumulative starts, and the decoder's search table: for each slot bucket, the token holding
    the bucket's first slot, so a token search takes a step or two instead of a scan."""
    total = 0
    best = 0
    for t in range(NT):
        total += counts[c, t]
        if counts[c, t] > counts[c, best]:
            best = t
    spare = TOTAL - NT
    s = 0
    for t in range(NT):
        f = 1 + (counts[c, t] * spare) // total
        freq[c, t] = f
        s += f
    freq[c, best] += TOTAL - s
    acc = 0
    for t in range(NT):
        cdf[c, t] = acc
        acc += freq[c, t]
    cdf[c, NT] = acc
    t = 0
    for b in range(LUT_SIZE):
        while cdf[c, t + 1] <= (b << LUT_SHIFT):
            t += 1
        lut[c, b] = t


@njit(cache=True, nogil=True)
def init_tables(prior, counts, freq, cdf, lut):
    for c in range(NC):
        for t in range(NT):
            counts[c, t] = prior[c, t]
        _build(counts, freq, cdf, lut, c)


@njit(cache=True, nogil=True)
def update_tables(counts, hist, freq, cdf, lut, inc, limit):
    """After every CHUNK grid positions: add the chunk's token counts (times ``inc``), halve a table
    whose total exceeds ``limit``, and rebuild the tables that changed."""
    for c in range(NC):
        seen = 0
        for t in range(NT):
            seen += hist[c, t]
        if seen == 0:
            continue
        total = 0
        for t in range(NT):
            counts[c, t] += hist[c, t] * inc
            hist[c, t] = 0
            total += counts[c, t]
        while total > limit:
            total = 0
            for t in range(NT):
                counts[c, t] = (counts[c, t] + 1) >> 1
                total += counts[c, t]
        _build(counts, freq, cdf, lut, c)


# ---------------------------------------------------------------------------------------------------
# tokens

@njit(cache=True, nogil=True, inline="always")
def _token(zz):
    """(token, extra-bit count, extra bits) of an unsigned value, JPEG-XL hybrid-integer style."""
    if zz < DIRECT:
        return zz, 0, 0
    e = 0
    v = zz
    while v > 1:
        v >>= 1
        e += 1
    ne = e - 1
    return DIRECT + 2 * (e - 4) + ((zz >> ne) & 1), ne, zz & ((1 << ne) - 1)


# ---------------------------------------------------------------------------------------------------
# the network over a block of positions

@njit(cache=True, nogil=True)
def _dense_leaky(x, n_in, out, w, b, s, ph, nb):
    """One integer layer over a block: out = clamp(leaky(shift(w . x + b)), +-127), per output channel."""
    for o in range(HIDDEN):
        bias = b[ph, o]
        for p in range(nb):
            out[o, p] = bias
        for k in range(n_in):
            wk = w[ph, o, k]
            for p in range(nb):
                out[o, p] += wk * x[k, p]
        sh = s[ph, o]
        if sh >= 0:
            for p in range(nb):
                v = out[o, p] << sh
                v = v >> LEAKY_SHIFT if v < 0 else v
                out[o, p] = min(max(v, -127), 127)
        else:
            for p in range(nb):
                v = out[o, p] >> -sh
                v = v >> LEAKY_SHIFT if v < 0 else v
                out[o, p] = min(max(v, -127), 127)


@njit(cache=True, nogil=True)
def _network_block(X, H2, W2, ph, level, bits, ys, xs, nb, w1, b1, s1, w2, b2, s2, w3, b3, s3,
                   nv, feats, h1, h2, loc, uu, lu, mu4, jj):
    """Features, the two integer layers and the head for ``nb`` positions (level coordinates ys, xs).

    Laid out for the vector units: neighbours are gathered once per position, then every
    feature and every layer is a loop over the block's positions on int32 lanes (the export
    bounds every partial sum below 2**24, so int32 is exact)."""
    K = NEI_K[ph]
    F = K + 4
    maxv = (1 << bits) - 1
    lev = level if level < 7 else 7
    for p in range(nb):
        y, x = ys[p], xs[p]
        if y >= 3 and y + 3 < H2 and x >= 3 and x + 3 < W2:
            for k in range(K):
                nv[k, p] = X[y + NEI_DY[ph, k], x + NEI_DX[ph, k]]
        else:
            for k in range(K):
                nv[k, p] = X[_clampp(y + NEI_DY[ph, k], H2), _clampp(x + NEI_DX[ph, k], W2)]
    for p in range(nb):
        loc[p] = (nv[0, p] + nv[1, p] + nv[2, p] + nv[3, p] + 2) >> 2
    for p in range(nb):
        lc = loc[p]
        uu[p] = ((abs(nv[0, p] - lc) + abs(nv[1, p] - lc) + abs(nv[2, p] - lc) + abs(nv[3, p] - lc)) >> 2) + 1
    for p in range(nb):                                     # h2 rows 0, 1 hold inv and lu until layer 2
        u = uu[p]
        if u < SMALL_U:
            h2[0, p] = INV_LUT[u]
            h2[1, p] = LOG_LUT[u]
        else:
            h2[0, p] = (1 << 16) // u
            h2[1, p] = _log_index(u, THRESHOLDS)
    for k in range(K):
        for p in range(nb):
            v = (np.int64(nv[k, p] - loc[p]) * h2[0, p]) >> 13
            feats[k, p] = min(max(v, -127), 127)
    for p in range(nb):
        li = h2[1, p]
        lu[p] = li
        feats[K, p] = (loc[p] * 64) >> bits
        feats[K + 1, p] = li if li < 127 else 127
        feats[K + 2, p] = 8 * lev
        feats[K + 3, p] = 4 * bits
    _dense_leaky(feats, F, h1, w1, b1, s1, ph, nb)
    _dense_leaky(h1, HIDDEN, h2, w2, b2, s2, ph, nb)
    # head: location offset m and log-scale offset s (Q4), then mu4 and j
    for p in range(nb):
        h1[0, p] = b3[ph, 0]
        h1[1, p] = b3[ph, 1]
    for k in range(HIDDEN):
        wm = w3[ph, 0, k]
        ws = w3[ph, 1, k]
        for p in range(nb):
            h1[0, p] += wm * h2[k, p]
            h1[1, p] += ws * h2[k, p]
    sm, ss = s3[ph, 0], s3[ph, 1]
    for p in range(nb):
        m = h1[0, p] << sm if sm >= 0 else h1[0, p] >> -sm
        s = h1[1, p] << ss if ss >= 0 else h1[1, p] >> -ss
        m = min(max(m, -2047), 2047)
        s = min(max(s, -2047), 2047)
        v = 4 * np.int64(loc[p]) + ((np.int64(m) * uu[p]) >> 2)
        if v < 0:
            v = 0
        elif v > 4 * maxv:
            v = 4 * maxv
        mu4[p] = v
        j = lu[p] + SCALE_INDEX_OFFSET + ((s * SCALES_PER_OCTAVE + 8) >> 4)
        jj[p] = min(max(j, 0), NUM_SCALES - 1)


@njit(cache=True, nogil=True)
def _block_buffers():
    """Per-call scratch of ``_network_block`` (int32 lanes, except the int64 outputs)."""
    nv = np.zeros((MAX_K, BLOCK), dtype=np.int32)
    feats = np.zeros((MAX_F, BLOCK), dtype=np.int32)
    h1 = np.zeros((HIDDEN, BLOCK), dtype=np.int32)
    h2 = np.zeros((HIDDEN, BLOCK), dtype=np.int32)
    loc = np.zeros(BLOCK, dtype=np.int32)
    uu = np.zeros(BLOCK, dtype=np.int32)
    lu = np.zeros(BLOCK, dtype=np.int32)
    mu4 = np.zeros(BLOCK, dtype=np.int64)
    jj = np.zeros(BLOCK, dtype=np.int64)
    return nv, feats, h1, h2, loc, uu, lu, mu4, jj


# ---------------------------------------------------------------------------------------------------
# rANS: the encoder records (start, frequency, precision) per symbol and codes them backwards at the end

# One recorded symbol is one uint32: a token is (freq << 15) | start (precision PREC); a raw chunk of c
# bits is RAW_FLAG | (c << 15) | value (frequency 1, precision c).  Four bytes a symbol keep the
# encoder's memory near ten bytes a pixel, and the record grows as needed.
RAW_FLAG = np.uint32(1 << 31)


@njit(cache=True, nogil=True)
def _reserve(syms, n, extra):
    """``syms`` with room for ``extra`` more symbols after the first ``n`` (grown by half when full)."""
    if n + extra <= syms.shape[0]:
        return syms
    bigger = np.empty(n + extra + (syms.shape[0] >> 1) + 1024, dtype=np.uint32)
    bigger[:n] = syms[:n]
    return bigger


@njit(cache=True, nogil=True, inline="always")
def _put(syms, n, cum, freq):
    syms[n] = np.uint32((freq << 15) | cum)
    return n + 1


@njit(cache=True, nogil=True)
def _put_raw(syms, n, v, nbits):
    while nbits > 0:
        c = nbits if nbits < RAW_CHUNK else RAW_CHUNK
        nbits -= c
        syms[n] = RAW_FLAG | np.uint32((c << 15) | ((v >> nbits) & ((1 << c) - 1)))
        n += 1
    return n


@njit(cache=True, nogil=True)
def rans_encode(syms, n):
    """The rANS words (uint16) of n recorded symbols: final state first, then the renormalisation
    words in decoding order; padded with one zero word to a multiple of two words."""
    out = np.empty(n + 64, dtype=np.uint16)
    m = 0
    x = np.int64(RANS_L)
    for i in range(n - 1, -1, -1):
        v = np.int64(syms[i])
        if v >> 31:
            f = np.int64(1)
            p = (v >> 15) & 0xF
        else:
            f = (v >> 15) & 0x7FFF
            p = np.int64(PREC)
        cum = v & 0x7FFF
        x_max = (np.int64(1) << (32 - p)) * f
        while x >= x_max:
            if m == out.shape[0]:
                bigger = np.empty(m + (m >> 1) + 64, dtype=np.uint16)
                bigger[:m] = out[:m]
                out = bigger
            out[m] = x & 0xFFFF
            m += 1
            x >>= 16
        x = ((x // f) << p) + (x % f) + cum
    total = m + 2 + (m % 2)
    words = np.zeros(total, dtype=np.uint16)
    words[0] = (x >> 16) & 0xFFFF
    words[1] = x & 0xFFFF
    for i in range(m):
        words[2 + i] = out[m - 1 - i]
    return words


@njit(cache=True, nogil=True, inline="always")
def _renorm(x, words, pos, nw):
    if x < RANS_L:
        if pos >= nw:
            return x, pos, True
        x = (x << 16) | np.int64(words[pos])
        pos += 1
    return x, pos, False


@njit(cache=True, nogil=True)
def _get_raw(x, words, pos, nw, nbits):
    v = np.int64(0)
    bad = False
    while nbits > 0:
        c = nbits if nbits < RAW_CHUNK else RAW_CHUNK
        nbits -= c
        s = x & ((1 << c) - 1)
        x >>= c
        x, pos, b = _renorm(x, words, pos, nw)
        bad |= b
        v = (v << c) | s
    return v, x, pos, bad


# ---------------------------------------------------------------------------------------------------
# one plane

@njit(cache=True, nogil=True)
def _plane_sizes(h, w):
    n = 1
    a, b = h, w
    while max(a, b) > 2:
        a, b = (a + 1) // 2, (b + 1) // 2
        n += 1
    sizes = np.empty((n, 2), dtype=np.int64)
    a, b = h, w
    sizes[0, 0], sizes[0, 1] = a, b
    for i in range(1, n):
        a, b = (a + 1) // 2, (b + 1) // 2
        sizes[i, 0], sizes[i, 1] = a, b
    return sizes


@njit(cache=True, nogil=True)
def code_plane(plane, decode, words, bits, prior, inc, limit,
               w1, b1, s1, w2, b2, s2, w3, b3, s3):
    """Encode (``decode`` False: ``plane`` holds the pixels; returns the rANS words) or decode
    (``plane`` is filled from ``words``).  Returns (words, error code)."""
    h0, w0 = plane.shape
    maxv = (1 << bits) - 1
    sizes = _plane_sizes(h0, w0)
    nlev = sizes.shape[0]
    counts = np.zeros((NC, NT), dtype=np.int64)
    hist = np.zeros((NC, NT), dtype=np.int64)
    freq = np.zeros((NC, NT), dtype=np.int64)
    cdf = np.zeros((NC, NT + 1), dtype=np.int64)
    lut = np.zeros((NC, LUT_SIZE), dtype=np.int64)
    init_tables(prior, counts, freq, cdf, lut)
    syms = np.empty(0 if decode else 2 * h0 * w0 + 1024, dtype=np.uint32)
    ns = 0
    nw = words.shape[0]
    x = np.int64(0)
    pos = 2
    if decode:
        if nw < 2:
            return words, ERR_TRUNCATED
        x = (np.int64(words[0]) << 16) | np.int64(words[1])
    nv, feats, h1, h2, loc, uu, lu, mu4, jj = _block_buffers()
    ys = np.zeros(BLOCK, dtype=np.int64)
    xs = np.zeros(BLOCK, dtype=np.int64)
    # the base level, raw
    hb, wb = sizes[nlev - 1, 0], sizes[nlev - 1, 1]
    level_img = np.zeros((hb, wb), dtype=np.int32)
    for i in range(hb):
        for j in range(wb):
            if decode:
                v, x, pos, bad = _get_raw(x, words, pos, nw, bits)
                if bad:
                    return words, ERR_TRUNCATED
                level_img[i, j] = v
            else:
                v = plane[(i << (nlev - 1)), (j << (nlev - 1))]
                syms = _reserve(syms, ns, 2)
                ns = _put_raw(syms, ns, v, bits)
                level_img[i, j] = v
    for level in range(nlev - 2, -1, -1):
        H, W = sizes[level, 0], sizes[level, 1]
        h, w = sizes[level + 1, 0], sizes[level + 1, 1]
        H2, W2 = 2 * h, 2 * w
        X = np.zeros((H2, W2), dtype=np.int32)
        for i in range(h):
            for j in range(w):
                X[2 * i, 2 * j] = level_img[i, j]
        step = 1 << level
        for ph in range(3):
            oy, ox = ORIGIN_Y[ph], ORIGIN_X[ph]
            npos = h * w
            since = 0
            for start in range(0, npos, BLOCK):
                nb = min(BLOCK, npos - start)
                for p in range(nb):
                    g = start + p
                    ys[p] = 2 * (g // w) + oy
                    xs[p] = 2 * (g % w) + ox
                _network_block(X, H2, W2, ph, level, bits, ys, xs, nb, w1, b1, s1, w2, b2, s2, w3, b3, s3,
                               nv, feats, h1, h2, loc, uu, lu, mu4, jj)
                for p in range(nb):
                    y, xx = ys[p], xs[p]
                    m4 = mu4[p]
                    pred = (m4 + 2) >> 2
                    if y >= H or xx >= W:          # padding of an odd-sized level: not coded
                        X[y, xx] = pred
                        continue
                    c = jj[p] // 3
                    k = LOW_BITS[c]
                    flip = (m4 & 3) == 1
                    if decode:
                        slot = x & (TOTAL - 1)
                        t = lut[c, slot >> LUT_SHIFT]
                        while cdf[c, t + 1] <= slot:
                            t += 1
                        x = freq[c, t] * (x >> PREC) + slot - cdf[c, t]
                        x, pos, bad = _renorm(x, words, pos, nw)
                        if bad:
                            return words, ERR_TRUNCATED
                        if t < DIRECT:
                            zz = np.int64(t)
                        else:
                            e = (t - DIRECT) // 2 + 4
                            ne = e - 1
                            ex, x, pos, bad = _get_raw(x, words, pos, nw, ne)
                            if bad:
                                return words, ERR_TRUNCATED
                            zz = (np.int64(1) << e) | (np.int64((t - DIRECT) & 1) << ne) | ex
                        low, x, pos, bad = _get_raw(x, words, pos, nw, k)
                        if bad:
                            return words, ERR_TRUNCATED
                        z = zz >> 1 if (zz & 1) == 0 else -((zz + 1) >> 1)
                        s = (z << k) + low
                        r = -s if flip else s
                        v = pred + r
                        if v < 0 or v > maxv:
                            return words, ERR_RANGE
                        X[y, xx] = v
                        hist[c, t] += 1
                    else:
                        v = plane[y * step, xx * step]
                        r = v - pred
                        s = -r if flip else r
                        z = s >> k
                        low = s & ((1 << k) - 1)
                        zz = 2 * z if z >= 0 else -2 * z - 1
                        t, ne, ex = _token(zz)
                        syms = _reserve(syms, ns, 8)
                        ns = _put(syms, ns, cdf[c, t], freq[c, t])
                        ns = _put_raw(syms, ns, ex, ne)
                        ns = _put_raw(syms, ns, low, k)
                        X[y, xx] = v
                        hist[c, t] += 1
                since += nb
                if since >= CHUNK or start + nb >= npos:
                    update_tables(counts, hist, freq, cdf, lut, inc, limit)
                    since = 0
        level_img = X[:H, :W].copy()
    if decode:
        # the stream must end exactly: the initial encoder state, then at most one zero pad word
        if x != RANS_L or nw - pos > 1 or (nw - pos == 1 and words[pos] != 0):
            return words, ERR_TRAILING
        for i in range(h0):
            for j in range(w0):
                plane[i, j] = level_img[i, j]
        return words, ERR_OK
    return rans_encode(syms, ns), ERR_OK


@njit(cache=True, nogil=True)
def phase_predictions(X, ph, level, bits, w1, b1, s1, w2, b2, s2, w3, b3, s3):
    """(mu4, j) of every position of one phase of a padded level grid X (2h x 2w): what the coder
    sees.  For the tests that hold the torch model (training, GPU) to the engine."""
    H2, W2 = X.shape
    h, w = H2 // 2, W2 // 2
    out_m = np.zeros((h, w), dtype=np.int64)
    out_j = np.zeros((h, w), dtype=np.int64)
    nv, feats, h1, h2, loc, uu, lu, mu4, jj = _block_buffers()
    ys = np.zeros(BLOCK, dtype=np.int64)
    xs = np.zeros(BLOCK, dtype=np.int64)
    npos = h * w
    for start in range(0, npos, BLOCK):
        nb = min(BLOCK, npos - start)
        for p in range(nb):
            g = start + p
            ys[p] = 2 * (g // w) + ORIGIN_Y[ph]
            xs[p] = 2 * (g % w) + ORIGIN_X[ph]
        _network_block(X, H2, W2, ph, level, bits, ys, xs, nb, w1, b1, s1, w2, b2, s2, w3, b3, s3,
                       nv, feats, h1, h2, loc, uu, lu, mu4, jj)
        for p in range(nb):
            g = start + p
            out_m[g // w, g % w] = mu4[p]
            out_j[g // w, g % w] = jj[p]
    return out_m, out_j
