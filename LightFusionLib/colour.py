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
    adding ``fused_y`` to the source's luma-free part ``rgb - source_y`` (:func:`luma_offsets`): no
    round trip through YUV (4x faster). The result is rounded and clipped to [0, 255], as
    out-of-gamut YUV can map outside it.
    """
    rgb = np.asarray(source_rgb, np.float32)
    if source_y is None:
        source_y = _rgb_luma(rgb)
    return add_luma(luma_offsets(rgb, source_y), fused_y)


def luma_offsets(rgb: np.ndarray, rgb_luma: np.ndarray | None = None) -> np.ndarray:
    """(..., 3) RGB -> (..., 3) float32 ``rgb - luma``: the colour without its luma (its chroma in RGB)."""
    rgb = np.asarray(rgb, np.float32)
    return rgb - (_rgb_luma(rgb) if rgb_luma is None else np.asarray(rgb_luma, np.float32))[..., None]


def add_luma(offsets: np.ndarray, fused_y: np.ndarray) -> np.ndarray:
    """(..., 3) :func:`luma_offsets` + (...) luma -> (..., 3) uint8 RGB, rounded and clipped.
    A float32 ``offsets`` is used as the work array (overwritten): callers pass a fresh one."""
    out = np.asarray(offsets, np.float32)
    out += np.asarray(fused_y, np.float32)[..., None]
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


# ----------------------------------------------------------------------------------------------
# colour restoration: the fused luma back into colour
# ----------------------------------------------------------------------------------------------
COLOUR_MODES = ("yuv", "saturated")
DEFAULT_COLOUR_MODE = "yuv"
# 'saturated': the most the chroma is scaled up (a dark, faintly tinted pixel under bright MRI
# would otherwise take on the most saturated colour its luma allows)
MAX_CHROMA_GAIN = 4.0


def check_colour_mode(mode: str | None) -> str:
    """'yuv' | 'saturated' (None: :data:`DEFAULT_COLOUR_MODE`); raises ValueError otherwise."""
    mode = DEFAULT_COLOUR_MODE if mode is None else str(mode).strip().lower()
    if mode not in COLOUR_MODES:
        raise ValueError(f"unknown colour mode {mode!r}; choose one of {', '.join(COLOUR_MODES)}")
    return mode


def restore_colour(source_rgb: np.ndarray, fused_y: np.ndarray, source_y: np.ndarray | None = None,
                   mode: str | None = None, max_gain: float = MAX_CHROMA_GAIN) -> np.ndarray:
    """Colour the fused luma with the source's colours: RGB (..., 3) uint8.

    ``source_rgb`` (..., 3) and ``fused_y`` (...) on the 0-255 scale; ``source_y``: the source's
    BT.601 luma if already known. ``mode``:

    - ``'yuv'`` (the paper's): the source's chroma (U, V) unchanged under the new luma
      (:func:`replace_luma`). Where the fused luma rises (bright MRI), the colour keeps its
      chroma but gains lightness: it turns pastel. R, G, B are clipped to [0, 255], which changes
      the luma of saturated colours.
    - ``'saturated'``: where the fused luma rises, the chroma is scaled with it, ``C' = C * Y'/Y``
      (at most ``max_gain`` times), so the chroma-to-luma ratio, i.e. the saturation, of the source
      is kept (at gain g the colour is the source RGB scaled by g); where the fused luma falls, the
      chroma is kept, as in 'yuv' (a darker colour with the same chroma: no less saturated).
      Colours that would leave the RGB gamut are desaturated towards grey at constant luma just
      enough to fit, so the luma of the result is ``fused_y`` exactly, up to uint8 rounding (no
      clipping error, unlike 'yuv').
    """
    mode = check_colour_mode(mode)
    if mode == "yuv":
        return replace_luma(source_rgb, fused_y, source_y)
    rgb = np.asarray(source_rgb, np.float32)
    if source_y is None:
        source_y = _rgb_luma(rgb)
    source_y = np.asarray(source_y, np.float32)
    y = np.clip(np.asarray(fused_y, np.float32), 0, 255)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(source_y > 0.5, y / np.maximum(source_y, 0.5), np.float32(max_gain))
    gain = np.clip(gain, np.float32(1), np.float32(max_gain))  # never less chroma than the source's
    chroma = (rgb - source_y[..., None]) * gain[..., None]  # luma-free: its BT.601 luma is 0
    # the largest t <= 1 with y + t * chroma inside [0, 255] in every channel
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(chroma > 0, (255 - y)[..., None] / chroma,
                        np.where(chroma < 0, -y[..., None] / chroma, np.inf))
    t = np.minimum(1.0, room.min(axis=-1))
    out = y[..., None] + chroma * t[..., None]
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)
