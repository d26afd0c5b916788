"""Intensity windows: how a volume's values map to the network's [0, 1] inputs.

A window is decided **per volume, from the volume's own voxels**, never per slice (per-slice
normalisation makes slices flicker) and never from the part of it that overlaps the other volume:
cropping or skull-stripping the MRI must not change how the CT or PET looks.

- MRI: 0.5th percentile of all voxels .. 99.5th percentile of the foreground (above Otsu).
- PET/SPECT ('functional'): from max(0, 0.5th percentile), with the 99.5th percentile of the
  foreground at 0.8 of the window, where the training images' brightest brain pixels sit on their
  colour map.
- CT: in Hounsfield units, the brain window L40/W80 = [0, 80] HU, which is what the Harvard CT
  training images look like (brain tissue mid-grey, bone saturated white). A CT is taken to be in
  HU when its DICOM Modality says CT, or when it holds air (its 0.5th percentile below -500);
  otherwise it is windowed like an MRI, with a warning.

The percentiles use a strided sample of at most 2 million voxels (bounded time and memory).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import VolumeError

CT_BRAIN_WINDOW = (0.0, 80.0)  # HU, level 40 width 80
HU_AIR_BELOW = -500.0  # a CT in HU has air (-1000 HU) in its field of view; no other scan goes this low
FUNCTIONAL_TOP_POSITION = 0.8  # colour-map position of a PET/SPECT volume's 99.5th foreground percentile
WINDOW_KINDS = ("mri", "functional", "ct")
_PERCENTILE_SAMPLE = 2_000_000  # voxels used to estimate a window


def voxel_sample(arr: np.ndarray) -> np.ndarray:
    """A strided, deterministic sample of at most 2 million voxels of ``arr`` (flattened, float32)."""
    flat = arr.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    return np.asarray(flat[::step], dtype=np.float32)


def _otsu(sample: np.ndarray) -> float:
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(256)
    f.Execute(sitk.GetImageFromArray(sample.reshape(1, -1)))
    return f.GetThreshold()


def looks_like_hu(sample: np.ndarray) -> bool:
    """True when a CT's voxels hold air in Hounsfield units (0.5th percentile below -500 HU)."""
    return float(np.percentile(sample, 0.5)) < HU_AIR_BELOW


def robust_window(arr: np.ndarray, kind: str = "mri", hounsfield: bool | None = None) -> tuple[float, float]:
    """Per-volume (lo, hi) for ``arr`` (any shape, scalar voxels, the volume's own voxels).

    kind 'mri': 0.5th percentile of all voxels .. 99.5th of the foreground (above Otsu);
    'functional' (PET/SPECT): lo = max(0, 0.5th percentile), hi such that the 99.5th foreground
    percentile lands at FUNCTIONAL_TOP_POSITION (0.8) of the window, as on the training images;
    'ct': [0, 80] HU when ``hounsfield`` (None: decided by :func:`looks_like_hu`), else like 'mri'.
    """
    if kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {kind!r}")
    s = voxel_sample(arr)
    if kind == "ct" and (hounsfield if hounsfield is not None else looks_like_hu(s)):
        return CT_BRAIN_WINDOW
    lo = float(np.percentile(s, 0.5))
    if kind == "functional":
        lo = max(0.0, lo)
    fg = s[s > _otsu(s)]
    hi = float(np.percentile(fg, 99.5)) if fg.size else float(s.max())
    if kind == "functional":
        # Put the brightest 0.5% of the foreground where it sits on the training images' colour
        # map (measured on harvard/train: 0.73-0.84 for PET, 0.81-0.87 for SPECT), not at the
        # very top: at 1.0 all grey matter turns magenta, unlike anything the network has seen.
        hi = lo + (hi - lo) / FUNCTIONAL_TOP_POSITION
    if hi <= lo:  # e.g. a sparse volume whose foreground is a handful of voxels
        hi = float(s.max())
    if hi <= lo:
        raise VolumeError("volume has no intensity range to window (give an explicit window)")
    return lo, hi


def check_window(window, role: str) -> tuple[float, float] | None:
    """A user's (lo, hi) as two floats, or None; raises VolumeError unless finite with lo < hi."""
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise VolumeError(f"{role} window must be two numbers lo, hi; got {window!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise VolumeError(f"{role} window must be two finite numbers lo < hi, got {window!r}")
    return lo, hi


def apply_window(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """In place: (arr - lo) / (hi - lo) clipped to [0, 1]; returns arr (float32)."""
    lo, hi = window
    arr -= np.float32(lo)
    arr *= np.float32(1.0 / (hi - lo))
    return np.clip(arr, 0.0, 1.0, out=arr)
