"""Plane geometry: volume grids, the canonical anatomical orientation, the slicing axis, and the
round trip of a plane stack to the network's 256x256 grid.

Arrays are numpy views of SimpleITK images, so their axes are the image index axes reversed:
(K, J, I) for a volume, and a plane stack is (N, H, W) with N along the slicing axis.

Canonical orientation
---------------------
The network is a 2-D CNN: what it returns depends on how a plane is laid out (which way is up,
which side is left). Planes are therefore always cut from the volumes re-stored in one anatomical
orientation, :data:`CANONICAL` = 'LPI' (index i towards the patient's left, j posterior, k
inferior; an exact permutation/flip of the voxels, chosen from the direction cosines). Its planes
are laid out as radiologists read them and as the Harvard training images are: axial with anterior
up and the patient's right on the image left; coronal and sagittal with superior up. The same
anatomy stored RAS-, LPS- or any other way thus gives the same fused voxels; the result is stored
back in the MRI's own orientation afterwards.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading

import numpy as np
import SimpleITK as sitk

from .errors import VolumeError

AXES = ("axial", "coronal", "sagittal")
NET_SIZE = 256  # the paper's (and the training images') plane size
CANONICAL = "LPI"
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS physical axis normal to the plane
_BSPLINE_MIN_PIXELS = 4  # a cubic B-spline needs 4 samples per axis; fewer read outside the image (NaN)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise VolumeError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    return axis


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True when size, spacing, origin and direction agree (spacing-relative tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return bool(np.allclose(sa, sb, rtol=tol, atol=0)
                and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * sa.min())
                and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol))


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical (LPS mm) box of the image's voxel extent: (lo (3,), hi (3,))."""
    size = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in ijk])
               for ijk in itertools.product(*[(-0.5, s - 0.5) for s in size])]
    return np.min(corners, 0), np.max(corners, 0)


def describe_bounds(image: sitk.Image) -> str:
    lo, hi = physical_bounds(image)
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi)) + "] mm"


