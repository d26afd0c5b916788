"""Classical (non-learned) fusion baselines with a common interface.

Every baseline takes ``a`` (functional/CT luma) and ``b`` (MRI) as float arrays of shape (H, W) or
(N, H, W) with values in [0, 1] and returns a float32 array of the same shape in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["fuse_average", "fuse_max", "fuse_laplacian", "BASELINES"]

# 5-tap binomial kernel (Burt and Adelson), an approximate Gaussian that sums to 1.
_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected (H,W) or (N,H,W) arrays, got shape {a.shape}")
    return a, b


def fuse_average(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel-wise mean of a and b: (H,W)/(N,H,W) -> same shape, float32."""
    a, b = _check(a, b)
    return ((a.astype(np.float32) + b.astype(np.float32)) * np.float32(0.5)).astype(np.float32)


def fuse_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel-wise maximum of a and b: (H,W)/(N,H,W) -> same shape, float32."""
    a, b = _check(a, b)
    return np.maximum(a, b).astype(np.float32)


def _blur_axis(x: np.ndarray, axis: int, gain: float = 1.0) -> np.ndarray:
    """Same-size 5-tap binomial filtering along `axis` with mirror ('reflect') borders."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2, 2)
    # 'reflect' needs at least 3 samples to mirror 2; tiny axes fall back to edge replication.
    xp = np.pad(x, pad, mode="reflect" if n >= 3 else "edge")
    k = _BINOMIAL5 * gain
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(5):  # 5 shifted views, vectorised over all pixels
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(i, i + n)
        out += k[i] * xp[tuple(idx)]
    return out


def _reduce(x: np.ndarray) -> np.ndarray:
    """Blur then keep every second pixel: (..., H, W) -> (..., ceil(H/2), ceil(W/2))."""
    x = _blur_axis(_blur_axis(x, -2), -1)
    return x[..., ::2, ::2]


def _expand(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-insertion upsampling to (..., *shape) then blur with gain 2 per axis (keeps the mean)."""
    up = np.zeros(x.shape[:-2] + tuple(shape), dtype=x.dtype)
    # ceil(H/2) samples land on the even positions, so odd sizes work without extra cropping.
    up[..., ::2, ::2] = x
    return _blur_axis(_blur_axis(up, -2, 2.0), -1, 2.0)


def _laplacian_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """[L_0 (finest detail), ..., L_{levels-1}, G_levels (base)] for (..., H, W) input."""
    pyr = []
    g = x
    for _ in range(levels):
        low = _reduce(g)
        pyr.append(g - _expand(low, g.shape[-2:]))
        g = low
    pyr.append(g)
    return pyr


def fuse_laplacian(a: np.ndarray, b: np.ndarray, levels: int = 4) -> np.ndarray:
    """Laplacian-pyramid fusion: max-|.| selection of detail levels, mean of the base level.

    a, b: (H, W) or (N, H, W) in [0, 1]; `levels` = number of detail levels (reductions by 2),
    lowered automatically for tiny images. Returns the same shape, float32, clipped to [0, 1].
    """
    a, b = _check(a, b)
    if levels < 0:
        raise ValueError("levels must be >= 0")
    # Don't reduce below 2 pixels along either axis (a pyramid level must still hold structure).
    h, w = a.shape[-2:]
    n_levels = 0
    while n_levels < levels and min(h, w) >= 4:
        h, w = (h + 1) // 2, (w + 1) // 2
        n_levels += 1
    pa = _laplacian_pyramid(a.astype(np.float64), n_levels)
    pb = _laplacian_pyramid(b.astype(np.float64), n_levels)
    fused = [np.where(np.abs(la) >= np.abs(lb), la, lb) for la, lb in zip(pa[:-1], pb[:-1])]
    out = (pa[-1] + pb[-1]) / 2.0
    # Reconstruct coarse-to-fine with the same expand used to build the pyramids (exact inverse).
    for detail in reversed(fused):
        out = detail + _expand(out, detail.shape[-2:])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "average": fuse_average,
    "max": fuse_max,
    "laplacian": fuse_laplacian,
}
