"""Volume fusion: an MRI and a co-registered PET / SPECT / CT volume in, one fused volume out.

One entry point, :func:`fuse_volumes` (SimpleITK images in and out), and its file wrapper
:func:`fuse_files` (what ``lightfusion fuse`` runs).

Arrays here are numpy views of SimpleITK images, so their axes are the image index axes reversed:
(K, J, I) for a volume, and a plane stack is (N, H, W) with N along the slicing axis.

Pipeline
--------
1. Both volumes are checked (3-D, finite, not constant; the MRI scalar, the other scalar or RGB).
2. ``other`` is resampled onto the MRI grid (SimpleITK, linear) when the grids differ; voxels of
   the MRI grid outside its field of view get its minimum. Volumes that do not overlap in physical
   space are refused. **Co-registration is out of scope**: the two volumes must already be aligned
   in physical (scanner/world) coordinates, e.g. by Slicer's General Registration (BRAINS).
3. Intensities are windowed **per volume, never per slice** (per-slice normalisation makes slices
   flicker): MRI 0.5th percentile of all voxels .. 99.5th percentile of the foreground (Otsu);
   PET/SPECT from max(0, 0.5th percentile), with the 99.5th percentile of the foreground at 0.8 of
   the window (where the training images' brightest brain pixels sit on their map); CT in Hounsfield
   units (air below -500 HU) the brain window L40/W80 = [0, 80] HU, which is what the Harvard CT
   training images look like (brain tissue mid-grey, bone saturated white); a CT without air
   values is treated as non-HU and windowed like the MRI. ``mri_window`` / ``other_window``
   override (lo, hi) in the volume's own units.
4. A scalar PET/SPECT is coloured with a colour map (default: the map of the training images, see
   :mod:`LightFusionLib.colormaps`), converted to BT.601 YUV, and its luma Y is fused with the MRI;
   the fused luma is put back with the original U, V (:func:`LightFusionLib.colour.replace_luma`), so
   colour is carried exactly (up to uint8 rounding and gamut clipping). An RGB PET/SPECT volume
   is used as is. ``colormap="none"`` fuses the windowed PET/SPECT as grayscale.
5. Planes along the anatomical ``axis`` (chosen from the direction cosines, not array order) go to
   the network in batches at ``plane_size`` x ``plane_size`` (256, the paper's resolution: the
   plane is resampled to square pixels keeping its physical aspect ratio, the short side padded
   with 0, Gaussian anti-aliasing when shrinking) and back to the plane's own grid afterwards.
   Measured on the bundled sample (axial: 110 planes of 110x134 px at 1.5 mm, net grid 0.79 mm):
   the resampling itself is nearly lossless, inputs taken to 256 and back change by 0.08 grey
   levels on average (0-255 scale; 99th percentile 0.7, PSNR 64 dB). The fused output differs more
   between 256 and native size (``plane_size=None``): mean |difference| 8.5 grey levels, PSNR 26 dB
   (coronal 9.7 / 25 dB), with a partly trained PET model (epoch 119 of a training run; the
   untrained placeholder's output is constant, so it cannot show this). That is the network's
   scale dependence, not interpolation error: a CNN responds to structures by their size in
   pixels. 256 stays the default because it matches the training images (the head's longer side
   spans 185-255 of their 256 pixels, median 230); native size is 4-8x faster on CPU for small
   planes.
6. Output on the MRI grid exactly (size, spacing, origin, direction copied): RGB
   ``sitkVectorUInt8`` (3 components) for PET/SPECT with a colour map or RGB input, otherwise
   scalar ``sitkUInt8`` (CT-MRI, ``colormap="none"``); 0-255 is the range the network's [0, 1]
   luma maps to, and what viewers show directly.

Planes that are blank in both inputs (all 0 after windowing) are not sent to the network; their
fused value is 0. Memory: the two normalised volumes and the output are held in full (11 bytes
per MRI voxel for coloured PET/SPECT, 9 for CT or grayscale); everything else is per batch of
planes (``batch_size``), and window percentiles use a bounded sample of 2 million voxels.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .backends import BackendOutOfMemory, FusionBackend, load_backend
from .colormaps import DEFAULT_COLORMAP, NONE, apply_colormap, lookup_table
from .colour import luma, replace_luma
from .data import check_task
from .fileio import atomic_output

log = logging.getLogger(__name__)

AXES = ("axial", "coronal", "sagittal")
NET_SIZE = 256  # the paper's (and the training images') plane size
CT_BRAIN_WINDOW = (0.0, 80.0)  # HU, level 40 width 80
FUNCTIONAL_TOP_POSITION = 0.8  # colour-map position of a PET/SPECT volume's 99.5th foreground percentile
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS physical axis normal to the plane
_TWO_FILE_FORMATS = (".mhd", ".hdr", ".nhdr", ".img", ".img.gz")  # atomic rename would split them
_PERCENTILE_SAMPLE = 2_000_000  # voxels used to estimate a window (bounded time and memory)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class VolumeError(ValueError):
    """An input or output that cannot be used; the message says what is wrong in one line."""


class FusionCancelled(Exception):
    """``cancel()`` returned True; nothing was returned or written."""


# ----------------------------------------------------------------------------------------------
# reading and checking
# ----------------------------------------------------------------------------------------------
def _sitk_message(exc: Exception) -> str:
    """Last meaningful line of a SimpleITK exception (they carry file/line noise first)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        if prefix in msg:
            msg = msg.split(prefix, 1)[1].strip()
    return msg


