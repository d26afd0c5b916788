"""Fusion-quality metrics, reproducing the evaluator used in the multimodal image fusion literature.

The definitions (including their quirks) follow ``shared/metrics/README.md``; every function takes
float arrays of shape (H, W) on the 0-255 scale: ``f`` is the fused image, ``a`` the functional/CT
source (PET/SPECT/CT) and ``b`` the MRI source. Only numpy is used (no scipy / scikit-image /
scikit-learn), so all filtering is implemented here with vectorised sliding windows.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "METRIC_NAMES",
    "to_luma",
    "entropy",
    "standard_deviation",
    "spatial_frequency",
    "average_gradient",
    "mutual_information",
    "scd",
    "correlation_coefficient",
    "qabf",
    "ssim",
    "vif",
    "psnr",
    "evaluate_fusion",
]

METRIC_NAMES: tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "SCD", "CC", "Qabf", "SSIM", "VIF", "PSNR")

# ITU-R BT.601 luma weights (R, G, B).
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def to_luma(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C>=3) uint8/float -> (H, W) float64.

    Colour images become BT.601 luma rounded to integers (as the reference recipe does);
    grayscale images pass through unchanged (as float64). An alpha channel is ignored.
    """
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # float64 is exact enough: with integer RGB, Y = n / 1000 is never within 1e-3 of a tie.
        return np.round(arr[..., :3].astype(np.float64) @ _BT601)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return arr[..., 0].astype(np.float64)
    raise ValueError(f"expected (H,W) or (H,W,3) image, got shape {arr.shape}")


def _as2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (H,W) array, got shape {x.shape}")
    return x


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (NaN when one is constant, like the reference)."""
    xc = x - x.mean()
    yc = y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(xc * yc) / np.sqrt(np.sum(xc * xc) * np.sum(yc * yc)))


def _filter1d_valid(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """'valid' correlation of x with 1-D taps along one axis: (H,W) -> shorter along `axis`."""
    if x.shape[axis] < taps.size:
        # image smaller than the window (coarse VIF scales of tiny images): empty result, adds 0
        shape = list(x.shape)
        shape[axis] = 0
        return np.zeros(shape, dtype=np.float64)
    win = sliding_window_view(x, taps.size, axis=axis)  # window dimension is appended last
    return win @ taps


def _filter2d_valid(x: np.ndarray, win2d: np.ndarray, sep: np.ndarray | None) -> np.ndarray:
    """'valid' 2-D correlation (H,W) -> (H-k+1, W-k+1); separable when `sep` (1-D taps) is given."""
    if sep is not None:
        return _filter1d_valid(_filter1d_valid(x, sep, 0), sep, 1)
    # general (non-separable) fallback
    if x.shape[0] < win2d.shape[0] or x.shape[1] < win2d.shape[1]:
        out_h = max(x.shape[0] - win2d.shape[0] + 1, 0)
        out_w = max(x.shape[1] - win2d.shape[1] + 1, 0)
        return np.zeros((out_h, out_w))
    return np.einsum("ijkl,kl->ij", sliding_window_view(x, win2d.shape), win2d)


def _box_mean_valid(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows, 'valid' region: (H,W) -> (H-k+1, W-k+1), via 1-D cumulative sums."""
    c = np.cumsum(np.pad(x, ((1, 0), (0, 0))), axis=0)
    x = c[k:] - c[:-k]
    c = np.cumsum(np.pad(x, ((0, 0), (1, 0))), axis=1)
    return (c[:, k:] - c[:, :-k]) / (k * k)