def orientation_of(image: sitk.Image) -> str:
    """Closest anatomical orientation code of the index axes, e.g. 'RAS', 'LPS'."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """``image`` re-stored in the :data:`CANONICAL` orientation (voxels permuted/flipped exactly, no
    interpolation; an oblique volume keeps its obliqueness). The same image when already canonical."""
    if orientation_of(image) == CANONICAL:
        return image
    return sitk.DICOMOrient(image, CANONICAL)


def slicing_axis(image: sitk.Image, axis: str) -> int:
    """SimpleITK index axis (0=i, 1=j, 2=k) that steps between ``axis`` planes.

    Taken from the direction cosines: the index axes are matched to the patient axes (L, P, S) by
    the permutation with the largest total |cosine|, so an oblique or permuted volume still gets a
    consistent choice; the axial planes are stepped by the index axis matched to S.
    """
    check_axis(axis)
    d = np.abs(np.array(image.GetDirection()).reshape(3, 3))  # d[physical, index]
    best = max(itertools.permutations(range(3)), key=lambda p: sum(d[k, p[k]] for k in range(3)))
    return best[_PLANE_NORMAL[axis]]


def resample_onto(reference: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None,
                  mark_outside: bool = False) -> tuple[sitk.Image, float]:
    """``moving`` resampled (linear, float32 / vector float32) onto ``reference``'s grid, and the
    fraction of reference voxels inside ``moving``'s field of view. Outside voxels get its minimum.
    ``transform`` maps reference points to ``moving`` points (ITK's convention); None = identity.

    ``mark_outside``: outside voxels are NaN instead (for a caller that fills them later), the
    coverage is counted from them, and a ``moving`` already on the grid comes back as it is (its
    own pixel type, no copy): one full-grid pass instead of three, and no second full-size image.
    """
    float_type = sitk.sitkVectorFloat32 if moving.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32
    if transform is None and same_grid(reference, moving):
        if mark_outside:
            return moving, 1.0
        moving_f = sitk.Cast(moving, float_type)
        moving_f.CopyInformation(reference)
        return moving_f, 1.0
    if mark_outside and transform is None:
        aligned = _resample_axis_aligned(reference, moving)
        if aligned is not None:
            return aligned
    transform = transform or sitk.Transform()
    moving_f = sitk.Cast(moving, float_type) if moving.GetPixelID() != float_type else moving
    if mark_outside:
        out = sitk.Resample(moving_f, reference, transform, sitk.sitkLinear, math.nan, float_type)
        voxels = sitk.GetArrayViewFromImage(out)
        step = max(1, (1 << 24) // max(1, voxels[0].size))  # about 16 M values at a time: no full-size mask
        outside = sum(int(np.count_nonzero(np.isnan(voxels[k:k + step]))) for k in range(0, len(voxels), step))
        components = moving.GetNumberOfComponentsPerPixel()
        return out, 1.0 - outside / components / float(np.prod(reference.GetSize()))
    background = float(sitk.GetArrayViewFromImage(moving).min())
    out = sitk.Resample(moving_f, reference, transform, sitk.sitkLinear, background, float_type)
    # Field of view: resample a mask of ones the same way (exact, whatever the two directions).
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    coverage = float(np.count_nonzero(sitk.GetArrayViewFromImage(inside))) / np.prod(reference.GetSize())
    return out, coverage


_SAME_DIRECTION = 1e-7  # direction cosines this close count as the same (DICOM stores them to 6+ decimals)


def _resample_axis_aligned(reference: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, float] | None:
    """What ``resample_onto(reference, moving, mark_outside=True)`` returns, for a scalar ``moving``
    whose direction cosines are ``reference``'s (no transform): the usual PET/SPECT and MRI from one
    scanner or one template space. Its index axes then map one to one onto the reference's, each
    by a scale and a shift, so SimpleITK's linear resampling is one banded matrix per axis (its
    weights, its edge rule and its field of view, [-0.5, n - 0.5) in continuous index), applied
    with BLAS on up to 8 threads and written straight into the result image: a 2 mm PET onto a
    512x512x400 MRI grid in 0.6-0.9 s on 2 cores, against 0.9-1.2 s for SimpleITK. None where this
    does not apply."""
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    if (moving.GetNumberOfComponentsPerPixel() != 1 or reference.GetDimension() != 3 or moving.GetDimension() != 3
            or np.abs(np.array(moving.GetDirection()).reshape(3, 3) - direction).max() > _SAME_DIRECTION):
        return None
    # continuous index in moving = inverse(D * S_moving) (O_reference - O_moving) + (S_reference / S_moving) * index
    spacing_r, spacing_m = np.array(reference.GetSpacing()), np.array(moving.GetSpacing())
    start = np.linalg.inv(direction * spacing_m) @ (np.array(reference.GetOrigin()) - np.array(moving.GetOrigin()))
    axes, inside = [], []
    for a in range(3):  # SimpleITK index axes i, j, k
        n_m, n_r = moving.GetSize()[a], reference.GetSize()[a]
        positions = start[a] + np.arange(n_r) * (spacing_r[a] / spacing_m[a])
        within = (positions >= -0.5) & (positions < n_m - 0.5)
        if not within.any():
            return None  # no overlap: SimpleITK's path reports it
        axes.append(_BandedAxis(_resampling_matrix(n_m, positions, "linear")))
        inside.append(within)
    from .volumeio import new_image_and_voxels  # volumeio imports this module

    image, out = new_image_and_voxels(reference, sitk.sitkFloat32)
    moving_voxels = np.asarray(sitk.GetArrayViewFromImage(moving), np.float32)
    along_i, along_j, along_k = axes
    km, jm, im = moving_voxels.shape
    with _one_blas_thread():
        # k first, on the small volume; then j and i per run of output planes, on up to 8 threads
        planes = along_k.along_rows(moving_voxels.reshape(1, km, jm * im)).reshape(-1, jm, im)
        threads = max(1, min(8, os.cpu_count() or 1, len(planes)))
        bounds = np.linspace(0, len(planes), threads + 1).astype(int)

        def run(a: int, b: int) -> None:
            along_i.along_last(along_j.along_rows(planes[a:b]), out=out[a:b])

        if threads == 1:
            run(0, len(planes))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="lightfusion-resample") as pool:
                list(pool.map(run, bounds[:-1], bounds[1:]))
    # Positions grow along each axis, so the field of view is one run of indices: NaN before and
    # after it, by slices (a boolean mask on a middle axis took 0.6 s here).
    for numpy_axis, within in zip((2, 1, 0), inside):
        first, stop = int(np.argmax(within)), len(within) - int(np.argmax(within[::-1]))
        for part in (slice(0, first), slice(stop, None)):
            out[(slice(None),) * numpy_axis + (part,)] = np.nan
    coverage = float(np.prod([w.mean() for w in inside]))
    return image, coverage


def canonical_view(voxels: np.ndarray, image: sitk.Image) -> np.ndarray:
    """A view of ``voxels`` (stored like ``image``: numpy axes (k, j, i[, component])) with its
    axes permuted and flipped the way :func:`to_canonical` re-stores ``image``: writing into the
    view writes the original storage order, so a result made in the canonical orientation needs no
    re-orientation copy."""
    original = np.array(image.GetDirection()).reshape(3, 3)
    canonical = np.array(to_canonical(_geometry_only(image)).GetDirection()).reshape(3, 3)
    view = voxels
    order, flips = [], []
    for axis in range(3):  # canonical index axis -> the original index axis along the same line
        cosines = original.T @ canonical[:, axis]
        source = int(np.argmax(np.abs(cosines)))
        order.append(source)
        flips.append(cosines[source] < 0)
    # numpy axes are index axes reversed: canonical numpy axis 2-a comes from original numpy axis 2-order[a]
    view = np.transpose(view, [2 - order[2 - n] for n in range(3)] + list(range(3, voxels.ndim)))
    for n in range(3):
        if flips[2 - n]:
            view = np.flip(view, axis=n)
    return view


def _geometry_only(image: sitk.Image) -> sitk.Image:
    """A 1-voxel-per-axis stand-in with ``image``'s direction (DICOMOrient on it is free)."""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    return probe


