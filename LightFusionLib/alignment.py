"""A cheap check that an MRI and a PET / SPECT / CT volume are aligned in physical space.

Fusion assumes the two volumes are already co-registered. This module measures how well they match
*as they are* and flags a pair that is clearly misaligned, so the caller can warn (not refuse)
before fusing. The same number, :func:`measure_alignment`, is what a registration step should
report before and after registering, so "before" and "after" are comparable.

The measure
-----------
Mattes mutual information (SimpleITK's ``ImageRegistrationMethod.MetricEvaluate``, the metric a
SimpleITK rigid/affine registration optimises) between the two volumes on coarse grids:

- each volume is block-averaged (``sitk.BinShrink``, which is also the anti-aliasing smoothing) to
  about :data:`GRID_MM` on its own grid and clipped to its 0.5..99.5th percentiles, so a few
  extreme voxels (metal in a CT, padding values, a hot spot) cannot squeeze the tissue into one of
  the :data:`HISTOGRAM_BINS` histogram bins;
- every voxel of the coarse fixed (MRI) grid is a sample (no random sampling, so the value is
  deterministic); samples that map outside the moving volume are left out, so the measure is taken
  over the overlap and a moving volume covering only part of the MRI (a PET cropped to the brain)
  is measured where it has data;
- the result is MI in nats (higher is better; SimpleITK's metric value is its negative). It is
  comparable between poses of the same pair, not between different pairs.

The check
---------
MI has no absolute scale (a CT-MRI pair scores less than a PET-MRI pair when both are perfectly
aligned), so :func:`check_alignment` asks instead whether the given pose is a *local maximum*: the
score at the given pose is compared with the scores at 12 rigid offsets, translations of
:data:`TRANSLATION_STEP_MM` along +-x, +-y, +-z and rotations of :data:`ROTATION_STEP_DEG` about
each axis (through the centre of the MRI's foreground). When aligned, every offset scores clearly
*less*; when misaligned by more than about half a step, some offset moves the volumes closer and
scores more. The pair is flagged when the best offset beats the given pose by more than
:data:`GAIN_THRESHOLD` (relative).

Calibration (``Testing/test_alignment.py``; gain = best offset / given pose - 1)
-----------------------------------------------------------------------------
Must not warn (gain): SPM12 T1/PET -0.14, T1/SPECT -0.12 (SPECT stored RAS, T1 LAS), bundled MNI
T1 / simulated PET -0.34 (different grids); the porcine CT rigidly registered to its MRI (its
score rises from 0.27 to 0.67); the aligned pairs moved by 3 mm along or 2 degrees about any one axis,
or 2 mm + 2 degrees along/about all three at once: -0.02 at most (T1/SPECT, combined move); the
moving volume or the MRI cropped to its foreground: -0.12 at most; either cut to a 40-100 mm axial
slab: +0.01 at most (+0.02 for slabs of the registered porcine pair, whose tissue block is nearly
uniform along z, so a z shift changes little).
Must warn: the porcine CT vs its T2 MRI (real scans from different days) +0.45; the aligned pairs
moved 25 mm along x, y or z, rotated 15-20 degrees about x, y or z, moved 20 mm + 15 degrees, moved
(-15, 15, -15) mm, or with the origin shifted 30 mm: +0.15 at least (T1/SPECT rotated 20 degrees
about z, the head's vertical axis); gross moves (60-80 mm, 45-90 degrees): +0.11 at least.
Sweeping single moves on the three aligned pairs, the check starts to warn at 8-16 mm and 8-12 degrees.

Alternatives measured and rejected: Dice of Otsu head masks cannot separate the cases (aligned
T1/PET 0.76, T1/SPECT 0.72: a brain-only PET against a head mask; porcine misaligned 0.74; 15
degree rotations 0.70-0.75). Normalised MI (Studholme, numpy histograms) ranks poses like Mattes MI
but its relative gains are about 10x smaller (values sit just above 1): the worst aligned and
misaligned cases were -0.012 and +0.012. Mattes MI with 64 bins kept the same worst cases (-0.02 /
+0.16) but the porcine gain fell to +0.32 (+0.45 at 32 bins); without the percentile clip the
gains moved by 0.07 at most.

Not detected: a left-right flip of a near-symmetric head (MI barely changes), and misalignments of
a few mm, which are not "clearly misaligned" and need a registration to see.

Cost: two block averages and 13 metric evaluations on grids of about 50^3 voxels: 0.33 s for a
512x512x94 MRI with a 256x256x204 CT on the 2-core CPU (reading not included), 0.15-0.2 s for the
2 mm brain volumes; :func:`measure_alignment` alone 0.1 s and 0.03 s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .windows import voxel_sample

__all__ = [
    "REGISTER_HINT",
    "GRID_MM",
    "HISTOGRAM_BINS",
    "TRANSLATION_STEP_MM",
    "ROTATION_STEP_DEG",
    "GAIN_THRESHOLD",
    "AlignmentReport",
    "measure_alignment",
    "check_alignment",
]

#: How to fix a misaligned pair; the end of every warning (change it when ``--register`` exists).
REGISTER_HINT = ("register them first: `--register rigid` (Register first: Rigid in Slicer), "
                 "or `lightfusion register` to keep the transform")

#: Spacing (mm) the volumes are block-averaged to before measuring. 4 mm keeps a head at about
#: 50^3 samples (cost) and still resolves the head outline and the brain / skull / ventricle
#: contrast that MI locks onto; the offsets tried are 5x this, so the grid does not limit the check.
GRID_MM = 4.0

#: Histogram bins of the Mattes MI. With about 10^5 samples 32 bins fill well; 64 bins gave the same
#: worst-case margins on the calibration set but a smaller gain on the porcine pair (+0.32 vs +0.45).
HISTOGRAM_BINS = 32
# A coarse grid of more voxels than this is made coarser still (the same for every pose): at
# 4 mm a 512x512x400 1-mm MRI keeps 1.6 M voxels and the 13 metric evaluations took 2.5 s; a
# 256^3 one (262 k at 4 mm) is unchanged. (ITK's metric sampling does not apply to MetricEvaluate.)
MAX_COARSE_VOXELS = 600_000

#: Size of the translation offsets (mm) along each physical axis. A misalignment of more than about
#: half a step is detected. 15 mm / 10 degrees left only 0.06 between the worst tiny move (+0.03)
#: and the weakest required warning (+0.09, a 20 degree rotation about z); 20 mm / 15 degrees gives
#: -0.02 vs +0.15. 30 mm steps overshoot: a 26 mm diagonal move then scored only +0.03.
TRANSLATION_STEP_MM = 20.0

#: Size of the rotation offsets (degrees) about each physical axis through the MRI foreground's centre.
ROTATION_STEP_DEG = 15.0

#: Warn when the best offset scores this much more (relative) than the given pose. Calibrated on
#: real pairs (see the module docstring): aligned pairs, tiny moves and volumes cropped to their
#: foreground reach at most -0.02 (thin slabs of the registered porcine pair +0.02), the required
#: misalignments at least +0.15 (the porcine pair +0.45, gross moves +0.11). 0.07 sits in the middle:
#: margins 0.09 (0.05 for slabs) on the no-warning side, 0.08 (0.04 gross) on the warning side.
GAIN_THRESHOLD = 0.07
# Too few coarse voxels along an axis (a slab a few planes thick): mutual information is not
# meaningful there, so such a pair is not judged (no warning).
MIN_COARSE_VOXELS = 4

# Percentiles each coarse volume is clipped to before the histogram (see the module docstring).
_CLIP_PERCENTILES = (0.5, 99.5)
# An integer volume with at least this many grey levels is block-averaged in its own type before
# the float cast: the averages are then rounded to whole units, immaterial at 32 bins, and it
# saves casting every full-resolution voxel (0.12 s for the 24 M voxels of a 512x512x94 MRI).
_NATIVE_SHRINK_MIN_LEVELS = 256

# Physical axes of SimpleITK's LPS space: a positive shift along x moves toward the patient's left.
_AXES = (("x", "right", "left"), ("y", "anterior", "posterior"), ("z", "inferior", "superior"))


@dataclass(frozen=True)
class AlignmentReport:
    """Result of :func:`check_alignment`.

    ``score`` is :func:`measure_alignment` at the given pose (Mattes MI, nats, higher is better);
    ``offset_scores`` the same at each rigid offset, keyed by a description of how the moving
    volume is displaced ("shifted 20 mm toward the patient's left", "rotated 15 degrees about x (+)",
    + meaning right-handed about the positive LPS axis, through the MRI foreground's centre); a key
    maps to ``-inf`` where that offset leaves too little overlap to measure. ``best_offset`` and
    ``best_offset_score`` are the best of them; ``gain`` is ``best_offset_score / score - 1``.
    ``overlap`` is False when the volumes do not overlap enough in physical space to be measured
    at all (then ``score`` is 0 and ``misaligned`` is True).
    """

    score: float
    best_offset_score: float
    best_offset: str
    misaligned: bool
    gain: float
    offset_scores: dict[str, float] = field(default_factory=dict)
    overlap: bool = True
    measured: bool = True  # False: a volume too small (fewer than 4 coarse voxels along an axis) to judge

    def describe(self, fixed_name: str = "MRI", moving_name: str = "other volume") -> str:
        """One line for a log or a dialog: whether the pair looks aligned, the numbers, and (when
        misaligned) what to do about it (:data:`REGISTER_HINT`)."""
        pair = f"{fixed_name} and {moving_name}"
        if not self.measured:
            return f"alignment of {pair} not measured: a volume is too small (under {MIN_COARSE_VOXELS * GRID_MM:.0f} mm)."
        if not self.overlap:
            return (f"{pair} look misaligned: they hardly overlap in physical space, so their alignment "
                    f"cannot even be measured; {REGISTER_HINT}.")
        numbers = (f"alignment score {self.score:.3f} (Mattes mutual information); "
                   f"best nearby pose {self.best_offset_score:.3f} ({self.gain:+.0%}) with the "
                   f"{moving_name} {self.best_offset}")
        if self.misaligned:
            return f"{pair} look misaligned: {numbers}; {REGISTER_HINT}."
        return f"{pair} look aligned: {numbers}."


class _Prepared:
    """The two volumes on coarse grids plus the rotation centre, shared by all the evaluations."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image) -> None:
        self.fixed = _coarse(fixed, "fixed")
        self.moving = _coarse(moving, "moving")
        self.centre = _foreground_centre(self.fixed)

    def score(self, transform: sitk.Transform) -> float | None:
        """Mattes MI (nats) with ``transform`` mapping fixed points to moving points, or None when
        too few fixed samples map inside the moving volume."""
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
        reg.SetMetricSamplingStrategy(reg.NONE)
        # Metric values only, no derivatives: skipping the gradient images makes each evaluation
        # about 3x faster (125 -> 45 ms on the porcine pair) and does not change the value.
        reg.SetMetricUseFixedImageGradientFilter(False)
        reg.SetMetricUseMovingImageGradientFilter(False)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetInitialTransform(transform)
        try:
            return -reg.MetricEvaluate(self.fixed, self.moving)
        except RuntimeError as exc:
            # ITK's "All samples map outside moving image buffer" / "do not sufficiently overlap".
            if "overlap" in str(exc) or "outside" in str(exc):
                return None
            raise


def _check_scalar_3d(image: sitk.Image, role: str) -> None:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{role} must be a SimpleITK image, not {type(image).__name__}")
    if image.GetDimension() != 3:
        raise ValueError(f"{role} is {image.GetDimension()}-D; a 3-D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{role} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a scalar volume is needed")


def _is_integer(image: sitk.Image) -> bool:
    return image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                  sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


def _coarse(image: sitk.Image, role: str) -> sitk.Image:
    """``image`` block-averaged to about GRID_MM on its own grid, float32, clipped to robust limits.
    Filters return new images, so the caller's image is never modified."""
    _check_scalar_3d(image, role)
    # never more than the axis holds: BinShrink refuses a factor larger than the size
    size = np.array(image.GetSize(), float)
    excess = np.prod(size * np.array(image.GetSpacing()) / GRID_MM) / MAX_COARSE_VOXELS
    to_int = round if excess <= 1 else math.ceil  # capped: round up, so the cap holds
    grid_mm = GRID_MM * max(1.0, excess ** (1 / 3))
    factors = [max(1, min(int(to_int(grid_mm / s)), n)) for s, n in zip(image.GetSpacing(), image.GetSize())]
    shrink = any(f > 1 for f in factors)
    if shrink and _is_integer(image):
        # A strided sample's range is a lower bound of the volume's: enough levels there settles
        # it without a pass over every voxel (0.2 s on a 512x512x400 MRI); too few, and the
        # whole volume decides.
        sample = voxel_sample(sitk.GetArrayViewFromImage(image))
        levels = float(sample.max()) - float(sample.min())
        if levels < _NATIVE_SHRINK_MIN_LEVELS:
            stats = sitk.MinimumMaximumImageFilter()
            stats.Execute(image)
            levels = stats.GetMaximum() - stats.GetMinimum()
        if levels >= _NATIVE_SHRINK_MIN_LEVELS:
            image = sitk.BinShrink(image, factors)
            shrink = False
    image = sitk.Cast(image, sitk.sitkFloat32)
    if shrink:
        image = sitk.BinShrink(image, factors)
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = np.percentile(values, _CLIP_PERCENTILES)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"{role} has NaN or infinite voxels")
    if hi <= lo:
        # Robust limits collapse (a mostly constant volume): fall back to the full range.
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise ValueError(f"{role} is constant; nothing to align")
    return sitk.Clamp(image, sitk.sitkFloat32, float(lo), float(hi))


