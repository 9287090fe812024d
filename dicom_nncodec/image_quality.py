"""How far a decoded frame is from its original: PSNR, SSIM and maximum absolute error.

Why here, once: the lossy and near-lossless benchmarks compare codecs by
these numbers, so every codec must be measured by the same code, with its
conventions written down:

* PSNR = 10 log10(peak**2 / MSE) in dB over all samples, computed in float64;
  ``inf`` when the frames are identical.  The benchmarks use two peaks: the
  nominal one, 2**BitsStored - 1 (as Sushmit et al. and most DICOM papers),
  and the frame's own range max - min (which does not reward a 16-bit CT
  slice for using a tenth of its 16 bits).
* SSIM: Wang et al. 2004 (IEEE TIP 13(4)) with their constants: an 11x11
  Gaussian window with sigma 1.5 (taps exp(-d**2 / (2 sigma**2)) for
  |d| <= 5, normalised), K1 = 0.01, K2 = 0.03, C1 = (K1 L)**2,
  C2 = (K2 L)**2, L = the data range passed in, population (not sample)
  covariances, and the mean of the SSIM map over the positions where the
  window lies inside the image.  That is exactly scikit-image's
  ``structural_similarity(a, b, data_range=L, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)``; it is implemented here so
  that the benchmark needs no scikit-image (and numbers do not depend on
  whether it is installed).  Note: scikit-image's *default* is a 7x7
  uniform window with sample covariances, which gives slightly different
  values.
"""
from __future__ import annotations

import math

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5            # 11 taps: int(3.5 * sigma + 0.5), as Wang et al. and scikit-image
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")


def max_abs_error(reference, decoded) -> int:
    """Largest |decoded - reference| over all samples (integers compared exactly)."""
    a, b = np.asarray(reference).astype(np.int64), np.asarray(decoded).astype(np.int64)
    _check(a, b)
    return int(np.abs(a - b).max(initial=0))


def mse(reference, decoded) -> float:
    a, b = _as_float(reference), _as_float(decoded)
    _check(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(reference, decoded, peak: float) -> float:
    """10 log10(peak**2 / MSE) in dB; ``inf`` for identical frames."""
    if peak <= 0:
        raise ValueError("peak must be positive")
    m = mse(reference, decoded)
    return math.inf if m == 0 else 10.0 * math.log10(peak * peak / m)


def nominal_peak(bits_stored: int) -> int:
    """2**BitsStored - 1: the largest value a sample of this depth can take."""
    return (1 << int(bits_stored)) - 1


def range_peak(reference) -> int:
    """The frame's own range max - min (at least 1, so that a flat frame still has a peak)."""
    a = np.asarray(reference)
    return max(1, int(a.max()) - int(a.min()))


def _gaussian_taps() -> np.ndarray:
    d = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (d / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _window_means(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local means at every position where the whole window lies inside ``x``."""
    n = len(taps)
    rows = sum(taps[k] * x[k:x.shape[0] - n + 1 + k, :] for k in range(n))
    return sum(taps[k] * rows[:, k:x.shape[1] - n + 1 + k] for k in range(n))


def ssim(reference, decoded, data_range: float) -> float:
    """Mean SSIM of two single-channel frames (definition and constants in the module docstring)."""
    a, b = _as_float(reference), _as_float(decoded)
    _check(a, b)
    if a.ndim != 2:
        raise ValueError("SSIM is computed on single-channel (rows, columns) frames")
    n = 2 * SSIM_RADIUS + 1
    if min(a.shape) < n:
        raise ValueError(f"SSIM needs frames of at least {n}x{n} (the window)")
    if data_range <= 0:
        raise ValueError("data_range must be positive")
    taps = _gaussian_taps()
    ux, uy = _window_means(a, taps), _window_means(b, taps)
    vx = _window_means(a * a, taps) - ux * ux
    vy = _window_means(b * b, taps) - uy * uy
    vxy = _window_means(a * b, taps) - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean(dtype=np.float64))


SSIM_DEFINITION = (f"SSIM: Wang et al. 2004, 11x11 Gaussian window sigma {SSIM_SIGMA}, K1 {SSIM_K1}, K2 {SSIM_K2}, "
                   "population covariances, mean over the valid positions (= scikit-image structural_similarity "
                   "with gaussian_weights=True, sigma=1.5, use_sample_covariance=False)")