def read_volume(path: str | Path, role: str = "volume") -> sitk.Image:
    """Read any file SimpleITK reads, or a folder holding one DICOM series. Raises VolumeError."""
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{role} {p} does not exist")
    try:
        if p.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
            if not ids:
                raise VolumeError(f"{role} folder {p} holds no DICOM series")
            if len(ids) > 1:
                raise VolumeError(f"{role} folder {p} holds {len(ids)} DICOM series; give a folder with one")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0]))
            return reader.Execute()
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise VolumeError(f"cannot read {role} {p}: {_sitk_message(exc)}") from None


def check_volume(image: sitk.Image, role: str = "volume", allow_rgb: bool = False) -> sitk.Image:
    """Return ``image`` as a 3-D volume (a 4-D one with a single frame is squeezed) or raise VolumeError
    for 2-D / 4-D images, wrong component counts, complex pixels, NaN/Inf voxels, constant volumes."""
    dim, size = image.GetDimension(), image.GetSize()
    shape = "x".join(map(str, size))
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif dim != 3:
        raise VolumeError(f"{role} is {dim}-D ({shape}); a 3-D volume is needed")
    comps = image.GetNumberOfComponentsPerPixel()
    if "complex" in image.GetPixelIDTypeAsString():
        raise VolumeError(f"{role} has complex voxels; a real-valued volume is needed")
    if comps != 1 and not (allow_rgb and comps == 3):
        need = "1 (scalar) or 3 (RGB)" if allow_rgb else "1 (a scalar volume)"
        raise VolumeError(f"{role} has {comps} components per voxel; {need} expected")
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise VolumeError(f"{role} has {bad} NaN/Inf voxel(s); replace them before fusing")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        what = "empty (all voxels 0)" if lo == 0 else f"constant (all voxels {lo})"
        raise VolumeError(f"{role} is {what}: nothing to fuse")
    return image


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True when size, spacing, origin and direction agree (spacing-relative tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return bool(np.allclose(sa, sb, rtol=tol, atol=0)
                and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * sa.min())
                and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol))


def _bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical (LPS mm) box of the image's voxel extent: (lo (3,), hi (3,))."""
    size = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in ijk])
               for ijk in itertools.product(*[(-0.5, s - 0.5) for s in size])]
    return np.min(corners, 0), np.max(corners, 0)


def slicing_axis(image: sitk.Image, axis: str) -> int:
    """SimpleITK index axis (0=i, 1=j, 2=k) that steps between ``axis`` planes.

    Taken from the direction cosines: the index axes are matched to the patient axes (L, P, S) by
    the permutation with the largest total |cosine|, so an oblique or permuted volume still gets a
    consistent choice; the axial planes are stepped by the index axis matched to S.
    """
    if axis not in AXES:
        raise VolumeError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    d = np.abs(np.array(image.GetDirection()).reshape(3, 3))  # d[physical, index]
    best = max(itertools.permutations(range(3)), key=lambda p: sum(d[k, p[k]] for k in range(3)))
    return best[_PLANE_NORMAL[axis]]


