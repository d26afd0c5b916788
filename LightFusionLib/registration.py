"""Rigid / affine registration of a PET / SPECT / CT volume (moving) to an MRI (fixed), SimpleITK only.

Fusion needs the two volumes aligned in physical space. When they are not (scans from different
sessions or scanners), :func:`register` finds the rigid (or affine) transform that aligns them, checks
that the result can be trusted, and reports the alignment measure before and after.

Conventions
-----------
The transform maps **MRI (fixed) physical points to the other volume's (moving) physical points**
(LPS mm), ITK's resampling convention: the other volume on the MRI grid is
``sitk.Resample(other, mri, transform, sitk.sitkLinear, background)`` (or
:func:`LightFusionLib.geometry.resample_onto` ``(mri, other, transform)``). Written with
:func:`write_transform` (an ITK ``.tfm`` / ``.txt`` / ``.h5`` file), Slicer and ITK read it as the
same resampling transform: in Slicer, load it and put the *other* volume under it to see it on the MRI.

Method (SimpleITK's registration examples, ``ImageRegistrationMethod``)
------------------------------------------------------------------------
- Both volumes are cast to float32 (an 8-bit RGB volume: its luma 0.299 R + 0.587 G + 0.114 B),
  block-averaged (``BinShrink``) to about :attr:`Settings.grid_mm` (3 mm) on their own grids, and
  clipped to their 0.5..99.5th percentiles (metal in a CT, padding values or a hot spot cannot squeeze
  the tissue into one histogram bin). Inputs are never modified.
- Start: the volumes as they lie (identity), their geometric centres or their centres of mass
  (``CenteredTransformInitializer`` GEOMETRY / MOMENTS), whichever has the better Mattes MI on the
  coarsest grid (among the starts that overlap the MRI at least half as much as the best one).
- Turns: that start, and the same turned 180 degrees about x, y and z, each optimised on the coarsest
  level; the best by the metric goes on (:attr:`Settings.turns`). A box-like specimen scanned head
  first in one scanner and feet first in the other fits either way round by its outline: the porcine
  CT, not turned, stops in a local optimum (alignment measure 0.61) where its bones miss the MRI's;
  turned about y it reaches 0.67 with the bones on the MRI's dark cortical lines (checked by eye).
- Metric: Mattes mutual information, :attr:`Settings.bins` bins, a RANDOM sample of about
  :attr:`Settings.samples` points per level with a fixed seed (reproducible, to ~1e-10: ITK's
  multi-threaded sums may add in another order).
- Optimiser: regular-step gradient descent, scales from physical shift (a step of the learning rate
  moves no voxel more than about that many mm), :attr:`Settings.iterations` at most per level.
- Pyramid: shrink factors :attr:`Settings.shrink` on the ~3 mm grid (12, 6, 3 mm), Gaussian
  smoothing :attr:`Settings.sigma_mm` in mm (``SmoothingSigmasAreSpecifiedInPhysicalUnitsOn``).
- Affine: an ``AffineTransform`` initialised from the rigid result, refined on the 6 and 3 mm levels.

Tuning (``scripts/registration_study.py``; 2 CPU cores shared with other work, so times vary ~2x)
------------------------------------------------------------------------------------------------
Known rigid moves (up to 15 degrees, 30 mm; 12 per pair) recovered on the bundled T1 / simulated PET
(exact truth), the SPM12 T1/PET and T1/SPECT templates; a rigid 256^3 CT pair; the porcine CT/MRI.
TRE medians below are bundled / SPM PET / SPM SPECT.

- finest grid 2 mm: TRE 0.20 / 0.49 / 0.82 mm, 256^3 in 3.8 s; 3 mm: 0.25 / 0.65 / 0.74 mm, 256^3 in
  1.6 s (before the turn search was added). Registering at 3 mm is as accurate (well below the 2 mm
  templates' voxel) at about a third of the time, so the full-resolution level is skipped.
- samples per level as a count, not a fraction: 4 % of a 2 mm template is only 4000 points and its
  worst SPECT case reached 2.3 mm; 20000 / 20000 / 30000 points keep every case under 1.5 mm
  (10000 / 15000 / 20000 was as accurate, 20000 / 30000 / 50000 no better and slower).
- regular-step gradient descent, learning rate 2 mm, relaxation 0.7, minimum step 0.02 mm: plain
  gradient descent with an estimated learning rate stopped early (its convergence window) and left
  1.4 mm on the exact-truth pair where this leaves 0.25 mm; relaxation 0.5 / minimum step 0.01 was
  as accurate but crawled (145 iterations instead of 65 on the porcine pair).
- the turn search costs 4 short coarse registrations (40 iterations at most): about 0.2 s on the
  brain pairs, 0.8 s on the 256^3 pair.
Result with these settings: TRE median / max 0.25 / 0.27, 0.68 / 0.82, 0.63 / 1.10 mm; rigid
256^3 in 2-3.5 s, the porcine pair in 2-3 s, the brain pairs in 0.6-2 s.

Checks (:func:`register` refuses with :class:`RegistrationError`, one line)
--------------------------------------------------------------------------
- a volume thinner than :data:`MIN_VOXELS` voxels along an axis; the optimiser fails (an ITK error,
  e.g. all samples map outside the other volume) or returns non-finite parameters;
- an affine result that mirrors or scales by more than :data:`MAX_SCALE` (or less than its inverse);
- the MRI's head centre moved more than :data:`MAX_DRIFT_FOV` of the other volume's field-of-view
  diagonal from the start, or neither volume's centre left inside the other's field of view;
- the alignment measure after below :data:`MIN_MEASURE` nats: the volumes share no information (pure
  noise scores 0.002-0.005, the real pairs 0.6-1.05 after registering; a NEMA phantom PET against a
  brain T1, which share nothing anatomical, still scores 0.11 and is NOT refused);
- the foregrounds (Otsu) overlapping less than :data:`MIN_OVERLAP` of the smaller one;
- the alignment measure after worse than the identity's by more than :data:`WORSE_MARGIN` (relative).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LightFusionError
from .volumeio import check_volume, sitk_message

__all__ = ["KINDS", "RegistrationError", "RegistrationResult", "Settings", "SETTINGS", "MIN_VOXELS", "MIN_OVERLAP",
           "MIN_MEASURE", "WORSE_MARGIN", "MAX_SCALE", "MAX_DRIFT_FOV", "register_volumes", "register",
           "read_transform", "write_transform"]

KINDS = ("rigid", "affine")
Progress = Callable[[int, int], None]

#: A volume needs at least this many voxels along each axis to be registered.
MIN_VOXELS = 4
#: Refuse when the two foregrounds overlap less than this fraction of the smaller one.
MIN_OVERLAP = 0.5
#: Refuse when the alignment measure after registering is below this (nats): no shared information.
MIN_MEASURE = 0.05
#: Refuse when the measure after is below (1 - WORSE_MARGIN) x the measure before (identity).
WORSE_MARGIN = 0.05
#: Refuse an affine result scaling any axis by more than this factor (or less than its inverse).
MAX_SCALE = 2.0
#: Refuse when the MRI's foreground centre moved more than this fraction of the other volume's
#: field-of-view diagonal away from where the initialiser put it.
MAX_DRIFT_FOV = 0.5


class RegistrationError(LightFusionError):
    """A registration that failed or whose result cannot be trusted; ``str(exc)`` is one line."""


@dataclass(frozen=True)
class Settings:
    """Registration settings; the defaults (:data:`SETTINGS`) are tuned (see the module docstring)."""

    grid_mm: float = 3.0  # both volumes block-averaged to about this spacing (the finest level)
    shrink: tuple[int, ...] = (4, 2, 1)  # pyramid shrink factors on that grid (12, 6, 3 mm)
    sigma_mm: tuple[float, ...] = (4.0, 2.0, 1.0)  # Gaussian smoothing per level (physical units)
    samples: tuple[int, ...] = (20000, 20000, 30000)  # random metric samples per level (fixed seed)
    iterations: int = 100  # at most, per level
    learning_rate: float = 2.0  # regular-step gradient descent, about mm per step (physical-shift scales)
    min_step: float = 0.02
    relaxation: float = 0.7
    affine_shrink: tuple[int, ...] = (2, 1)  # the affine refinement's levels (6, 3 mm)
    affine_sigma_mm: tuple[float, ...] = (2.0, 1.0)
    affine_samples: tuple[int, ...] = (20000, 30000)
    bins: int = 32  # Mattes histogram bins
    seed: int = 20240611
    init: str = "best"  # 'identity', 'geometry', 'moments' or 'best' (the one the metric prefers)
    turns: bool = True  # also try the start turned 180 degrees about x, y and z (the coarsest level decides)
    turn_iterations: int = 40  # per turn, at most, on the coarsest level
    turn_min_step: float = 0.1


SETTINGS = Settings()

_CLIP_PERCENTILES = (0.5, 99.5)
# An integer volume with at least this many grey levels is block-averaged in its own type before the
# float cast (as in alignment.py): it saves casting every full-resolution voxel.
_NATIVE_SHRINK_MIN_LEVELS = 256
_INITIALISERS = {"geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
                 "moments": sitk.CenteredTransformInitializerFilter.MOMENTS}


@dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register` found.

    ``transform`` maps MRI physical points to the other volume's (``sitk.Resample(other, mri,
    transform)``); ``measure_before`` / ``measure_after`` are :func:`LightFusionLib.alignment.measure_alignment`
    (Mattes MI, nats, higher is better) at the identity and at ``transform``; ``seconds`` is the
    registration's wall time (without the two measurements); ``overlap`` the fraction of the smaller
    foreground the other one covers after registering; ``initializer`` the start: 'identity' (the
    volumes as they lie), 'geometry' or 'moments' (``CenteredTransformInitializer``), followed by
    ', turned 180 degrees about x|y|z' when the turn search chose that; ``iterations`` the optimiser
    iterations over all levels; ``stop`` the optimiser's last stop condition.
    """

    transform: sitk.Transform
    kind: str
    measure_before: float
    measure_after: float
    seconds: float
    overlap: float = 1.0
    initializer: str = ""
    iterations: int = 0
    stop: str = ""

    def describe(self) -> str:
        """One line for a log: what was done, the measure before/after, the time."""
        return (f"{self.kind} registration in {self.seconds:.1f} s: alignment measure {self.measure_before:.3f} -> "
                f"{self.measure_after:.3f} (Mattes mutual information, higher is better)")


