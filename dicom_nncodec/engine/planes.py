"""Planes in, payloads out, and back, through the compiled engine; planes code in parallel threads.

Why threads and not batches: the engine codes a whole plane per call without the
GIL, so the frames of a multi-frame object, the planes of a colour frame and the
slices of a series spread over a thread pool; each plane's payload is
independent of every other, so the bytes never depend on the thread count.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import BitstreamError
from . import kernels as K

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
        return tuple(self.arrays[n] for n in WEIGHT_NAMES)


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
        tok = np.array([_token_py(int(v)) for v in zz])
        mass = np.bincount(tok, weights=p, minlength=K.NT)[:K.NT]
        prior[c] += np.floor(mass / mass.sum() * (total - K.NT)).astype(np.int64)
    return prior


def _token_py(zz: int) -> int:
    if zz < K.DIRECT:
        return zz
    e = zz.bit_length() - 1
    return K.DIRECT + 2 * (e - 4) + ((zz >> (e - 1)) & 1)


def default_threads() -> int:
    env = os.environ.get("DICOM_NNCODEC_THREADS")
    return max(1, int(env)) if env else max(1, os.cpu_count() or 1)


_pools: dict[int, ThreadPoolExecutor] = {}


def _map(fn, items, threads: int | None):
    n = default_threads() if threads is None else max(1, threads)
    if n == 1 or len(items) <= 1:
        return [fn(i) for i in items]
    pool = _pools.get(n)
    if pool is None:
        pool = _pools.setdefault(n, ThreadPoolExecutor(n, thread_name_prefix="nncodec-engine"))
    return list(pool.map(fn, items))


def encode_plane(plane: np.ndarray, bits: int, w: EngineWeights) -> bytes:
    p = np.ascontiguousarray(plane, dtype=np.int64)
    words, err = K.code_plane(p, False, np.zeros(0, np.uint16), int(bits), w.prior, w.increment, w.limit, *w.args())
    if err:
        raise BitstreamError(f"internal error: engine encoder returned {err}")
    return words.astype("<u2").tobytes()


def decode_plane(payload: bytes, rows: int, cols: int, bits: int, w: EngineWeights) -> np.ndarray:
    if len(payload) % 4:
        raise BitstreamError("corrupt payload: length is not a multiple of 4")
    words = np.frombuffer(payload, dtype="<u2").astype(np.uint16)
    out = np.zeros((rows, cols), dtype=np.int64)
    _, err = K.code_plane(out, True, words, int(bits), w.prior, w.increment, w.limit, *w.args())
    if err:
        raise BitstreamError(f"corrupt payload: {_ERRORS.get(err, err)}")
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


_ = math  # math kept for readers of parametric_prior's float64 arithmetic