def resample_onto(reference: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, float]:
    """``moving`` resampled (linear, float32 / vector float32) onto ``reference``'s grid, and the
    fraction of reference voxels inside ``moving``'s field of view. Outside voxels get its minimum."""
    float_type = sitk.sitkVectorFloat32 if moving.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32
    moving_f = sitk.Cast(moving, float_type)
    if same_grid(reference, moving):
        moving_f.CopyInformation(reference)
        return moving_f, 1.0
    background = float(sitk.GetArrayViewFromImage(moving).min())
    out = sitk.Resample(moving_f, reference, sitk.Transform(), sitk.sitkLinear, background, float_type)
    # Field of view: resample a mask of ones the same way (exact, whatever the two directions).
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    coverage = float(np.count_nonzero(sitk.GetArrayViewFromImage(inside))) / np.prod(reference.GetSize())
    return out, coverage


# ----------------------------------------------------------------------------------------------
# intensity windows
# ----------------------------------------------------------------------------------------------
def _sample(arr: np.ndarray) -> np.ndarray:
    """A strided, deterministic sample of at most _PERCENTILE_SAMPLE voxels (flattened)."""
    flat = arr.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    return np.asarray(flat[::step], dtype=np.float32)


def _otsu(sample: np.ndarray) -> float:
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(256)
    f.Execute(sitk.GetImageFromArray(sample.reshape(1, -1)))
    return f.GetThreshold()


def robust_window(arr: np.ndarray, kind: str = "mri") -> tuple[float, float]:
    """Per-volume (lo, hi) for ``arr`` (any shape, scalar voxels).

    kind 'mri': 0.5th percentile of all voxels .. 99.5th of the foreground (above Otsu);
    'functional' (PET/SPECT): lo = max(0, 0.5th percentile), hi such that the 99.5th foreground
    percentile lands at FUNCTIONAL_TOP_POSITION (0.8) of the window, as on the training images;
    'ct': [0, 80] HU when the volume holds air (< -500), else like 'mri'.
    """
    s = _sample(arr)
    lo = float(np.percentile(s, 0.5))
    if kind == "ct" and lo < -500:
        return CT_BRAIN_WINDOW
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
        raise VolumeError("volume has no intensity range to window (use an explicit window)")
    return lo, hi


def _check_window(window, role: str) -> tuple[float, float] | None:
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise VolumeError(f"{role} window must be two finite numbers lo < hi, got {window!r}")
    return lo, hi


