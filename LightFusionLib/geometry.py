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

import itertools

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


def from_canonical(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Inverse of :func:`to_canonical`: ``image`` (on ``to_canonical(reference)``'s grid) re-stored
    on ``reference``'s grid, with ``reference``'s geometry copied exactly."""
    out = image if orientation_of(reference) == CANONICAL else sitk.DICOMOrient(image, orientation_of(reference))
    if out.GetSize() != reference.GetSize():  # cannot happen for a permutation; a bug if it does
        raise RuntimeError(f"re-orientation changed the grid: {out.GetSize()} vs {reference.GetSize()}")
    out.CopyInformation(reference)
    return out


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


def resample_onto(reference: sitk.Image, moving: sitk.Image,
                  transform: sitk.Transform | None = None) -> tuple[sitk.Image, float]:
    """``moving`` resampled (linear, float32 / vector float32) onto ``reference``'s grid, and the
    fraction of reference voxels inside ``moving``'s field of view. Outside voxels get its minimum.
    ``transform`` maps reference points to ``moving`` points (ITK's convention); None = identity."""
    float_type = sitk.sitkVectorFloat32 if moving.GetNumberOfComponentsPerPixel() > 1 else sitk.sitkFloat32
    moving_f = sitk.Cast(moving, float_type)
    if transform is None and same_grid(reference, moving):
        moving_f.CopyInformation(reference)
        return moving_f, 1.0
    transform = transform or sitk.Transform()
    background = float(sitk.GetArrayViewFromImage(moving).min())
    out = sitk.Resample(moving_f, reference, transform, sitk.sitkLinear, background, float_type)
    # Field of view: resample a mask of ones the same way (exact, whatever the two directions).
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    coverage = float(np.count_nonzero(sitk.GetArrayViewFromImage(inside))) / np.prod(reference.GetSize())
    return out, coverage


class PlaneGrid:
    """Resampling of an (N, H, W[, C]) plane stack with in-plane spacing (sh, sw) to ``size`` x
    ``size`` square pixels and back, plane by plane (planes never mix, so results do not depend
    on batching). Aspect ratio kept, short side padded with 0; cubic B-spline interpolation
    (SimpleITK), with Gaussian anti-aliasing before shrinking onto a coarser net grid.
    ``size=None``: identity (native size).

    Why B-spline and no smoothing on the way back: the way back samples the plane's own pixel
    centres, which a cubic B-spline interpolant reproduces almost exactly (sample volume, axial,
    inputs through 256 and back: mean |error| 0.08 grey levels vs 2.0 with linear interpolation).
    A plane fewer than 4 pixels wide or high is interpolated linearly: the cubic B-spline reads
    outside such a plane and returns garbage (NaN or 1e37).
    """

    def __init__(self, shape_hw: tuple[int, int], spacing_hw: tuple[float, float], size: int | None = NET_SIZE,
                 interpolator: int = sitk.sitkBSpline):
        self.h, self.w = shape_hw
        self.sh, self.sw = spacing_hw
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
