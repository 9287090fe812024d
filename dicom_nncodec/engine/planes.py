"""Planes in, payloads out, and back, through the compiled engine; planes code in parallel threads.

Why threads and not batches: the engine codes a whole plane per call without the
GIL, so the frames of a multi-frame object, the planes of a colour frame and the
slices of a series spread over a thread pool; each plane's payload is
independent of every other, so the bytes never depend on the thread count.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import BitstreamError
from . import default_threads, kernels as K

WEIGHT_NAMES = ("w1", "b1", "s1", "w2", "b2", "s2", "w3", "b3", "s3")
_ERRORS = {K.ERR_TRUNCATED: "truncated payload", K.ERR_RANGE: "a decoded pixel falls outside the plane's range",
           K.ERR_TRAILING: "payload does not end where its coder does"}


@dataclass(frozen=True)
class EngineWeights:
    """Everything the engine reads of a version-2 model: integer MLP weights, the prior counts of the
    context tables and the adaptation constants."""
    arrays: dict
    prior: np.ndarray          # (NC, NT) int64, every count >= 1
    increment: int
    limit: int

    def args(self):
        """The weights as the engine takes them: int32 (every partial sum is bounded below 2**24)."""
        a = self.__dict__.get("_args")
        if a is None:
            a = tuple(np.ascontiguousarray(self.arrays[n], dtype=np.int32) for n in WEIGHT_NAMES)
            object.__setattr__(self, "_args", a)
        return a


def parametric_prior(total: int = 2048) -> np.ndarray:
    """Counts of each token under a discretised logistic at each context's middle scale, centred
    (what the network is trained to predict); every count at least 1."""
    prior = np.ones((K.NC, K.NT), dtype=np.int64)
    for c in range(K.NC):
        s = 2.0 ** ((3 * c + 1 - K.SCALE_INDEX_OFFSET) / K.SCALES_PER_OCTAVE)
        k = int(K.LOW_BITS[c])
        span = int(40 * s) + (2 << k)
        r = np.arange(-span, span + 1)
        p = 1 / (1 + np.exp(-(r + 0.5) / s)) - 1 / (1 + np.exp(-(r - 0.5) / s))
        z = r >> k
        zz = np.where(z >= 0, 2 * z, -2 * z - 1)
        tok = np.array([K._token(int(v))[0] for v in zz])
        mass = np.bincount(tok, weights=p, minlength=K.NT)[:K.NT]
        prior[c] += np.floor(mass / mass.sum() * (total - K.NT)).astype(np.int64)
    return prior


_pools: dict[int, ThreadPoolExecutor] = {}
# a forked child (the command line's worker processes) inherits the pools but not their threads
os.register_at_fork(after_in_child=_pools.clear)


def _map(fn, items, threads: int | None):
    n = default_threads() if threads is None else max(1, threads)
    if n == 1 or len(items) <= 1:
        return [fn(i) for i in items]
    pool = _pools.get(n)
    if pool is None:
        pool = _pools.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="nncodec-engine"))
    return list(pool.map(fn, items))


SPARSE_SHARE = 0.3        # a value map is tried when a plane uses less than this share of its value range


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_varints(data: bytes, count: int, pos: int) -> tuple[list[int], int]:
    vals = []
    for _ in range(count):
        v, shift = 0, 0
        while True:
            if pos >= len(data) or shift > 28:
                raise BitstreamError("corrupt payload: truncated or overlong value map")
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        vals.append(v)
    return vals, pos


def _value_map_bytes(values: np.ndarray) -> bytes:
    """The sorted distinct values as varints (count, first value, then each gap minus one), padded with
    zero bytes to a multiple of 4."""
    gaps = np.diff(values) - 1
    m = _varints([len(values), int(values[0])]) + _varints(gaps)
    return m + bytes(-len(m) % 4)


def _code(plane: np.ndarray, bits: int, w: EngineWeights) -> bytes:
    p = np.ascontiguousarray(plane, dtype=np.int64)
    words, err = K.code_plane(p, False, np.zeros(0, np.uint16), int(bits), w.prior, w.increment, w.limit, *w.args())
    if err:
        raise BitstreamError(f"internal error: engine encoder returned {err}")
    return words.astype("<u2").tobytes()


def encode_plane(plane: np.ndarray, bits: int, w: EngineWeights) -> bytes:
    """Payload of one plane: u32 value-map length M, M bytes of value map, then the rANS words.

    Why a value map: planes that use few of their values (sparse histograms: rescaled CT, graphics,
    masks) code far better as indices into the sorted list of the values they use, as JPEG-XL's
    channel palette does.  The encoder tries it when under ``SPARSE_SHARE`` of the range is used
    and keeps whichever payload is smaller."""
    plane = np.asarray(plane, dtype=np.int64)
    plain = b"\0\0\0\0" + _code(plane, bits, w)
    low = int(plane.min(initial=0))
    used = np.bincount((plane - low).ravel()) > 0      # a histogram: planes hold at most 16-bit values
    values = np.flatnonzero(used) + low
    if len(values) > 1 and len(values) < SPARSE_SHARE * (int(values[-1]) - int(values[0]) + 1):
        index = (np.cumsum(used) - 1)[plane - low]
        vmap = _value_map_bytes(values)
        mapped = len(vmap).to_bytes(4, "little") + vmap + _code(index, int(len(values) - 1).bit_length(), w)
        if len(mapped) < len(plain):
            return mapped
    return plain


def decode_plane(payload: bytes, rows: int, cols: int, bits: int, w: EngineWeights) -> np.ndarray:
    if len(payload) % 4 or len(payload) < 4:
        raise BitstreamError("corrupt payload: length is not a positive multiple of 4")
    m = int.from_bytes(payload[:4], "little")
    if m % 4 or 4 + m > len(payload):
        raise BitstreamError("corrupt payload: value map length out of range")
    values = None
    if m:
        (count,), pos = _read_varints(payload, 1, 4)
        if not 2 <= count <= min(rows * cols, 1 << bits):
            raise BitstreamError("corrupt payload: value map count out of range")
        (first,), pos = _read_varints(payload, 1, pos)
        gaps, pos = _read_varints(payload, count - 1, pos)
        if pos > 4 + m or any(payload[pos:4 + m]):
            raise BitstreamError("corrupt payload: value map overruns its length")
        values = first + np.concatenate([[0], np.cumsum(np.asarray(gaps, dtype=np.int64) + 1)])
        if values[-1] >= 1 << bits:
            raise BitstreamError("corrupt payload: value map holds a value above the plane's bits")
        bits = int(count - 1).bit_length()
    words = np.frombuffer(payload, dtype="<u2", offset=4 + m).astype(np.uint16)
    out = np.zeros((rows, cols), dtype=np.int64)
    _, err = K.code_plane(out, True, words, int(bits), w.prior, w.increment, w.limit, *w.args())
    if err:
        raise BitstreamError(f"corrupt payload: {_ERRORS.get(err, err)}")
    if values is not None:
        if int(out.max(initial=0)) >= len(values):
            raise BitstreamError("corrupt payload: an index beyond the value map")
        out = values[out]
    return out


def encode_planes(planes: Sequence[np.ndarray], bits: Sequence[int], w: EngineWeights,
                  threads: int | None = None) -> list[bytes]:
    return _map(lambda i: encode_plane(planes[i], bits[i], w), range(len(planes)), threads)


def decode_planes(payloads: Sequence[bytes], rows: int, cols: int, bits: Sequence[int], w: EngineWeights,
                  threads: int | None = None) -> list[np.ndarray]:
    return _map(lambda i: decode_plane(payloads[i], rows, cols, bits[i], w), range(len(payloads)), threads)


def mlp_macs_per_pixel() -> int:
    """Multiply-adds of the network per coded pixel (the largest phase)."""
    f = max(K.feature_count(p) for p in range(3))
    return f * K.HIDDEN + K.HIDDEN * K.HIDDEN + 2 * K.HIDDEN

