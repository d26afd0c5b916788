"""BT.601 RGB <-> YUV conversion used to fuse pseudo-colour PET/SPECT with grayscale MRI.

The network fuses only luma (Y); the functional image's chroma (U, V) is carried over unchanged.
All arrays are channel-last: (..., 3) on the 0-255 scale.
"""
from __future__ import annotations

import numpy as np

# Analogue BT.601 YUV: Y = .299 R + .587 G + .114 B, U = .492 (B - Y), V = .877 (R - Y).
_LUMA = np.array([0.299, 0.587, 0.114])
_LUMA_F32 = _LUMA.astype(np.float32)
_RGB_TO_YUV = np.stack([_LUMA, 0.492 * (np.eye(3)[2] - _LUMA), 0.877 * (np.eye(3)[0] - _LUMA)])
# The exact inverse (not the rounded textbook one) so that RGB -> YUV -> RGB is lossless.
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV)


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB (0-255) -> (..., 3) float32 YUV; Y on the 0-255 scale."""
    return (np.asarray(rgb, dtype=np.float64) @ _RGB_TO_YUV.T).astype(np.float32)


def yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    """(..., 3) YUV -> (..., 3) float32 RGB, not clipped."""
    return (np.asarray(yuv, dtype=np.float64) @ _YUV_TO_RGB.T).astype(np.float32)


def replace_luma(source_rgb: np.ndarray, fused_y: np.ndarray, source_y: np.ndarray | None = None) -> np.ndarray:
    """RGB (..., 3) uint8 with the BT.601 chroma (U, V) of ``source_rgb`` (..., 3) and the luma
    ``fused_y`` (...), all on the 0-255 scale. ``source_y``: the source's luma, if already known.

    In the inverse transform Y enters R, G and B with weight exactly 1, so replacing the luma is
    adding ``fused_y - source_y`` to every channel: no round trip through YUV (4x faster). The
    result is rounded and clipped to [0, 255], as out-of-gamut YUV can map outside it.
    """
    rgb = np.asarray(source_rgb, np.float32)
    if source_y is None:
        source_y = _rgb_luma(rgb)
    out = rgb + (np.asarray(fused_y, np.float32) - source_y)[..., None]
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _rgb_luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 BT.601 luma."""
    return rgb.astype(np.float32, copy=False) @ _LUMA_F32


def luma(image: np.ndarray) -> np.ndarray:
    """Grayscale (...) passes through; RGB (..., 3) -> BT.601 luma. Returns float32 on the input scale."""
    image = np.asarray(image)
    if image.ndim >= 3 and image.shape[-1] == 3:
        return _rgb_luma(image)
    return image.astype(np.float32)