def _apply_window(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """In place: (arr - lo) / (hi - lo) clipped to [0, 1]; returns arr (float32)."""
    lo, hi = window
    arr -= np.float32(lo)
    arr *= np.float32(1.0 / (hi - lo))
    return np.clip(arr, 0.0, 1.0, out=arr)


# ----------------------------------------------------------------------------------------------
# preparation: both volumes on the MRI grid, normalised
# ----------------------------------------------------------------------------------------------
@dataclass
class PreparedPair:
    """Both volumes on the MRI grid, windowed; arrays are (K, J, I) = SimpleITK index reversed.

    ``mri``: float32 [0, 1]. ``other``: float32 [0, 1] (windowed scalar) or uint8 (K, J, I, 3) RGB.
    ``lut``: (256, 3) colour map applied to a scalar ``other`` (None: grayscale). ``coverage``:
    fraction of MRI voxels inside ``other``'s field of view. Windows are in each volume's units.
    """

    reference: sitk.Image
    task: str
    mri: np.ndarray
    other: np.ndarray
    lut: np.ndarray | None
    colormap: str
    mri_window: tuple[float, float]
    other_window: tuple[float, float] | None
    coverage: float

    @property
    def rgb_output(self) -> bool:
        """True when the fused volume is RGB (coloured or RGB functional input)."""
        return self.lut is not None or self.other.ndim == 4

    def other_colour(self, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(N,H,W) windowed scalar or (N,H,W,3) RGB planes of ``other`` -> (RGB (N,H,W,3), luma
        (N,H,W)), float32 on the 0-255 scale, or None for a grayscale path."""
        if planes.ndim == 4:
            rgb = planes.astype(np.float32)
        elif self.lut is not None:
            rgb = apply_colormap(planes, self.lut)
        else:
            return None
        return rgb, luma(rgb)

    def other_display(self) -> np.ndarray:
        """``other`` as the network's source image: (K,J,I,3) uint8 RGB or (K,J,I) uint8."""
        if self.other.ndim == 4:
            return self.other
        if self.lut is not None:
            return np.rint(apply_colormap(self.other, self.lut)).astype(np.uint8)
        return np.rint(self.other * 255).astype(np.uint8)


def prepare_pair(mri: sitk.Image, other: sitk.Image, task: str = "pet-mri", colormap: str | None = None,
                 mri_window: tuple[float, float] | None = None,
                 other_window: tuple[float, float] | None = None) -> PreparedPair:
    """Check both volumes, resample ``other`` onto the MRI grid, window both per volume."""
    task = check_task(task)
    functional = task != "ct-mri"
    mri = check_volume(mri, "MRI")
    other = check_volume(other, task.split("-")[0].upper(), allow_rgb=functional)
    mri_window, other_window = _check_window(mri_window, "MRI"), _check_window(other_window, "other")
    rgb_in = other.GetNumberOfComponentsPerPixel() == 3
    cmap = (colormap or "").strip().lower() or None  # None: the task's default
    grayscale = cmap == NONE  # asked for explicitly
    if not functional and cmap not in (None, NONE):
        raise VolumeError("colour maps apply to PET/SPECT, not to CT-MRI")
    if rgb_in and cmap not in (None, NONE):
        raise VolumeError(f"the {task.split('-')[0].upper()} volume is already RGB; a colour map applies to scalar volumes")
    if rgb_in and other_window is not None:
        raise VolumeError("an RGB volume is used as is; other_window applies to scalar volumes")
    lut = None
    if functional and not rgb_in and cmap != NONE:
        cmap = cmap or DEFAULT_COLORMAP[task]
        try:
            lut = lookup_table(cmap)
        except ValueError as exc:
            raise VolumeError(str(exc)) from None
    cmap = "rgb input" if rgb_in and not grayscale else (cmap or NONE)

    resampled, coverage = resample_onto(mri, other)
    if coverage == 0.0:
        (a0, a1), (b0, b1) = _bounds(mri), _bounds(other)
        box = lambda lo, hi: "[" + ", ".join(f"{x:.0f}..{y:.0f}" for x, y in zip(lo, hi)) + "] mm"  # noqa: E731
        raise VolumeError(f"the MRI {box(a0, a1)} and the other volume {box(b0, b1)} do not overlap in physical "
                          "space; they must be co-registered first (registration is out of scope)")
    if coverage < 0.5:
        log.warning("the other volume covers only %.0f%% of the MRI grid; the rest is fused with 0", 100 * coverage)

    m = sitk.GetArrayFromImage(sitk.Cast(mri, sitk.sitkFloat32))
    mri_window = mri_window or robust_window(m, "mri")
    _apply_window(m, mri_window)
    o = sitk.GetArrayFromImage(resampled)
    del resampled
    if rgb_in:
        if grayscale:  # RGB given but grayscale asked for: fuse its luma
            o = _apply_window(luma(o), (0.0, 255.0))
        else:
            o = np.clip(np.rint(o), 0, 255).astype(np.uint8)
    else:
        other_window = other_window or robust_window(o, "functional" if functional else "ct")
        _apply_window(o, other_window)
    return PreparedPair(mri, task, m, o, lut, cmap, mri_window, other_window if not rgb_in else None, coverage)


# ----------------------------------------------------------------------------------------------
# planes to and from the network's grid
# ----------------------------------------------------------------------------------------------
class PlaneGrid:
    """Resampling of an (N, H, W[, C]) plane stack with in-plane spacing (sh, sw) to ``size`` x
    ``size`` square pixels and back, plane by plane (planes never mix, so results do not depend
    on batching). Aspect ratio kept, short side padded with 0; cubic B-spline interpolation
    (SimpleITK), with Gaussian anti-aliasing before shrinking onto a coarser net grid.
    ``size=None``: identity (native size).

    Why B-spline and no smoothing on the way back: the way back samples the plane's own pixel
    centres, which a cubic B-spline interpolant reproduces almost exactly (sample volume, axial,
    inputs through 256 and back: mean |error| 0.08 grey levels vs 2.0 with linear interpolation).
    """

    def __init__(self, shape_hw: tuple[int, int], spacing_hw: tuple[float, float], size: int | None = NET_SIZE,
                 interpolator: int = sitk.sitkBSpline):
        self.h, self.w = shape_hw
        self.sh, self.sw = spacing_hw
        self.size, self.interpolator = size, interpolator
        if size is not None and (self.h, self.w) == (size, size) and abs(self.sh - self.sw) <= 1e-6 * self.sw:
            self.size = size = None  # the plane already is the net grid: skip two resamplings per plane
        if size is None:
            return
        self.s = max(self.h * self.sh, self.w * self.sw) / size  # square pixel of the net grid
        # Centre the plane in the net grid (pixel-centre coordinates, mm from the plane's pixel (0, 0)).
        self.ox = (self.w - 1) * self.sw / 2 - (size - 1) * self.s / 2
        self.oy = (self.h - 1) * self.sh / 2 - (size - 1) * self.s / 2
        # sigma = (shrink factor - 1) / 2 source pixels (the usual anti-aliasing choice) per axis
        self.variance = [(max(0.0, self.s / sp - 1) / 2 * sp) ** 2 for sp in (self.sw, self.sh)]

    def _resample(self, planes: np.ndarray, src, dst, smooth: bool) -> np.ndarray:
        """src/dst: (size_wh, spacing_xy, origin_xy) of the 2-D grids."""
        vector = planes.ndim == 4
        out = np.empty((len(planes), dst[0][1], dst[0][0]) + planes.shape[3:], np.float32)
        for k, plane in enumerate(planes):
            img = sitk.GetImageFromArray(np.ascontiguousarray(plane, np.float32), isVector=vector)
            img.SetSpacing(src[1])
            img.SetOrigin(src[2])
            if smooth and not vector and max(self.variance) > 0:
                img = sitk.DiscreteGaussian(img, variance=self.variance, maximumKernelWidth=64,
                                            maximumError=0.01, useImageSpacing=True)
            res = sitk.Resample(img, dst[0], sitk.Transform(), self.interpolator, dst[2], dst[1],
                                (1.0, 0.0, 0.0, 1.0), 0.0, img.GetPixelID())
            out[k] = sitk.GetArrayViewFromImage(res)
        return out

    def to_net(self, planes: np.ndarray) -> np.ndarray:
        """(N, H, W[, C]) -> (N, size, size[, C]) float32."""
        if self.size is None:
            return np.ascontiguousarray(planes, np.float32)
        return self._resample(planes, ((self.w, self.h), (self.sw, self.sh), (0.0, 0.0)),
                              ((self.size, self.size), (self.s, self.s), (self.ox, self.oy)), smooth=True)

    def from_net(self, planes: np.ndarray) -> np.ndarray:
        """(N, size, size[, C]) -> (N, H, W[, C]) float32."""
        if self.size is None:
            return np.ascontiguousarray(planes, np.float32)
        return self._resample(planes, ((self.size, self.size), (self.s, self.s), (self.ox, self.oy)),
                              ((self.w, self.h), (self.sw, self.sh), (0.0, 0.0)), smooth=False)


# ----------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------
def _resolve_backend(backend, model, task: str, device: str, half: bool = False) -> FusionBackend:
    if isinstance(backend, str):
        return load_backend(model, task, backend, device, half=half)
    if not callable(backend):
        raise TypeError(f"backend must be 'auto', 'torch', 'onnx' or a backend object, got {backend!r}")
    made_for = getattr(backend, "task", None)
    if made_for is not None and made_for != task:
        raise VolumeError(f"the given backend runs a {made_for} model, not {task}")
    return backend


class _Batcher:
    """Runs the backend over a plane stack in sub-batches, halving them on device out-of-memory."""

    def __init__(self, backend: FusionBackend, batch: int) -> None:
        self.backend, self.batch = backend, batch

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        out = np.empty(mri.shape, np.float32)
        i = 0
        while i < len(mri):
            b = self.batch
            try:
                out[i:i + b] = self.backend(mri[i:i + b], other[i:i + b])
            except BackendOutOfMemory as exc:
                if b == 1:
                    raise VolumeError(f"the device ran out of memory even for one plane ({exc}); "
                                      "try --device cpu") from None
                self.batch = max(1, b // 2)
                log.warning("device out of memory with batch %d; retrying with %d", b, self.batch)
                continue
            i += b
        return out


def fuse_prepared(pair: PreparedPair, backend: FusionBackend, axis: str = "axial", batch_size: int | None = None,
                  progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                  plane_size: int | None = NET_SIZE) -> sitk.Image:
    """Fuse a :class:`PreparedPair` plane by plane; see :func:`fuse_volumes`."""
    ref = pair.reference
    index_axis = slicing_axis(ref, axis)
    np_axis = 2 - index_axis  # numpy axes are the index axes reversed
    mri_planes = np.moveaxis(pair.mri, np_axis, 0)  # (N, H, W) views
    other_planes = np.moveaxis(pair.other, np_axis, 0)
    n, h, w = mri_planes.shape
    spacing = np.array(ref.GetSpacing())[::-1]  # per numpy axis
    grid = PlaneGrid((h, w), tuple(np.delete(spacing, np_axis)), plane_size)

    rgb = pair.rgb_output
    out = np.zeros(pair.mri.shape + ((3,) if rgb else ()), np.uint8)
    out_planes = np.moveaxis(out, np_axis, 0)
    _check_options(axis, plane_size, batch_size)
    chunk = int(batch_size or getattr(backend, "preferred_batch", 4))
    run = _Batcher(backend, chunk)

    def start_batch(start: int, worker: ThreadPoolExecutor) -> tuple:
        """Prepare planes start..start+chunk and hand them to the network thread."""
        stop = min(n, start + chunk)
        m = np.ascontiguousarray(mri_planes[start:stop])
        src = np.ascontiguousarray(other_planes[start:stop])
        colour = pair.other_colour(src)
        y = colour[1] / np.float32(255) if colour is not None else src
        # Planes blank in both inputs (outside the head) are not worth a network call.
        busy = (m.reshape(len(m), -1).max(1) > 0) | (y.reshape(len(y), -1).max(1) > 0)
        job = None
        if busy.any():
            # B-spline overshoot is clipped: the network was trained on [0, 1] inputs.
            job = worker.submit(run, np.clip(grid.to_net(m[busy]), 0, 1), np.clip(grid.to_net(y[busy]), 0, 1))
        return start, stop, colour, busy, job

    def finish_batch(start: int, stop: int, colour, busy: np.ndarray, job: Future | None) -> None:
        """Wait for the network's planes, take them back to the plane grid and store them."""
        fused = np.zeros((stop - start, h, w), np.float32)
        if job is not None:
            fused[busy] = np.clip(grid.from_net(job.result()), 0.0, 1.0)
        if rgb:
            out_planes[start:stop] = replace_luma(colour[0], fused * 255, colour[1])
        else:
            out_planes[start:stop] = np.rint(fused * 255).astype(np.uint8)
        if progress is not None:
            progress(stop, n)

    # The network runs on its own thread, one batch behind, while this thread prepares the next
    # batch and finishes the previous one (numpy, SimpleITK and the backends release the GIL):
    # on a GPU the host-side work then hides behind the device's.
    with ThreadPoolExecutor(1, thread_name_prefix="lightfusion-net") as worker:
        in_flight = None
        for start in range(0, n, chunk):
            if cancel is not None and cancel():
                done = in_flight[0] if in_flight else start
                raise FusionCancelled(f"fusion cancelled after {done} of {n} {axis} planes")
            batch = start_batch(start, worker)
            if in_flight is not None:
                finish_batch(*in_flight)
            in_flight = batch
        if in_flight is not None:
            finish_batch(*in_flight)
    image = sitk.GetImageFromArray(out, isVector=rgb)
    image.CopyInformation(ref)
    return image


def _check_options(axis: str, plane_size: int | None, batch_size: int | None) -> None:
    if axis not in AXES:
        raise VolumeError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    if plane_size is not None and plane_size < 16:
        raise VolumeError(f"plane size must be at least 16 pixels, got {plane_size}")
    if batch_size is not None and batch_size < 1:
        raise VolumeError(f"batch size must be at least 1, got {batch_size}")


def fuse_volumes(mri: sitk.Image, other: sitk.Image, task: str = "pet-mri", model: str | Path | None = None,
                 axis: str = "axial", backend: str | FusionBackend = "auto", device: str = "auto",
                 colormap: str | None = None, batch_size: int | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, mri_window: tuple[float, float] | None = None,
                 other_window: tuple[float, float] | None = None, plane_size: int | None = NET_SIZE,
                 half: bool = False) -> sitk.Image:
    """Fuse a 3-D MRI with a co-registered PET / SPECT / CT volume; the result lies on the MRI grid.

    Args:
        mri: scalar 3-D image (K, J, I voxels); its grid (size, spacing, origin, direction) is the output's.
        other: scalar or RGB (3-component) 3-D image, any grid overlapping the MRI in physical space;
            resampled (linear) onto the MRI grid when the grids differ. It must already be registered.
        task: 'pet-mri', 'spect-mri' or 'ct-mri' (picks the shipped model, windows, colour handling).
        model: a model file (.pt or .onnx) instead of the task's shipped model.
        axis: 'axial', 'coronal' or 'sagittal', chosen from the direction cosines.
        backend: 'auto' | 'torch' | 'onnx', or a ready backend object (``backend(mri, other)`` on
            (N,H,W) float32 [0,1] arrays -> (N,H,W) fused luma), which then ignores model/device.
        device: 'auto' (CUDA when available) | 'cpu' | 'cuda'.
        colormap: PET/SPECT colour map (default: the training images' map for the task; see
            :mod:`LightFusionLib.colormaps`), or 'none' for a grayscale fused volume.
        batch_size: planes per network call (default: the backend's preferred batch); halved and
            retried on device out-of-memory.
        progress: ``progress(done, total)`` after each batch of planes.
        cancel: polled before each batch; returning True raises :class:`FusionCancelled`.
        mri_window, other_window: (lo, hi) intensity windows in the volumes' units (default: robust
            per-volume windows, see the module docstring).
        plane_size: planes are run at plane_size x plane_size (aspect kept, padded); None = native size.
        half: fp16 inference (torch on CUDA only; within 1 grey level of fp32).

    Returns:
        SimpleITK image on the MRI grid: ``sitkVectorUInt8`` RGB for PET/SPECT (coloured or RGB
        input), ``sitkUInt8`` for CT-MRI or ``colormap='none'``.

    Raises:
        VolumeError: unusable input (2-D/4-D, NaN/Inf, constant, no overlap, bad option).
        ModelError: a model file that does not load or was trained for another task.
        FusionCancelled: ``cancel()`` returned True.
    """
    task = check_task(task)
    _check_options(axis, plane_size, batch_size)
    pair = prepare_pair(mri, other, task, colormap, mri_window, other_window)
    fuser = _resolve_backend(backend, model, task, device, half)
    return fuse_prepared(pair, fuser, axis, batch_size, progress, cancel, plane_size)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
@dataclass
class FileFusion:
    """What :func:`fuse_files` did: output path, planes fused, seconds of fusion, backend used."""

    output: Path
    planes: int
    seconds: float
    backend: str
    coverage: float

    @property
    def planes_per_second(self) -> float:
        return self.planes / self.seconds if self.seconds > 0 else float("inf")


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_path(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input, lies in an input DICOM folder, is a folder, or whose
    folder is missing or read-only; cheap, so it runs before any input is read."""
    for p in inputs:
        if _same_path(out, p):
            raise VolumeError(f"output {out} is an input; choose another output path")
        if p.is_dir() and _same_path(out.parent, p):
            raise VolumeError(f"output {out} would be written into the input DICOM folder {p}")
    if out.is_dir():
        raise VolumeError(f"output {out} is a folder; give a file name such as fused.nrrd")
    folder = out.parent
    if not folder.is_dir():
        raise VolumeError(f"output folder {folder} does not exist")
    probe = folder / f".lightfusion-probe-{uuid.uuid4().hex[:8]}"  # os.access says yes to root on /sys
    try:
        probe.open("xb").close()
    except OSError as exc:
        raise VolumeError(f"output folder {folder} is not writable ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if any(out.name.lower().endswith(ext) for ext in _TWO_FILE_FORMATS):
        raise VolumeError(f"{out.name}: header + data file formats are not supported; use .nrrd, .nii.gz or .mha")


def check_output_format(out: Path, rgb: bool) -> None:
    """Refuse an output whose format (from its extension) cannot hold a 3-D (RGB) volume with its
    geometry: a tiny probe image is written beside it, read back and deleted."""
    folder = out.parent
    probe = sitk.GetImageFromArray(np.zeros((2, 3, 4, 3) if rgb else (2, 3, 4), np.uint8), isVector=rgb)
    probe.SetSpacing((0.5, 0.75, 1.25))
    probe.SetOrigin((1.0, 2.0, 3.0))
    probe.SetDirection([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    tmp = folder / f".lightfusion-probe-{uuid.uuid4().hex[:8]}-{out.name}"  # keeps the extension
    try:
        sitk.WriteImage(probe, str(tmp))
        back = sitk.ReadImage(str(tmp))
    except RuntimeError as exc:
        raise VolumeError(f"cannot write {out.name}: {_sitk_message(exc)}") from None
    except OSError as exc:
        raise VolumeError(f"cannot write to {folder}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if (back.GetSize() != probe.GetSize() or back.GetNumberOfComponentsPerPixel() != probe.GetNumberOfComponentsPerPixel()
            or not same_grid(back, probe, 1e-3)):
        kind = "an RGB 3-D volume" if rgb else "a 3-D volume"
        raise VolumeError(f"the format of {out.name} cannot hold {kind} with its geometry; use .nrrd, .nii.gz or .mha")


def fuse_files(mri: str | Path, other: str | Path, output: str | Path, task: str = "pet-mri",
               model: str | Path | None = None, axis: str = "axial", backend: str | FusionBackend = "auto",
               device: str = "auto", colormap: str | None = None, batch_size: int | None = None,
               progress: bool | ProgressFn = False, cancel: CancelFn | None = None,
               mri_window: tuple[float, float] | None = None, other_window: tuple[float, float] | None = None,
               plane_size: int | None = NET_SIZE, half: bool = False) -> FileFusion:
    """Read two volumes (any SimpleITK format or a DICOM series folder), fuse, write ``output``
    atomically in the format of its extension. ``progress=True`` shows a tqdm bar on stderr.

    Refuses the same file given twice and an output onto an input; on any error nothing is written
    and the inputs are untouched. Raises VolumeError / ModelError / FusionCancelled.
    """
    mri_p, other_p, out_p = Path(mri), Path(other), Path(output)
    task = check_task(task)
    _check_options(axis, plane_size, batch_size)
    if mri_p.exists() and other_p.exists() and _same_path(mri_p, other_p):
        raise VolumeError(f"the MRI and the other volume are the same file ({mri_p}); give two different volumes")
    check_output_path(out_p, [mri_p, other_p])
    mri_img = read_volume(mri_p, "MRI")
    other_img = read_volume(other_p, task.split("-")[0].upper())
    pair = prepare_pair(mri_img, other_img, task, colormap, mri_window, other_window)
    check_output_format(out_p, pair.rgb_output)
    fuser = _resolve_backend(backend, model, task, device, half)
    n = pair.reference.GetSize()[slicing_axis(pair.reference, axis)]

    with progress_bar(n, f"fusing ({fuser.describe()})", progress) as callback:
        t0 = time.perf_counter()
        fused = fuse_prepared(pair, fuser, axis, batch_size, callback, cancel, plane_size)
        seconds = time.perf_counter() - t0
    write_volume(fused, out_p)
    return FileFusion(out_p, n, seconds, fuser.describe(), pair.coverage)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: bool | ProgressFn | None):
    """Yield the ``progress(done, total)`` callback to use: a tqdm bar when ``progress`` is True,
    the given callable as is, or None."""
    if progress is not True:
        yield progress if callable(progress) else None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="plane", desc=desc, leave=False) as bar:
        yield lambda done, _total: bar.update(done - bar.n)


def write_volume(image: sitk.Image, path: str | Path) -> Path:
    """Write atomically (compressed where the format allows); raises VolumeError."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            # zlib level 1: 40% faster than the default level for 25% larger files (256^3 RGB: 0.37 s vs 0.64 s)
            sitk.WriteImage(image, str(tmp), useCompression=True, compressionLevel=1)
    except RuntimeError as exc:
        raise VolumeError(f"cannot write {path}: {_sitk_message(exc)}") from None
    return path