# ----------------------------------------------------------------------------------------------
# planes to the network's grid and back
# ----------------------------------------------------------------------------------------------
_SPLINE_POLE = math.sqrt(3.0) - 2.0  # the cubic B-spline prefilter's pole
# Output samples per dense block of a banded resampling matrix. Small blocks keep each product
# within OpenBLAS's small-matrix kernels: a 512x512 plane to 256x256 took 0.55 ms with 16, 2.1 ms
# with 32 and 11 ms with 64 (numpy's OpenBLAS, AVX-512 Xeon, one thread); back, 0.65 ms with 16 or 32.
_BLOCK = 16
_DROPPED = 1e-7  # weight (relative to a row's sum of |weights|) a band may leave out on each side
_MATRIX_KINDS = {sitk.sitkLinear: "linear", sitk.sitkBSpline: "bspline"}  # others run through SimpleITK


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Integer sample indices folded into 0..n-1 by whole-sample mirroring (period 2n-2), the
    boundary ITK's B-spline uses, for any n (ITK's own folding reads outside planes under 4 samples)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _spline_prefilter(n: int) -> np.ndarray:
    """(n, n) matrix taking n samples to their cubic B-spline coefficients (mirror boundaries):
    the causal / anti-causal recursion of Unser (1999), as ITK's BSplineDecompositionImageFilter."""
    if n == 1:
        return np.ones((1, 1))
    z = _SPLINE_POLE
    samples = np.eye(n)
    c = np.empty((n, n))
    horizon = int(math.ceil(math.log(1e-17) / math.log(abs(z))))  # z**horizon is below double precision
    if horizon < n:  # ITK's shortcut: the terms beyond the horizon vanish
        c[0] = z ** np.arange(horizon) @ samples[:horizon]
    else:  # exact initial value for the mirror extension
        k = np.arange(2 * n - 2)
        c[0] = (z ** k) @ samples[_mirror(k, n)] / (1 - z ** (2 * n - 2))
    for i in range(1, n):
        c[i] = samples[i] + z * c[i - 1]
    c[n - 1] = (z / (z * z - 1)) * (c[n - 1] + z * c[n - 2])
    for i in range(n - 2, -1, -1):
        c[i] = z * (c[i + 1] - c[i])
    return c * 6.0  # the filter's gain (1 - z)(1 - 1/z)