def _is_integer(image: sitk.Image) -> bool:
    return image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                  sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


def _prepared(image: sitk.Image, role: str, grid_mm: float) -> sitk.Image:
    """``image`` as float32 block-averaged to about ``grid_mm``, clipped to robust limits and shifted to
    start at 0 (so the moments initialiser weighs tissue, not air). Filters return new images: the
    input is never modified."""
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{role} must be a SimpleITK image, not {type(image).__name__}")
    image = check_volume(image, role, allow_rgb=True)  # VolumeError: 2-D, NaN, constant, non-8-bit colour
    if image.GetNumberOfComponentsPerPixel() == 3:
        image = _luma(image)
    size = image.GetSize()
    if min(size) < MIN_VOXELS:
        axis = int(np.argmin(size))
        raise RegistrationError(f"{role} is too thin to register: {size[axis]} voxel(s) along axis {'ijk'[axis]} "
                                f"(at least {MIN_VOXELS} needed)")
    # Block size per axis: about grid_mm, keeping at least MIN_VOXELS voxels.
    factors = [max(1, min(int(round(grid_mm / s)), n // MIN_VOXELS)) for s, n in zip(image.GetSpacing(), size)]
    shrink = any(f > 1 for f in factors)
    if shrink and _is_integer(image):
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        if stats.GetMaximum() - stats.GetMinimum() >= _NATIVE_SHRINK_MIN_LEVELS:
            image, shrink = sitk.BinShrink(image, factors), False
    image = sitk.Cast(image, sitk.sitkFloat32)
    if shrink:
        image = sitk.BinShrink(image, factors)
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = (float(v) for v in np.percentile(values, _CLIP_PERCENTILES))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return sitk.Clamp(image, sitk.sitkFloat32, lo, hi) - lo


def _fractions(fixed: sitk.Image, shrink, samples) -> list[float]:
    """Sampling fraction per level giving about ``samples`` points on each level's (shrunk) grid."""
    return [min(1.0, n / float(np.prod([-(-size // f) for size in fixed.GetSize()]))) for f, n in zip(shrink, samples)]


def _metric(reg: sitk.ImageRegistrationMethod, settings: Settings) -> None:
    reg.SetMetricAsMattesMutualInformation(settings.bins)
    # The fixed image's gradient is not used by Mattes MI; the moving one's is precomputed per level
    # (cheap on the ~3 mm grid, about twice as fast per iteration as computing it at each sample).
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)


def _method(settings: Settings, shrink, sigma, fractions) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    _metric(reg, settings)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(list(fractions), settings.seed)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=settings.learning_rate, minStep=settings.min_step,
                                                 numberOfIterations=settings.iterations,
                                                 relaxationFactor=settings.relaxation)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigma))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _shrunk(image: sitk.Image, factor: int) -> sitk.Image:
    """``image`` block-averaged by ``factor`` along each axis, keeping at least 2 voxels per axis."""
    return sitk.BinShrink(image, [max(1, min(factor, n // 2)) for n in image.GetSize()])


def _grid_points(image: sitk.Image) -> np.ndarray:
    """Physical points (n, 3) of every voxel centre of ``image``."""
    kji = np.indices(image.GetSize()[::-1]).reshape(3, -1).T.astype(float)
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + kji[:, ::-1] @ matrix.T


def _initial(fixed: sitk.Image, moving: sitk.Image, settings: Settings) -> tuple[sitk.Euler3DTransform, str]:
    """The rigid start: the volumes as they lie ('identity'), their geometric centres or their centres
    of mass ('geometry' / 'moments', ``CenteredTransformInitializer``), whichever scores the better
    Mattes MI on the coarsest level's grid among the starts that cover at least half as much of the
    MRI's grid as the best-covering one (MI over a sliver of overlap is not comparable)."""
    if settings.init not in ("identity", *_INITIALISERS, "best"):
        raise ValueError(f"unknown initialiser {settings.init!r}")
    candidates = [(name, sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), mode))) for name, mode in _INITIALISERS.items()]
    identity = sitk.Euler3DTransform()
    identity.SetCenter(candidates[0][1].GetCenter())
    candidates.insert(0, ("identity", identity))
    if settings.init != "best":
        return dict(candidates)[settings.init], settings.init
    coarse_fixed, coarse_moving = _shrunk(fixed, settings.shrink[0]), _shrunk(moving, settings.shrink[0])
    points = _grid_points(coarse_fixed)
    coverage = [float(np.mean(_inside(moving, _map(t, points)))) for _, t in candidates]
    scores = [_coarse_metric(coarse_fixed, coarse_moving, t, settings)
              if covers >= 0.5 * max(coverage) else math.inf for (_, t), covers in zip(candidates, coverage)]
    if not np.isfinite(min(scores)):
        name, transform = candidates[int(np.argmax(coverage))]
        return transform, name
    name, transform = candidates[int(np.argmin(scores))]
    return transform, name


def _coarse_metric(coarse_fixed: sitk.Image, coarse_moving: sitk.Image, transform: sitk.Transform,
                   settings: Settings) -> float:
    """Mattes metric (-MI) of the volumes block-averaged to the coarsest level's grid, every voxel a
    sample: deterministic and cheap; +inf when the volumes do not overlap from ``transform``."""
    evaluate = sitk.ImageRegistrationMethod()
    _metric(evaluate, settings)
    evaluate.SetMetricUseMovingImageGradientFilter(False)
    evaluate.SetMetricSamplingStrategy(evaluate.NONE)
    evaluate.SetInitialTransform(transform)
    try:
        value = evaluate.MetricEvaluate(coarse_fixed, coarse_moving)
    except RuntimeError:  # too little overlap
        return math.inf
    return value if math.isfinite(value) else math.inf


#: A 180-degree turn of the start is taken only when it beats the unturned pose's coarse metric by this
#: much (relative); see :func:`_best_turn`.
TURN_MARGIN = 0.05
_TURNS = {"": (0.0, 0.0, 0.0), "x": (math.pi, 0.0, 0.0), "y": (0.0, math.pi, 0.0), "z": (0.0, 0.0, math.pi)}


def _best_turn(fixed: sitk.Image, moving: sitk.Image, start: sitk.Euler3DTransform, settings: Settings,
               counter: list[int]) -> tuple[sitk.Euler3DTransform, str]:
    """``start`` as it is and turned 180 degrees about x, y and z (through its centre), each optimised on
    the coarsest level. A turn is taken only when its metric there beats the unturned pose's (the
    better of ``start`` and its optimised version) by more than :data:`TURN_MARGIN` (relative): a
    volume scanned the other way round (head first vs feet first: 180 about y; prone vs supine: about
    z) whose box-like outline fits either way. The porcine CT turned about y beats the unturned pose
    by 12 %; a thin slab of the SPM PET, nearly symmetric along its axis, by 0.5 % (it must not turn);
    turns of the brain pairs score 20-50 % worse."""
    # The coarsest level's images made once (as the pyramid makes them: smoothed, the fixed one
    # subsampled), then one single-level registration per turn, stopped early: it only has to rank them.
    fixed0 = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, settings.sigma_mm[0]),
                         [max(1, min(settings.shrink[0], n // 2)) for n in fixed.GetSize()])
    moving0 = sitk.SmoothingRecursiveGaussian(moving, settings.sigma_mm[0])
    search = replace(settings, iterations=settings.turn_iterations, min_step=settings.turn_min_step)
    coarse_fixed, coarse_moving = _shrunk(fixed, settings.shrink[0]), _shrunk(moving, settings.shrink[0])
    unturned = (_coarse_metric(coarse_fixed, coarse_moving, start, settings), start)
    turned = None
    for axis, angles in _TURNS.items():
        transform = sitk.Euler3DTransform(start)
        transform.SetRotation(*angles)
        reg = _method(search, [1], [0.0], _fractions(fixed0, [1], settings.samples[:1]))
        reg.SetMetricUseMovingImageGradientFilter(False)  # few samples: cheaper than a gradient image
        reg.SetInitialTransform(transform, inPlace=True)
        try:
            reg.Execute(fixed0, moving0)
        except RuntimeError:  # this turn left too little overlap
            continue
        counter[0] += reg.GetOptimizerIteration()
        if not np.all(np.isfinite(transform.GetParameters())):
            continue
        value = _coarse_metric(coarse_fixed, coarse_moving, transform, settings)
        if not axis:
            unturned = min(unturned, (value, transform), key=lambda c: c[0])
        elif turned is None or value < turned[0]:
            turned = (value, transform, axis)
    # The metric is -MI (<= 0): "better by a margin" is below the unturned value by margin x |value|.
    if turned is not None and math.isfinite(turned[0]) and turned[0] < unturned[0] - TURN_MARGIN * abs(unturned[0]):
        return turned[1], turned[2]
    return unturned[1], ""


def _execute(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
             on_level: Callable[[int], None] | None, counter: list[int]) -> None:
    if on_level is not None:
        # Fired at the start of every level: the start of level k > 0 means k levels are done.
        reg.AddCommand(sitk.sitkMultiResolutionIterationEvent,
                       lambda: reg.GetCurrentLevel() > 0 and on_level(reg.GetCurrentLevel()))
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__(0, counter[0] + 1))
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"the registration failed: {sitk_message(exc)}") from None


@dataclass
class _Run:
    transform: sitk.Transform
    initial: sitk.Transform
    initializer: str
    fixed: sitk.Image
    moving: sitk.Image
    iterations: int
    stop: str
    seconds: float


def _register(mri: sitk.Image, other: sitk.Image, kind: str, progress: Progress | None,
              settings: Settings) -> _Run:
    if kind not in KINDS:
        raise RegistrationError(f"unknown registration kind {kind!r}; choose one of {', '.join(KINDS)}")
    start = time.perf_counter()
    fixed = _prepared(mri, "MRI", settings.grid_mm)
    moving = _prepared(other, "other volume", settings.grid_mm)
    transform, initializer = _initial(fixed, moving, settings)
    initial = sitk.Euler3DTransform(transform)
    n_rigid = len(settings.shrink)
    total = n_rigid + (len(settings.affine_shrink) if kind == "affine" else 0)
    report = (lambda done: progress(done, total)) if progress is not None else None
    if report:
        report(0)
    counter = [0]
    first = 0
    if settings.turns and n_rigid > 1:
        transform, turn = _best_turn(fixed, moving, transform, settings, counter)
        if turn:
            initializer += f", turned 180 degrees about {turn}"
        first = 1  # the coarsest level is done
        if report:
            report(1)
    reg = _method(settings, settings.shrink[first:], settings.sigma_mm[first:],
                  _fractions(fixed, settings.shrink[first:], settings.samples[first:]))
    reg.SetInitialTransform(transform, inPlace=True)
    _execute(reg, fixed, moving, (lambda level: report(first + level)) if report else None, counter)
    stop = reg.GetOptimizerStopConditionDescription()
    if report:
        report(n_rigid)
    result: sitk.Transform = transform
    if kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(transform.GetCenter())
        affine.SetMatrix(transform.GetMatrix())
        affine.SetTranslation(transform.GetTranslation())
        reg = _method(settings, settings.affine_shrink, settings.affine_sigma_mm,
                      _fractions(fixed, settings.affine_shrink, settings.affine_samples))
        reg.SetInitialTransform(affine, inPlace=True)
        _execute(reg, fixed, moving, (lambda level: report(n_rigid + level)) if report else None, counter)
        stop = reg.GetOptimizerStopConditionDescription()
        if report:
            report(total)
        result = affine
    return _Run(result, initial, initializer, fixed, moving, counter[0], stop.strip(), time.perf_counter() - start)


def register_volumes(mri: sitk.Image, other: sitk.Image, kind: str = "rigid", progress: Progress | None = None,
                     *, settings: Settings = SETTINGS) -> sitk.Transform:
    """The transform aligning ``other`` (PET / SPECT / CT, moving) with ``mri`` (fixed).

    ``kind`` 'rigid' gives a ``sitk.Euler3DTransform``, 'affine' a ``sitk.AffineTransform``
    (initialised from the rigid result). It maps MRI physical points to ``other``'s physical points,
    as ``sitk.Resample(other, mri, transform)`` expects. ``progress(levels_done, levels_total)``, if
    given, is called with 0 first and then after each pyramid level (3 for rigid, 5 for affine).
    Scalar volumes of any pixel type; an 8-bit RGB volume is registered by its luma. Inputs are not
    modified. No trust checks: use :func:`register` for those. Raises RegistrationError when the
    optimiser fails, VolumeError for volumes that cannot be registered (2-D, NaN, constant).
    ``settings`` is for studies (``scripts/registration_study.py``); the defaults are tuned.
    """
    return _register(mri, other, kind, progress, settings).transform


def _foreground_points(image: sitk.Image) -> tuple[np.ndarray, float]:
    """Physical points (n, 3) of the Otsu foreground of ``image`` on a 2x coarser grid, and the volume
    (mm^3) one point stands for."""
    coarse = _shrunk(image, 2)
    mask = sitk.GetArrayViewFromImage(sitk.OtsuThreshold(coarse, 0, 1))
    kji = np.argwhere(mask > 0).astype(float)
    origin = np.array(coarse.GetOrigin())
    matrix = np.array(coarse.GetDirection()).reshape(3, 3) * np.array(coarse.GetSpacing())
    return origin + kji[:, ::-1] @ matrix.T, float(np.prod(coarse.GetSpacing()))


def _inside(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Which physical ``points`` lie inside ``image``'s voxel extent."""
    if len(points) == 0:
        return np.zeros(0, bool)
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    index = (points - np.array(image.GetOrigin())) @ np.linalg.inv(matrix).T
    size = np.array(image.GetSize())
    return np.all((index >= -0.5) & (index <= size - 0.5), axis=1)


def _map(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """``transform`` (Euler3D / affine: x -> M (x - c) + c + t) applied to physical points (n, 3)."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    centre, translation = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    return (points - centre) @ matrix.T + centre + translation


def _in_foreground(mask: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Which physical ``points`` fall in a voxel of ``mask`` that is set (nearest voxel)."""
    matrix = np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())
    index = np.rint((points - np.array(mask.GetOrigin())) @ np.linalg.inv(matrix).T).astype(np.int64)
    size = np.array(mask.GetSize())
    inside = np.all((index >= 0) & (index < size), axis=1)
    out = np.zeros(len(points), bool)
    i, j, k = index[inside].T
    out[inside] = sitk.GetArrayViewFromImage(mask)[k, j, i] > 0
    return out


def _overlap(run: _Run) -> float:
    """Fraction of the smaller foreground (by volume) that the other foreground covers after registering."""
    fixed_pts, fixed_vox = _foreground_points(run.fixed)
    moving_pts, moving_vox = _foreground_points(run.moving)
    if len(fixed_pts) == 0 or len(moving_pts) == 0:
        return 0.0
    moving_mask = sitk.OtsuThreshold(_shrunk(run.moving, 2), 0, 1)
    covered = np.count_nonzero(_in_foreground(moving_mask, _map(run.transform, fixed_pts)))
    smaller = min(len(fixed_pts) * fixed_vox, len(moving_pts) * moving_vox)
    return min(1.0, covered * fixed_vox / smaller)


def _unmap(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_map`: other-volume points back to MRI points."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    centre, translation = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    return (points - centre - translation) @ np.linalg.inv(matrix).T + centre


def _centre(image: sitk.Image) -> np.ndarray:
    """Physical centre of the Otsu foreground of ``image`` (of its grid when there is none)."""
    points, _ = _foreground_points(image)
    if len(points):
        return points.mean(0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def _check_pose(run: _Run, mri: sitk.Image, other: sitk.Image) -> None:
    """Raise RegistrationError when the registration diverged: non-finite or absurd parameters, the
    volumes' centres outside each other's field of view, or a drift of more than half the other
    volume's field of view from the start."""
    params = np.array(run.transform.GetParameters(), float)
    if not np.all(np.isfinite(params)):
        raise RegistrationError("the registration diverged: its parameters are not finite")
    matrix = np.array(run.transform.GetMatrix()).reshape(3, 3)
    if np.linalg.det(matrix) <= 0:
        raise RegistrationError("the registration diverged: the affine result mirrors the other volume")
    singular = np.linalg.svd(matrix, compute_uv=False)
    if singular.max() > MAX_SCALE or singular.min() < 1 / MAX_SCALE:
        raise RegistrationError(f"the registration diverged: the affine result scales the other volume by "
                                f"{singular.min():.2f}..{singular.max():.2f} (allowed {1 / MAX_SCALE:g}..{MAX_SCALE:g})")
    fixed_centre, moving_centre = _centre(run.fixed), _centre(run.moving)
    lo = np.array(other.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    hi = np.array(other.TransformContinuousIndexToPhysicalPoint([n - 0.5 for n in other.GetSize()]))
    diagonal = float(np.linalg.norm(hi - lo))
    drift = float(np.linalg.norm(_map(run.transform, fixed_centre[None]) - _map(run.initial, fixed_centre[None])))
    if drift > MAX_DRIFT_FOV * diagonal:
        raise RegistrationError(f"the registration diverged: it moved the other volume {drift:.0f} mm from its start, "
                                f"more than {MAX_DRIFT_FOV:.0%} of its {diagonal:.0f} mm field of view")
    if not (_inside(other, _map(run.transform, fixed_centre[None]))[0]
            or _inside(mri, _unmap(run.transform, moving_centre[None]))[0]):
        raise RegistrationError("the registration diverged: it leaves the centre of each volume outside the other's "
                                "field of view")


def _check_overlap(run: _Run) -> float:
    overlap = _overlap(run)
    if overlap < MIN_OVERLAP:
        raise RegistrationError(f"the registration diverged: the registered volumes' foregrounds overlap only "
                                f"{overlap:.0%} (at least {MIN_OVERLAP:.0%} needed)")
    return overlap


def register(mri: sitk.Image, other: sitk.Image, kind: str = "rigid", progress: Progress | None = None,
             *, settings: Settings = SETTINGS) -> RegistrationResult:
    """Register ``other`` to ``mri`` (:func:`register_volumes`) and check the result can be trusted.

    Returns a :class:`RegistrationResult` with the alignment measure before (identity) and after.
    Raises :class:`RegistrationError` (one line) when the registration fails or diverges (see the
    module docstring: non-finite or absurd parameters, too little overlap, no shared information) or
    makes the alignment measure worse than leaving the volumes as they are. Inputs are not modified.
    """
    from .alignment import measure_alignment

    mri = check_volume(mri, "MRI", allow_rgb=True) if isinstance(mri, sitk.Image) else mri
    other = check_volume(other, "other volume", allow_rgb=True) if isinstance(other, sitk.Image) else other
    run = _register(mri, other, kind, progress, settings)
    _check_pose(run, mri, other)
    # The alignment measure takes scalar volumes: measure the luma of an RGB volume (as registered).
    mri_s = mri if mri.GetNumberOfComponentsPerPixel() == 1 else _luma(mri)
    other_s = other if other.GetNumberOfComponentsPerPixel() == 1 else _luma(other)
    before = measure_alignment(mri_s, other_s)
    after = measure_alignment(mri_s, other_s, run.transform)
    if after < MIN_MEASURE:
        raise RegistrationError(f"the registration found nothing to align: the volumes share almost no information "
                                f"(alignment measure {after:.3f} < {MIN_MEASURE} after registering)")
    overlap = _check_overlap(run)
    if after < (1 - WORSE_MARGIN) * before:
        raise RegistrationError(f"the registration made the alignment worse ({before:.3f} -> {after:.3f}); "
                                "the volumes are left as they are")
    return RegistrationResult(transform=run.transform, kind=kind, measure_before=before, measure_after=after,
                              seconds=run.seconds, overlap=float(overlap), initializer=run.initializer,
                              iterations=run.iterations, stop=run.stop)


def _luma(image: sitk.Image) -> sitk.Image:
    """Luma (float32) of an 8-bit RGB volume."""
    rgb = sitk.Cast(image, sitk.sitkVectorFloat32)
    return (0.299 * sitk.VectorIndexSelectionCast(rgb, 0) + 0.587 * sitk.VectorIndexSelectionCast(rgb, 1)
            + 0.114 * sitk.VectorIndexSelectionCast(rgb, 2))


def read_transform(path: str | Path) -> sitk.Transform:
    """Read an ITK transform file (.tfm, .txt, .h5, .mat). Raises RegistrationError (one line)."""
    from .fileio import captured_native_stderr

    p = Path(path)
    if not p.is_file():
        raise RegistrationError(f"transform {p} does not exist" if not p.exists() else f"transform {p} is not a file")
    with captured_native_stderr():
        try:
            transform = sitk.ReadTransform(str(p))
        except RuntimeError as exc:
            raise RegistrationError(f"cannot read transform {p}: {sitk_message(exc)}") from None
    if transform.GetDimension() != 3:
        raise RegistrationError(f"transform {p} is {transform.GetDimension()}-D; a 3-D transform is needed")
    return transform


def write_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write ``transform`` to an ITK transform file (.tfm / .txt / .h5 / .mat by extension) atomically:
    to a temporary beside it, read back and compared, then renamed into place. Raises
    RegistrationError for a format ITK cannot write, OutputError when the file cannot be written."""
    from .fileio import atomic_output, captured_native_stderr, check_output_file

    target = check_output_file(path, "transform")
    expected = np.array(transform.GetParameters(), float)

    def verify(tmp: Path) -> None:
        back = sitk.ReadTransform(str(tmp))
        if not np.allclose(np.array(back.GetParameters(), float), expected, rtol=1e-9, atol=1e-9):
            raise RegistrationError(f"transform {target} did not read back as written")

    with captured_native_stderr():
        try:
            with atomic_output(target, verify) as tmp:
                sitk.WriteTransform(transform, str(tmp))
        except RuntimeError as exc:
            raise RegistrationError(f"cannot write transform {target}: {sitk_message(exc)}") from None
    return target


TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".mat")


def check_transform_output(path: str | Path, inputs: list[Path] | tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, a transform output that ITK cannot write (by its extension), that is
    an input, or whose folder is missing or not writable."""
    from .fileio import check_output_file

    target = check_output_file(path, "transform file", tuple(inputs))
    if target.suffix.lower() not in TRANSFORM_SUFFIXES:
        raise RegistrationError(f"transform file {target} needs one of the extensions {', '.join(TRANSFORM_SUFFIXES)} "
                                "(ITK transform formats; .tfm is what Slicer and ITK use)")
    return target


def register_files(mri: str | Path, other: str | Path, output: str | Path, kind: str = "rigid",
                   progress: bool | Progress = False) -> RegistrationResult:
    """What ``lightfusion register`` does: read both volumes (files or DICOM series folders),
    :func:`register`, write the transform to ``output`` (checked before any work). ``progress=True``
    shows a tqdm bar over the pyramid levels. Raises LightFusionError subclasses (one line)."""
    from .fusion import progress_bar
    from .volumeio import read_volume

    mri_p, other_p = Path(mri), Path(other)
    target = check_transform_output(output, (mri_p, other_p))
    mri_img, other_img = read_volume(mri_p, "MRI"), read_volume(other_p, "other volume")
    with progress_bar(0, f"{kind} registration", progress, unit="level") as callback:
        result = register(mri_img, other_img, kind, callback)
    write_transform(result.transform, target)
    return result