def _foreground_centre(coarse: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of the (Otsu) foreground, the centre for the rotation offsets: rotating about
    the head rather than a far corner of the field of view keeps a rotation a rotation."""
    mask = sitk.OtsuThreshold(coarse, 0, 1)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.HasLabel(1):
        return tuple(stats.GetCentroid(1))
    return coarse.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in coarse.GetSize()])


def _offsets(centre: tuple[float, float, float]) -> list[tuple[str, sitk.Transform]]:
    """The 12 rigid offsets, each named by how it displaces the moving volume's content.

    An offset ``o`` is applied to fixed points before the given transform (fixed point x is compared
    with moving point T(o(x))), so a translation by +d shows the moving content displaced by -d."""
    step = TRANSLATION_STEP_MM
    out: list[tuple[str, sitk.Transform]] = []
    for axis, (_, negative, positive) in enumerate(_AXES):
        for sign in (+1, -1):
            shift = [0.0, 0.0, 0.0]
            shift[axis] = sign * step
            toward = negative if sign > 0 else positive
            out.append((f"shifted {step:g} mm toward the patient's {toward}", sitk.TranslationTransform(3, shift)))
    for axis, (name, _, _) in enumerate(_AXES):
        for sign in (+1, -1):
            angles = [0.0, 0.0, 0.0]
            angles[axis] = math.radians(sign * ROTATION_STEP_DEG)
            rotation = sitk.Euler3DTransform()
            rotation.SetCenter(centre)
            rotation.SetRotation(*angles)
            # The moving content turns the opposite way to the sampling rotation.
            out.append((f"rotated {ROTATION_STEP_DEG:g} degrees about {name} ({'-' if sign > 0 else '+'})", rotation))
    return out


def _compose(transform: sitk.Transform | None, offset: sitk.Transform | None) -> sitk.Transform:
    """x -> transform(offset(x)), either may be None (identity). The caller's transform is copied
    (SimpleITK transforms are copy-on-write), never modified."""
    if transform is None:
        # The common case (checking volumes as they lie): the offset alone, as a composite of one
        # costs about 20% more per metric evaluation.
        return offset if offset is not None else sitk.Transform(3, sitk.sitkIdentity)
    if offset is None:
        return sitk.Transform(transform)
    composite = sitk.CompositeTransform(3)
    # A CompositeTransform applies the transform added last first.
    composite.AddTransform(sitk.Transform(transform))
    composite.AddTransform(offset)
    return composite


def measure_alignment(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None) -> float:
    """How well ``moving`` matches ``fixed`` in physical space: Mattes mutual information (nats,
    higher is better) on ~4 mm grids, over the region where they overlap.

    ``transform`` maps fixed physical points to moving ones (SimpleITK's resampling / registration
    convention; None is the identity: the volumes as they lie). This is the number a registration
    reports before (identity) and after (its result). It compares poses of the same pair, not
    different pairs. Returns 0.0 when the volumes do not overlap enough to measure. Inputs (any
    scalar pixel type) are not modified; raises ValueError for non-3-D, vector or constant images.
    """
    value = _Prepared(fixed, moving).score(_compose(transform, None))
    return 0.0 if value is None else value


def check_alignment(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None) -> AlignmentReport:
    """Whether ``moving`` (PET / SPECT / CT) looks clearly misaligned with ``fixed`` (the MRI).

    Compares :func:`measure_alignment` at the given pose with 12 small rigid offsets
    (+-:data:`TRANSLATION_STEP_MM` along, +-:data:`ROTATION_STEP_DEG` about each axis);
    ``misaligned`` when one of them scores more than :data:`GAIN_THRESHOLD` better. Meant for a
    warning, not for refusing: it detects misalignments of roughly 10 mm or 10 degrees and more,
    not a few mm. Inputs are not modified.
    """
    prepared = _Prepared(fixed, moving)
    if min(prepared.fixed.GetSize() + prepared.moving.GetSize()) < MIN_COARSE_VOXELS:
        return AlignmentReport(score=0.0, best_offset_score=0.0, best_offset="", misaligned=False, gain=0.0,
                               measured=False)
    score = prepared.score(_compose(transform, None))
    if score is None:
        return AlignmentReport(score=0.0, best_offset_score=0.0, best_offset="", misaligned=True,
                               gain=math.inf, overlap=False)
    offset_scores = {}
    for name, offset in _offsets(prepared.centre):
        value = prepared.score(_compose(transform, offset))
        offset_scores[name] = -math.inf if value is None else value
    best_offset = max(offset_scores, key=offset_scores.__getitem__)
    best = offset_scores[best_offset]
    # MI is >= 0; a pose with no shared information at all (score ~0) that some offset improves is
    # as misaligned as it gets.
    gain = best / score - 1 if score > 1e-9 else (math.inf if best > score else 0.0)
    return AlignmentReport(score=score, best_offset_score=best, best_offset=best_offset,
                           misaligned=gain > GAIN_THRESHOLD, gain=gain, offset_scores=offset_scores)