def _cubic_bspline(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, 2 / 3 - x * x + x ** 3 / 2, np.where(x < 2, (2 - x) ** 3 / 6, 0.0))


def _bessel_i(k: int, t: float) -> float:
    """Modified Bessel function of the first kind I_k(t) (power series)."""
    term = (t / 2) ** k / math.factorial(k)
    total, m = 0.0, 0
    while term > 1e-18 * total or m == 0:
        total += term
        m += 1
        term *= (t / 2) ** 2 / (m * (m + k))
    return total


def _discrete_gaussian(n: int, variance: float, maximum_error: float = 0.01, maximum_width: int = 64) -> np.ndarray:
    """(n, n) matrix of ITK's DiscreteGaussianImageFilter along one axis (``variance`` in samples^2):
    Lindeberg's discrete Gaussian exp(-t) I_k(t), cut where it holds 1 - maximum_error of its sum,
    normalised, zero-flux Neumann boundary (edge samples repeated)."""
    if variance <= 0:
        return np.eye(n)
    scale = math.exp(-variance)
    coeff = [scale * _bessel_i(0, variance), scale * _bessel_i(1, variance)]
    total = coeff[0] + 2 * coeff[1]
    while total < 1 - maximum_error and len(coeff) <= maximum_width:
        coeff.append(scale * _bessel_i(len(coeff), variance))
        total += 2 * coeff[-1]
        if coeff[-1] < total * np.finfo(float).eps:
            break
    kernel = np.array(coeff) / total
    out = np.zeros((n, n))
    rows = np.arange(n)
    for offset in range(1 - len(kernel), len(kernel)):
        np.add.at(out, (rows, np.clip(rows + offset, 0, n - 1)), kernel[abs(offset)])
    return out


def _resampling_matrix(n: int, positions: np.ndarray, kind: str, smoothing: float = 0.0) -> np.ndarray:
    """(len(positions), n) weights giving the values at continuous sample indices ``positions`` of
    a signal of n samples, as SimpleITK's Resample computes them with the interpolator ``kind``,
    after a DiscreteGaussian of ``smoothing`` samples^2 when > 0. Positions outside the samples'
    extent [-0.5, n - 0.5) give 0 (the default pixel value), except where that would be all of them
    (a signal shorter than one step between positions: a plane thinner than a net pixel, which
    SimpleITK lost entirely): then the position(s) nearest its centre take its edge-repeated value."""
    m = len(positions)
    rows = np.arange(m)
    outside = (positions < -0.5) | (positions >= n - 0.5)
    if m and outside.all():
        gap = np.abs(positions - (n - 1) / 2)
        outside = gap > gap.min() * (1 + 1e-9) + 1e-12
    positions = np.clip(positions, -0.5, n - 0.5)  # rows outside are zeroed below
    weights = np.zeros((m, n))
    if kind == "linear":  # ITK's linear interpolator repeats the edge samples
        base = np.floor(positions).astype(int)
        frac = positions - base
        np.add.at(weights, (rows, np.clip(base, 0, n - 1)), 1 - frac)
        np.add.at(weights, (rows, np.clip(base + 1, 0, n - 1)), frac)
    else:  # cubic B-spline: the basis at the 4 nearest coefficients, coefficients from the samples
        base = np.floor(positions).astype(int) - 1
        for k in range(4):
            np.add.at(weights, (rows, _mirror(base + k, n)), _cubic_bspline(positions - (base + k)))
        weights = weights @ _spline_prefilter(n)
    if smoothing > 0:
        weights = weights @ _discrete_gaussian(n, smoothing)
    weights[outside] = 0.0
    return weights


