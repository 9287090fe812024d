"""A plain-Python decoder of one format-version-2 plane payload, written from the annex alone.

This module is the oracle of ``tests/test_engine_v2.py``: it transcribes
``conformance/PRIVATE_TRANSFER_SYNTAX.md`` section 12 (payload and value map
12.2, rANS decoder 12.3, pyramid and order 12.4, neighbours 12.5, features and
network 12.6, adaptive tables 12.7, residuals 12.8, the plane loop 12.9) in
Python integers and lists, one position at a time, so that the compiled engine
(``kernels.py``, numba) is checked against the text of the annex rather than
against itself.  It is deliberately slow (tens of microseconds per pixel) and
is never used for coding; numpy appears only where the weights are turned into
lists of Python integers.  It shares no code with ``kernels.py`` or
``planes.py``: every constant below is restated from the annex.
"""
from __future__ import annotations

from bisect import bisect_right
from operator import mul

from ..errors import BitstreamError

# section 12, constants
PREC = 15                   # frequencies of a table sum to 2**15
TOTAL = 1 << PREC
RANS_L = 1 << 16            # lower bound of the state; also the final state of a valid stream
RAW_CHUNK = 15
NT = 46                     # tokens
DIRECT = 16                 # tokens 0..15 are the value itself
NC = 45                     # context tables
CHUNK = 4096                # grid positions of a step between two table updates
HIDDEN = 16

# section 12.4: phase order D, B, C and their origins (row, column) in the padded grid
ORIGINS = ((1, 1), (0, 1), (1, 0))

# section 12.5: neighbour offsets (row, column) per phase, nearest four first
OFFSETS = (
    ((-1, -1), (-1, 1), (1, -1), (1, 1), (-1, -3), (-1, 3), (1, -3), (1, 3), (-3, -1), (-3, 1), (3, -1), (3, 1)),
    ((0, -1), (0, 1), (-1, 0), (1, 0), (0, -3), (0, 3), (-2, -1), (-2, 1), (2, -1), (2, 1), (-1, -2), (-1, 2),
     (1, -2), (1, 2)),
    ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1), (-3, 0), (3, 0), (-2, -1), (-2, 1),
     (2, -1), (2, 1)),
)


