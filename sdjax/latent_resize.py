"""Resizing latents as torch's ``F.interpolate`` does (``align_corners=False``), for the hires
fix's latent upscalers: ``bilinear`` and ``bicubic`` with or without ``antialias``,
``nearest`` and ``nearest-exact``.

Every mode is separable: each axis is a matrix (output x input) of weights built on the host
with torch's index and weight rules, and the resize is two products with it in JAX (exact
for the nearest modes, whose rows are one-hot). NHWC, like the rest of sdjax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
_CUBIC_A = -0.75  # torch's bicubic; its antialiased bicubic uses PIL's -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def weights(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """The (n_out, n_in) float32 matrix of one axis's resize."""
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(MODES)}")
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if mode in ("nearest", "nearest-exact"):
        # torch: a float32 scale in/out, source floor(dst * scale) (nearest-exact: of the
        # centre, dst + 0.5), clamped to the last row.
        scale = np.float32(n_in) / np.float32(n_out)
        offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
        src = np.floor((rows.astype(np.float32) + offset) * scale).astype(np.int64)
        m[rows, np.minimum(src, n_in - 1)] = 1.0
        return m.astype(np.float32)
    scale = n_in / n_out
    if antialias:
        # torch's _upsample_*_aa (PIL's separable filters): the kernel widened by the scale
        # when shrinking, the taps within its support, normalised to sum 1.
        half = 1.0 if mode == "bilinear" else 2.0
        kernel = _triangle if mode == "bilinear" else (lambda x: _cubic(x, -0.5))
        support = half * scale if scale >= 1.0 else half
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = kernel((taps - center + 0.5) * invscale)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
        return m.astype(np.float32)
    src = scale * (rows + 0.5) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps the linear source index at 0
        i0 = np.floor(src).astype(np.int64)
        lam = src - i0
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(m, (rows, i0), 1.0 - lam)
        np.add.at(m, (rows, i1), lam)
        return m.astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    for k in range(-1, 3):
        np.add.at(m, (rows, np.clip(i0 + k, 0, n_in - 1)), _cubic(t - k, _CUBIC_A))
    return m.astype(np.float32)


def interpolate(x: jax.Array | np.ndarray, size: tuple[int, int], mode: str = "bilinear",
                antialias: bool = False) -> jax.Array:
    """``x`` (N, H, W, C) resized to ``size`` = (height, width) as
    ``torch.nn.functional.interpolate(x_nchw, size, mode=mode, antialias=antialias)``
    (align_corners False) resizes it, in float32."""
    x = jnp.asarray(x, jnp.float32)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize to {h}x{w}: sizes must be positive")
    wh = jnp.asarray(weights(x.shape[1], h, mode, antialias))
    ww = jnp.asarray(weights(x.shape[2], w, mode, antialias))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", wh, x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", ww, x, precision=hp)


__all__ = ["MODES", "weights", "interpolate"]