class _BandedAxis:
    """A 1-D resampling matrix, applied along one axis of a plane stack with BLAS.

    The matrix is banded (each output sample depends on a few input samples; the B-spline's
    prefilter tails are cut where they hold less than ``_DROPPED`` of a row's weight); it is kept
    as dense blocks of ``_BLOCK`` output samples, each over the input span its rows need, and each
    block is one matrix product per plane."""

    def __init__(self, weights: np.ndarray) -> None:
        self.m, self.n = weights.shape
        magnitude = np.abs(weights)
        total = magnitude.sum(1, keepdims=True)
        keep = (np.cumsum(magnitude, 1) > _DROPPED * total) & (np.cumsum(magnitude[:, ::-1], 1)[:, ::-1] > _DROPPED * total)
        self.blocks = []
        for lo in range(0, self.m, _BLOCK):
            hi = min(self.m, lo + _BLOCK)
            used = np.flatnonzero(keep[lo:hi].any(0))
            if len(used) == 0:  # outside the plane: zeros
                self.blocks.append((lo, hi, 0, 0, None))
                continue
            a, b = int(used[0]), int(used[-1]) + 1
            self.blocks.append((lo, hi, a, b, np.ascontiguousarray(weights[lo:hi, a:b], np.float32)))

    def along_last(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(N, R, n) -> (N, R, m) (into ``out`` when given)."""
        out = np.empty(x.shape[:-1] + (self.m,), np.float32) if out is None else out
        for lo, hi, a, b, w in self.blocks:
            if w is None:
                out[..., lo:hi] = 0.0
            else:
                np.matmul(x[..., a:b], w.T, out=out[..., lo:hi])
        return out

    def along_rows(self, x: np.ndarray) -> np.ndarray:
        """(N, n, C) -> (N, m, C)."""
        out = np.empty(x.shape[:-2] + (self.m, x.shape[-1]), np.float32)
        for lo, hi, a, b, w in self.blocks:
            if w is None:
                out[..., lo:hi, :] = 0.0
            else:
                np.matmul(w, x[..., a:b, :], out=out[..., lo:hi, :])
        return out


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list[int] = []
_numpy_blas = None


@contextlib.contextmanager
def _one_blas_thread():
    """Limit numpy's own BLAS to one thread inside (threadpoolctl; nothing without it).

    The plane resampling is many small matrix products on the fusion's host thread while the
    network keeps the other cores busy; a multi-threaded BLAS spin-waits against it (measured
    here: up to 5x slower). Only the BLAS numpy loaded is limited, not torch's libraries."""
    global _numpy_blas, _blas_users, _blas_saved
    if _numpy_blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _numpy_blas = [c for c in ThreadpoolController().select(user_api="blas").lib_controllers
                           if "numpy" in str(c.filepath)]  # numpy's bundled OpenBLAS (numpy.libs, .dylibs)
        except Exception:  # not installed, or a platform threadpoolctl does not know
            _numpy_blas = []
    if not _numpy_blas:
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = [c.num_threads for c in _numpy_blas]
            for c in _numpy_blas:
                c.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for c, n in zip(_numpy_blas, _blas_saved):
                    c.set_num_threads(n)


class PlaneGrid:
    """Resampling of an (N, H, W[, C]) plane stack with in-plane spacing (sh, sw) to ``size`` x
    ``size`` square pixels and back, plane by plane (planes never mix, so results do not depend
    on batching). Aspect ratio kept, plane centred, short side padded with 0; cubic B-spline
    interpolation, with Gaussian anti-aliasing before shrinking onto a coarser net grid.
    ``size=None``: identity (native size).

    Geometry, net pixel (u, v) <-> plane position: the net grid's square pixel is ``s`` mm, its
    pixel (0, 0) centre lies at (``ox``, ``oy``) mm from the centre of the plane's pixel (0, 0),
    so the plane's centre is the net grid's centre; every position maps pixel centre to pixel
    centre (no half-pixel shift). Net pixels whose centre lies outside the plane's pixel area
    are 0, except for a plane thinner than one net pixel (e.g. 1 x 512 pixels of 1 x 1.3 mm): the
    net row or column nearest its centre takes it (SimpleITK's resampling lost such planes).

    How: the resampling is what SimpleITK's ``DiscreteGaussian`` + ``Resample`` compute (they ran
    plane by plane before), written as one matrix per axis (the transform is a scale and a shift
    along each axis, so it is separable) and applied with BLAS as banded products on the whole
    stack. A 512x512 plane on the 2-core test machines: 0.55-1.0 ms to 256x256 and 0.65-1.7 ms back,
    against 31 and 44 ms with SimpleITK. The values are SimpleITK's to 1e-6 (float32 rounding);
    Testing/test_planes.py checks it.

    Why B-spline and no smoothing on the way back: the way back samples the plane's own pixel
    centres, which a cubic B-spline interpolant reproduces almost exactly (sample volume, axial,
    inputs through 256 and back: mean |error| 0.08 grey levels vs 2.0 with linear interpolation;
    real 512x512 MRI planes through 256 and back: mean 1.06 grey levels, 99th percentile 12.6,
    the detail a 256 grid cannot hold). A plane fewer than 4 pixels wide or high is interpolated
    linearly, as before (SimpleITK's cubic B-spline read outside such a plane).

    ``interpolator``: ``sitk.sitkBSpline`` (default) or ``sitkLinear`` run as matrices; any other
    SimpleITK interpolator (nearest neighbour, windowed sinc, ...) through SimpleITK plane by plane.
    ``threads``: planes resampled on this many threads at once, each with a one-thread BLAS. 1 (the
    default) where the network runs on the same CPU and needs its other cores; where it runs on a
    GPU the host's cores are free for this (2 threads on the 2-core test machine: 1.4x at 32
    planes a call, nothing at 4).
    """

    def __init__(self, shape_hw: tuple[int, int], spacing_hw: tuple[float, float], size: int | None = NET_SIZE,
                 interpolator: int = sitk.sitkBSpline, threads: int = 1):
        self.threads = max(1, int(threads))
        self.h, self.w = (int(v) for v in shape_hw)
        self.sh, self.sw = (float(v) for v in spacing_hw)
        self.size = size
        self.interpolator = sitk.sitkLinear if min(self.h, self.w) < _BSPLINE_MIN_PIXELS else interpolator
        if size is not None and (self.h, self.w) == (size, size) and abs(self.sh - self.sw) <= 1e-6 * self.sw:
            self.size = size = None  # the plane already is the net grid: skip two resamplings per plane
        if size is None:
            return
        self.s = max(self.h * self.sh, self.w * self.sw) / size  # square pixel of the net grid
        # Centre the plane in the net grid (pixel-centre coordinates, mm from the plane's pixel (0, 0)).
        self.ox = (self.w - 1) * self.sw / 2 - (size - 1) * self.s / 2
        self.oy = (self.h - 1) * self.sh / 2 - (size - 1) * self.s / 2
        # sigma = (shrink factor - 1) / 2 source pixels (the usual anti-aliasing choice) per axis, in mm^2
        self.variance = [(max(0.0, self.s / sp - 1) / 2 * sp) ** 2 for sp in (self.sw, self.sh)]
        self._axes: dict[str, tuple[_BandedAxis, _BandedAxis]] = {}

    # -- the matrices ------------------------------------------------------------------------
    def _banded(self, which: str) -> tuple[_BandedAxis, _BandedAxis]:
        """(along x, along y) for ``which``: 'to_net', 'to_net_smoothed' (with the anti-aliasing)
        or 'from_net'. Built on first use (a few ms for a 512x512 plane)."""
        if which not in self._axes:
            kind = _MATRIX_KINDS[self.interpolator]
            if which == "from_net":
                along = [(self.size, (np.arange(n) * sp - o) / self.s, 0.0)
                         for n, sp, o in ((self.w, self.sw, self.ox), (self.h, self.sh, self.oy))]
            else:
                net = np.arange(self.size)
                smooth = which == "to_net_smoothed"
                along = [(n, (o + net * self.s) / sp, v / sp ** 2 if smooth else 0.0)
                         for n, sp, o, v in ((self.w, self.sw, self.ox, self.variance[0]),
                                             (self.h, self.sh, self.oy, self.variance[1]))]
            self._axes[which] = tuple(_BandedAxis(_resampling_matrix(n, pos, kind, var)) for n, pos, var in along)
        return self._axes[which]

    def _apply(self, planes: np.ndarray, x_axis: _BandedAxis, y_axis: _BandedAxis) -> np.ndarray:
        vector = planes.ndim == 4
        stack = np.asarray(planes, np.float32)
        if vector:  # (N, H, W, C) -> (N*C, H, W): each channel is a plane
            n, c = stack.shape[0], stack.shape[3]
            stack = np.ascontiguousarray(np.moveaxis(stack, 3, 1)).reshape(n * c, *stack.shape[1:3])
        with _one_blas_thread():
            if self.threads == 1 or len(stack) < 2:
                out = y_axis.along_rows(x_axis.along_last(stack))
            else:  # runs of planes on several threads (BLAS releases the GIL); each plane as alone
                from concurrent.futures import ThreadPoolExecutor

                bounds = np.linspace(0, len(stack), min(self.threads, len(stack)) + 1).astype(int)
                with ThreadPoolExecutor(len(bounds) - 1, thread_name_prefix="lightfusion-planes") as pool:
                    parts = pool.map(lambda ab: y_axis.along_rows(x_axis.along_last(stack[ab[0]:ab[1]])),
                                     zip(bounds[:-1], bounds[1:]))
                    out = np.concatenate(list(parts))
        if vector:
            out = np.ascontiguousarray(np.moveaxis(out.reshape(n, c, *out.shape[1:]), 1, 3))
        return out

    # -- SimpleITK, for the interpolators not written as matrices --------------------------------
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

    def _check(self, planes: np.ndarray, hw: tuple[int, int]) -> None:
        if planes.ndim not in (3, 4) or tuple(planes.shape[1:3]) != hw:
            raise ValueError(f"expected planes of shape (N, {hw[0]}, {hw[1]}[, C]), got {planes.shape}")

    def to_net(self, planes: np.ndarray) -> np.ndarray:
        """(N, H, W[, C]) -> (N, size, size[, C]) float32."""
        if self.size is None:
            return np.ascontiguousarray(planes, np.float32)
        self._check(planes, (self.h, self.w))
        if self.interpolator not in _MATRIX_KINDS:
            return self._resample(planes, ((self.w, self.h), (self.sw, self.sh), (0.0, 0.0)),
                                  ((self.size, self.size), (self.s, self.s), (self.ox, self.oy)), smooth=True)
        smooth = planes.ndim == 3 and max(self.variance) > 0  # colour planes are not smoothed (as before)
        return self._apply(planes, *self._banded("to_net_smoothed" if smooth else "to_net"))

    def from_net(self, planes: np.ndarray) -> np.ndarray:
        """(N, size, size[, C]) -> (N, H, W[, C]) float32."""
        if self.size is None:
            return np.ascontiguousarray(planes, np.float32)
        self._check(planes, (self.size, self.size))
        if self.interpolator not in _MATRIX_KINDS:
            return self._resample(planes, ((self.size, self.size), (self.s, self.s), (self.ox, self.oy)),
                                  ((self.w, self.h), (self.sw, self.sh), (0.0, 0.0)), smooth=False)
        return self._apply(planes, *self._banded("from_net"))