def _thresholds() -> list[int]:
    """T_m, m = 1..120: the smallest integer t with t**6 >= 2**m (section 12.6)."""
    out = []
    for m in range(1, 121):
        t = 1 << (m // 6)
        while t ** 6 < 2 ** m:
            t += 1
        out.append(t)
    return out


THRESHOLDS = _thresholds()

# section 12.6: raw low bits of context c
LOW_BITS = [max(0, (3 * c + 1 - 36) // 6 - 3) for c in range(NC)]


def _fail(what: str):
    raise BitstreamError(f"corrupt payload: {what}")


# ---------------------------------------------------------------------------------------------------
# section 12.2: payload and value map

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos >= len(data):
            _fail("truncated or overlong value map")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, pos
    _fail("truncated or overlong value map")


def read_value_map(payload: bytes, rows: int, cols: int, bits: int) -> tuple[list[int] | None, int]:
    """(the values of the map or None, byte offset of the first rANS word); runs checks 1-6 of 12.2."""
    if len(payload) < 4 or len(payload) % 4:
        _fail("length is not a positive multiple of 4")
    m = int.from_bytes(payload[:4], "little")
    if m % 4 or 4 + m > len(payload):
        _fail("value map length out of range")
    if m == 0:
        return None, 4
    n, pos = _varint(payload, 4)
    if n < 2 or n > min(rows * cols, 1 << bits):
        _fail("value map count out of range")
    v, pos = _varint(payload, pos)
    values = [v]
    for _ in range(n - 1):
        g, pos = _varint(payload, pos)
        v = v + g + 1
        values.append(v)
    if pos > 4 + m or any(payload[pos:4 + m]):
        _fail("value map overruns its length")
    if values[-1] > (1 << bits) - 1:
        _fail("value map holds a value above the plane's bits")
    return values, 4 + m


# ---------------------------------------------------------------------------------------------------
# section 12.3: rANS decoder

class _Rans:
    def __init__(self, words: list[int]):
        self.words = words
        if len(words) < 2:
            _fail("truncated payload")
        self.x = words[0] * 65536 + words[1]
        self.pos = 2

    def _renormalise(self):
        if self.x < RANS_L:
            if self.pos == len(self.words):
                _fail("truncated payload")
            self.x = self.x * 65536 + self.words[self.pos]
            self.pos += 1

    def token(self, freq: list[int], cdf: list[int]) -> int:
        slot = self.x % TOTAL
        t = bisect_right(cdf, slot) - 1            # cdf[t] <= slot < cdf[t + 1]
        self.x = freq[t] * (self.x // TOTAL) + slot - cdf[t]
        self._renormalise()
        return t

    def read(self, n: int) -> int:
        v = 0
        while n > 0:
            c = min(n, RAW_CHUNK)
            n -= c
            s = self.x % (1 << c)
            self.x //= 1 << c
            self._renormalise()
            v = v * (1 << c) + s
        return v

    def check_end(self):
        left = len(self.words) - self.pos
        if self.x != RANS_L or left > 1 or (left == 1 and self.words[self.pos] != 0):
            _fail("payload does not end where its coder does")


# ---------------------------------------------------------------------------------------------------
# section 12.7: adaptive context tables

class _Tables:
    def __init__(self, prior, inc: int, limit: int):
        self.counts = [[int(v) for v in row] for row in prior]
        self.inc, self.limit = inc, limit
        self.freq = [None] * NC
        self.cdf = [None] * NC
        self.new = [[0] * NT for _ in range(NC)]
        for c in range(NC):
            self._build(c)

    def _build(self, c: int):
        counts = self.counts[c]
        total = sum(counts)
        best = counts.index(max(counts))                          # the first largest count
        freq = [1 + cnt * (TOTAL - NT) // total for cnt in counts]
        freq[best] += TOTAL - sum(freq)
        cdf = [0]
        for f in freq:
            cdf.append(cdf[-1] + f)
        self.freq[c], self.cdf[c] = freq, cdf

    def update(self):
        for c in range(NC):
            new = self.new[c]
            if not any(new):
                continue
            counts = [cnt + self.inc * k for cnt, k in zip(self.counts[c], new)]
            while sum(counts) > self.limit:
                counts = [(cnt + 1) // 2 for cnt in counts]
            self.counts[c] = counts
            self._build(c)
            self.new[c] = [0] * NT


# ---------------------------------------------------------------------------------------------------
# sections 12.5 and 12.6: neighbours, features, network

def _clamp(v: int, n: int) -> int:
    """Parity-preserving clamp into [0, n), n even."""
    if v < 0:
        return v + 2 * ((1 - v) // 2)
    if v > n - 1:
        return v - 2 * ((v - n + 2) // 2)
    return v


def _lu(u: int) -> int:
    return bisect_right(THRESHOLDS, u)            # #{m : T_m <= u}


def _shift(acc: int, s: int) -> int:
    return acc * (1 << s) if s >= 0 else acc >> -s


class _Net:
    """The weights of section 12.10 as lists of Python integers, per phase."""

    def __init__(self, arrays: dict):
        def lists(name):
            return [[[int(v) for v in row] for row in phase] for phase in arrays[name]]

        self.w1 = [[row[:len(OFFSETS[p]) + 4] for row in ph] for p, ph in enumerate(lists("w1"))]
        self.w2, self.w3 = lists("w2"), lists("w3")
        self.b1, self.b2, self.b3 = ([[int(v) for v in ph] for ph in arrays[n]] for n in ("b1", "b2", "b3"))
        self.s1, self.s2, self.s3 = ([[int(v) for v in ph] for ph in arrays[n]] for n in ("s1", "s2", "s3"))

    def predict(self, X, y: int, x: int, p: int, level: int, bits: int) -> tuple[int, int]:
        """(mu4, j) of position (y, x) of phase p in the padded grid X (section 12.6)."""
        n2h, n2w = len(X), len(X[0])
        nb = [X[_clamp(y + dy, n2h)][_clamp(x + dx, n2w)] for dy, dx in OFFSETS[p]]
        loc = (nb[0] + nb[1] + nb[2] + nb[3] + 2) // 4
        u = (abs(nb[0] - loc) + abs(nb[1] - loc) + abs(nb[2] - loc) + abs(nb[3] - loc)) // 4 + 1
        inv = 65536 // u
        lu = _lu(u)
        f = [min(max((n - loc) * inv // 8192, -127), 127) for n in nb]
        f += [loc * 64 // (1 << bits), min(lu, 127), 8 * min(level, 7), 4 * bits]
        h1 = []
        for row, b, s in zip(self.w1[p], self.b1[p], self.s1[p]):
            v = _shift(b + sum(map(mul, row, f)), s)
            if v < 0:
                v >>= 3
            h1.append(min(max(v, -127), 127))
        h2 = []
        for row, b, s in zip(self.w2[p], self.b2[p], self.s2[p]):
            v = _shift(b + sum(map(mul, row, h1)), s)
            if v < 0:
                v >>= 3
            h2.append(min(max(v, -127), 127))
        m, s = (min(max(_shift(b + sum(map(mul, row, h2)), sh), -2047), 2047)
                for row, b, sh in zip(self.w3[p], self.b3[p], self.s3[p]))
        maxv = (1 << bits) - 1
        mu4 = min(max(4 * loc + (m * u) // 4, 0), 4 * maxv)
        j = min(max(lu + 36 + (6 * s + 8) // 16, 0), 132)
        return mu4, j


# ---------------------------------------------------------------------------------------------------
# sections 12.4, 12.8, 12.9: the plane

def level_sizes(rows: int, cols: int) -> list[tuple[int, int]]:
    sizes = [(rows, cols)]
    while max(sizes[-1]) > 2:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _residual(rans: _Rans, tables: _Tables, c: int, k: int, flip: bool) -> tuple[int, int]:
    """(token, residual r) of one coded position (section 12.8)."""
    t = rans.token(tables.freq[c], tables.cdf[c])
    if t < DIRECT:
        zz = t
    else:
        e = (t - DIRECT) // 2 + 4
        zz = (1 << e) + ((t - DIRECT) % 2) * (1 << (e - 1)) + rans.read(e - 1)
    low = rans.read(k)
    z = zz // 2 if zz % 2 == 0 else -((zz + 1) // 2)
    sv = z * (1 << k) + low
    return t, (-sv if flip else sv)


def decode_plane(payload: bytes, rows: int, cols: int, bits: int, weights) -> list[list[int]]:
    """Decode one version-2 plane payload (section 12.9) to rows x cols Python integers.

    ``weights``: an ``engine.planes.EngineWeights`` (its arrays, prior, increment and limit).
    Raises ``BitstreamError`` wherever the annex says the payload is refused."""
    payload = bytes(payload)
    values, start = read_value_map(payload, rows, cols, bits)
    if values is not None:
        bits = (len(values) - 1).bit_length()
    words = [int.from_bytes(payload[i:i + 2], "little") for i in range(start, len(payload), 2)]
    rans = _Rans(words)
    tables = _Tables(weights.prior, int(weights.increment), int(weights.limit))
    net = _Net(weights.arrays)
    maxv = (1 << bits) - 1
    sizes = level_sizes(rows, cols)
    hb, wb = sizes[-1]
    img = [[rans.read(bits) for _ in range(wb)] for _ in range(hb)]
    for level in range(len(sizes) - 2, -1, -1):
        hl, wl = sizes[level]
        h, w = sizes[level + 1]
        X = [[0] * (2 * w) for _ in range(2 * h)]
        for i in range(h):
            for j in range(w):
                X[2 * i][2 * j] = img[i][j]
        for p, (oy, ox) in enumerate(ORIGINS):
            npos = h * w
            for g in range(npos):
                y, x = 2 * (g // w) + oy, 2 * (g % w) + ox
                mu4, j = net.predict(X, y, x, p, level, bits)
                pred = (mu4 + 2) // 4
                if y >= hl or x >= wl:
                    X[y][x] = pred
                else:
                    c = j // 3
                    t, r = _residual(rans, tables, c, LOW_BITS[c], mu4 % 4 == 1)
                    v = pred + r
                    if v < 0 or v > maxv:
                        _fail("a decoded pixel falls outside the plane's range")
                    X[y][x] = v
                    tables.new[c][t] += 1
                if (g + 1) % CHUNK == 0 or g == npos - 1:
                    tables.update()
        img = [row[:wl] for row in X[:hl]]
    rans.check_end()
    if values is not None:
        if any(v >= len(values) for row in img for v in row):
            _fail("an index beyond the value map")
        img = [[values[v] for v in row] for row in img]
    return img