# ----------------------------------------------------------------------------------------------
# no-reference metrics (fused image only)
# ----------------------------------------------------------------------------------------------
def entropy(f: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the 256-bin histogram of uint8(round(f)); f: (H, W)."""
    # clip only guards against out-of-range input (the reference would wrap around).
    v = np.clip(np.round(_as2d(f)), 0, 255).astype(np.uint8).ravel()
    h = np.bincount(v, minlength=256) / v.size
    h = h[h > 0]
    return float(-np.sum(h * np.log2(h)))


def standard_deviation(f: np.ndarray) -> float:
    """SD: population standard deviation of f (H, W)."""
    return float(np.std(_as2d(f)))


def spatial_frequency(f: np.ndarray) -> float:
    """SF: sqrt(mean squared horizontal + mean squared vertical neighbour differences); f: (H, W)."""
    f = _as2d(f)
    rf = np.mean((f[:, 1:] - f[:, :-1]) ** 2)
    cf = np.mean((f[1:, :] - f[:-1, :]) ** 2)
    return float(np.sqrt(rf + cf))


def average_gradient(f: np.ndarray) -> float:
    """AG: mean of sqrt((Gx^2 + Gy^2) / 2) with np.gradient (central inside, one-sided at borders)."""
    gy, gx = np.gradient(_as2d(f))
    return float(np.mean(np.sqrt((gx * gx + gy * gy) / 2.0)))


# ----------------------------------------------------------------------------------------------
# metrics against the sources
# ----------------------------------------------------------------------------------------------
def _value_codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer code per pixel (equal values <-> equal codes) and the number of codes, flattened."""
    v = x.ravel()
    lo, hi = v.min(), v.max()
    # fast path for integer-valued images (the usual 0-255 case): the value itself is the code;
    # empty histogram bins do not change MI, so no np.unique sort is needed.
    if hi - lo < 1024 and np.array_equal(v, np.round(v)):
        return (v - lo).astype(np.intp), int(hi - lo) + 1
    vals, codes = np.unique(v, return_inverse=True)
    return codes.ravel(), vals.size


def _mi_pair(x: np.ndarray, y: np.ndarray) -> float:
    """Mutual information (nats) from the joint histogram of exact values (sklearn mutual_info_score)."""
    xi, nxv = _value_codes(x)
    yi, nyv = _value_codes(y)
    pair = xi.astype(np.int64) * nyv + yi
    if nxv * nyv <= 1 << 22:  # dense joint histogram is small enough
        joint = np.bincount(pair)
        nz = np.nonzero(joint)[0]
        pij = joint[nz].astype(np.float64)
    else:  # many distinct values: sparse joint histogram
        nz, counts = np.unique(pair, return_counts=True)
        pij = counts.astype(np.float64)
    n = float(x.size)
    px = np.bincount(xi).astype(np.float64)
    py = np.bincount(yi).astype(np.float64)
    outer = px[nz // nyv] * py[nz % nyv]
    # sum p_ij log(p_ij / (p_i p_j)) with counts: p_ij / (p_i p_j) = n_ij n / (n_i n_j)
    mi = np.sum(pij / n * (np.log(pij) + math.log(n) - np.log(outer)))
    # sklearn clips tiny negative round-off to 0
    return float(max(mi, 0.0))


def mutual_information(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """MI: MI(F, A) + MI(F, B) in nats; all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    return _mi_pair(f, a) + _mi_pair(f, b)


def scd(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SCD: corr(A, F - B) + corr(B, F - A); all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    return _corr(a, f - b) + _corr(b, f - a)


def correlation_coefficient(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """CC: (corr(A, F) + corr(B, F)) / 2; all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    return (_corr(a, f) + _corr(b, f)) / 2.0


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength g and orientation alpha (H, W) from Sobel by true convolution, zero padding."""
    p = np.pad(img, 1)
    # convolve2d flips the kernel: Sx = conv(img, [[-1,0,1],[-2,0,2],[-1,0,1]]) = left col - right col.
    horiz = p[:, :-2] - p[:, 2:]  # (H+2, W)
    sx = horiz[:-2] + 2.0 * horiz[1:-1] + horiz[2:]
    # Sy = conv(img, [[1,2,1],[0,0,0],[-1,-2,-1]]) = smoothed row below - smoothed row above.
    smooth = p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]  # (H+2, W)
    sy = smooth[2:] - smooth[:-2]
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    alpha = np.where(zero, np.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    return g, alpha


def _qabf_single(g_x: np.ndarray, a_x: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    """Per-pixel edge preservation Q_XF (H, W)."""
    tg, kg, dg = 0.9994, -15.0, 0.5
    ta, ka, da = 0.9879, -22.0, 0.8
    with np.errstate(divide="ignore", invalid="ignore"):
        # quirk of the reference kept: G = g_F where g_X == g_F (not 1).
        G = np.where(g_x > g_f, g_f / g_x, np.where(g_x < g_f, g_x / g_f, g_f))
    A = 1.0 - np.abs(a_x - a_f) / (np.pi / 2)
    with np.errstate(over="ignore"):  # exp overflow -> inf -> Q = 0, as in the reference
        return tg / (1.0 + np.exp(kg * (G - dg))) * (ta / (1.0 + np.exp(ka * (A - da))))


def qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Qabf (Xydeas-Petrovic): sum(Q_AF g_A + Q_BF g_B) / sum(g_A + g_B); all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    g_a, al_a = _sobel(a)
    g_b, al_b = _sobel(b)
    g_f, al_f = _sobel(f)
    q_af = _qabf_single(g_a, al_a, g_f, al_f)
    q_bf = _qabf_single(g_b, al_b, g_f, al_f)
    return float(np.sum(q_af * g_a + q_bf * g_b) / np.sum(g_a + g_b))


def _ssim_pair(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """scikit-image default SSIM (7x7 uniform, sample covariance, 3-px border cropped) of (H, W) pair."""
    k = 7
    # The cropped border is exactly what a 'valid' 7x7 filter cannot reach, so no padding mode matters.
    ux, uy = _box_mean_valid(x, k), _box_mean_valid(y, k)
    uxx, uyy, uxy = _box_mean_valid(x * x, k), _box_mean_valid(y * y, k), _box_mean_valid(x * y, k)
    cov_norm = k * k / (k * k - 1.0)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def ssim(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SSIM: SSIM(F, A) + SSIM(F, B) (scikit-image defaults, data range 255); all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    return _ssim_pair(f, a) + _ssim_pair(f, b)


def _vif_window(scale: int) -> tuple[np.ndarray, np.ndarray | None]:
    """MATLAB-style Gaussian window for a VIF scale: (N, N) 2-D taps and 1-D separable taps (or None)."""
    n = 2 ** (5 - scale) + 1
    sd = n / 5.0
    r = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    h = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sd * sd))
    cut = h < np.finfo(np.float64).eps * h.max()
    h[cut] = 0.0
    win = h / h.sum()
    # Without cut taps the window is an exact outer product: filter separably (much faster).
    sep = None
    if not cut.any():
        g = np.exp(-(r**2) / (2.0 * sd * sd))
        sep = g / g.sum()
    return win, sep


def _vif_pair(ref: np.ndarray, dist: np.ndarray) -> float:
    """Pixel-domain multi-scale VIF(ref, dist) of (H, W) images (Sheikh and Bovik)."""
    sigma_nsq, eps = 2.0, 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        win, sep = _vif_window(scale)
        if scale > 1:
            ref = _filter2d_valid(ref, win, sep)[::2, ::2]
            dist = _filter2d_valid(dist, win, sep)[::2, ::2]
        mu1 = _filter2d_valid(ref, win, sep)
        mu2 = _filter2d_valid(dist, win, sep)
        s1 = _filter2d_valid(ref * ref, win, sep) - mu1 * mu1
        s2 = _filter2d_valid(dist * dist, win, sep) - mu2 * mu2
        s12 = _filter2d_valid(ref * dist, win, sep) - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        # the order of these corrections matters (reproduces the reference exactly)
        m = s1 < eps
        g[m] = 0.0
        sv[m] = s2[m]
        s1[m] = 0.0
        m = s2 < eps
        g[m] = 0.0
        sv[m] = 0.0
        m = g < 0
        sv[m] = s2[m]
        g[m] = 0.0
        sv[sv <= eps] = eps
        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq))))
        den += float(np.sum(np.log10(1.0 + s1 / sigma_nsq)))
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.float64(num) / np.float64(den)
    return 1.0 if np.isnan(v) else float(v)


def vif(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """VIF: VIF(A, F) + VIF(B, F), multi-scale pixel-domain; all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    return _vif_pair(a, f) + _vif_pair(b, f)


def psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """PSNR: 10 log10(max(F)^2 / ((MSE(A, F) + MSE(B, F)) / 2)); all (H, W)."""
    f, a, b = _as2d(f), _as2d(a), _as2d(b)
    mse = (np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2.0
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(np.max(f) ** 2 / mse))


def evaluate_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All METRIC_NAMES for fused F against sources A (PET/SPECT/CT) and B (MRI).

    Inputs are (H, W) grayscale or (H, W, 3) RGB on the 0-255 scale; RGB is scored on rounded
    BT.601 luma (see `to_luma`). Returns {name: value} in METRIC_NAMES order.
    """
    f, a, b = to_luma(fused), to_luma(a), to_luma(b)
    if not (f.shape == a.shape == b.shape):
        raise ValueError(f"shape mismatch: F {f.shape}, A {a.shape}, B {b.shape}")
    return {
        "EN": entropy(f),
        "SD": standard_deviation(f),
        "SF": spatial_frequency(f),
        "AG": average_gradient(f),
        "MI": mutual_information(f, a, b),
        "SCD": scd(f, a, b),
        "CC": correlation_coefficient(f, a, b),
        "Qabf": qabf(f, a, b),
        "SSIM": ssim(f, a, b),
        "VIF": vif(f, a, b),
        "PSNR": psnr(f, a, b),
    }
