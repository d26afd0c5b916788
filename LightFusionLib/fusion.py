"""Volume fusion: an MRI and a co-registered PET / SPECT / CT volume in, one fused volume out.

One entry point, :func:`fuse_volumes` (SimpleITK images in and out), and its file wrapper
:func:`fuse_files` (what ``lightfusion fuse`` runs). Both go through :func:`prepare_pair` (check,
orient, window, resample; input warnings) and :func:`fuse_prepared` (planes through the network).

Pipeline
--------
1. Both volumes are checked (:func:`LightFusionLib.volumeio.check_volume`): 3-D, finite, not
   constant; the MRI scalar; the other scalar, or 8-bit RGB for PET/SPECT.
2. Suspicious inputs are warned about, never silently fused: a DICOM Modality that does not fit the
   argument order or the task (e.g. the MRI is a PT series: swapped?), a PET/SPECT holding
   Hounsfield-unit air (a CT?), an MRI that looks like a HU CT, a CT not in HU, a pair that is
   clearly not aligned (:mod:`LightFusionLib.alignment`), a PET covering little of the MRI.
3. Both volumes are taken to the canonical anatomical orientation (:mod:`LightFusionLib.geometry`),
   so the storage order of the voxels never changes the result.
4. Each volume's intensity window is decided from its own voxels (:mod:`LightFusionLib.windows`),
   before any resampling: cropping the MRI does not change how the PET or CT looks.
5. ``other`` is resampled onto the MRI grid (SimpleITK, linear); MRI voxels outside its field of
   view get its minimum. Volumes that do not overlap are refused. **Registration is not done
   here**: the volumes must already be aligned in physical space.
6. A scalar PET/SPECT is coloured (default: the training images' map, the task's), its luma Y
   fused with the MRI and put back with the original chroma
   (:func:`LightFusionLib.colour.replace_luma`). An 8-bit RGB PET/SPECT is used as is.
   ``colormap="none"`` fuses the windowed PET/SPECT as grayscale.
7. Planes along the anatomical ``axis`` go to the network in batches at ``plane_size`` x
   ``plane_size`` (256, the paper's resolution; :class:`LightFusionLib.geometry.PlaneGrid`) and
   back. A non-finite value is never cast to uint8: it stops the run with an error.
8. The result lies on the MRI grid exactly: RGB ``sitkVectorUInt8`` for PET/SPECT with a colour
   map or RGB input, otherwise scalar ``sitkUInt8`` (CT-MRI, ``colormap="none"``).

Planes that are blank in both inputs (all 0 after windowing) are not sent to the network; their
fused value is 0. Memory: the two normalised volumes and the output are held in full (11 bytes
per MRI voxel for coloured PET/SPECT, 9 for CT or grayscale); everything else is per batch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .backends import BACKENDS, BackendOutOfMemory, FusionBackend, load_backend
from .colormaps import NONE, apply_colormap, colormap_index, dense_luma_and_offsets, dense_table, lookup_table
from .colour import add_luma, check_colour_mode, luma, restore_colour
from .dicom import dicom_modality
from .errors import FusionCancelled, VolumeError
from .fileio import same_path
from .geometry import (NET_SIZE, PlaneGrid, canonical_view, check_axis, describe_bounds, resample_onto, slicing_axis,
                       to_canonical)
from .tasks import MRI_DICOM_MODALITIES, Task, get_task
from .volumeio import (check_output_format, check_output_path, check_volume, new_image_and_voxels, read_volume,
                       write_volume)
from .windows import apply_window, check_window, looks_like_hu, robust_window, voxel_sample

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
LOW_COVERAGE = 0.5  # warn when the other volume covers less of the MRI grid than this

__all__ = ["FusionCancelled", "VolumeError", "PreparedPair", "prepare_pair", "fuse_prepared", "fuse_volumes",
           "fuse_files", "FileFusion", "input_warnings"]


# ----------------------------------------------------------------------------------------------
# warnings about inputs that look wrong
# ----------------------------------------------------------------------------------------------
def input_warnings(mri: sitk.Image, other: sitk.Image, task: str | Task) -> list[str]:
    """Warnings (one line each) about a checked pair that is usable but looks wrong: the DICOM
    Modality against the argument order and the task; without headers, Hounsfield-unit air where it
    does not belong (only evidence that is reliable: no warning on any real aligned pair we test)."""
    task = get_task(task)
    found = []
    mri_modality, other_modality = dicom_modality(mri), dicom_modality(other)
    mri_is_mr = mri_modality is None or mri_modality in MRI_DICOM_MODALITIES
    other_is_mr = other_modality in MRI_DICOM_MODALITIES
    if not mri_is_mr and other_is_mr:  # one warning for the pair, not one per volume
        found.append(f"the MRI volume is a DICOM {mri_modality} series and the {task.modality} volume an MR "
                     "series: the two volumes look swapped (give the MRI first)")
    elif not mri_is_mr:
        found.append(f"the MRI volume is a DICOM {mri_modality} series, not MR")
    elif other_is_mr:
        found.append(f"the {task.modality} volume is a DICOM MR series; are the two volumes swapped "
                     "(the MRI goes first)?")
    if other_modality and not other_is_mr and other_modality not in task.dicom_modalities:
        expected = "/".join(task.dicom_modalities)
        found.append(f"the {task.modality} volume is a DICOM {other_modality} series, not {expected}; "
                     f"check --task (it is {task.name})")
    if other.GetNumberOfComponentsPerPixel() == 1:
        other_hu = looks_like_hu(voxel_sample(sitk.GetArrayViewFromImage(other)))
        if task.functional and other_hu and other_modality is None:
            found.append(f"the {task.modality} volume holds values below -500 like a CT in Hounsfield units; "
                         "check --task (ct-mri for a CT)")
        if task.window == "ct" and not other_hu and other_modality != "CT":
            found.append("the CT volume has no air below -500, so it does not look like Hounsfield units; it is "
                         "windowed like an MRI (give --other-window LO,HI to choose)")
    if mri_modality is None and looks_like_hu(voxel_sample(sitk.GetArrayViewFromImage(mri))):
        found.append("the MRI volume holds values below -500 like a CT in Hounsfield units; are the two volumes "
                     "swapped (the MRI goes first)?")
    return found


# ----------------------------------------------------------------------------------------------
# preparation: both volumes on the MRI grid, canonical orientation, normalised
# ----------------------------------------------------------------------------------------------
@dataclass
class PreparedPair:
    """Both volumes on the MRI grid in the canonical orientation; arrays are (K, J, I) = SimpleITK
    index of ``reference`` reversed.

    ``reference``: the MRI re-stored canonically (:func:`LightFusionLib.geometry.to_canonical`);
    ``mri_grid``: the MRI as given (the output's grid). ``mri_voxels``: the canonical MRI in its
    own units and type, a read-only view of ``reference``. ``other_voxels``: ``other`` on that grid
    in its own units, a read-only view (float32 with NaN outside its field of view when it was
    resampled, its own type when it was already on the grid; (K, J, I, 3) when RGB). Windowing to
    the network's [0, 1] happens a batch of planes at a time (:meth:`mri_unit`,
    :meth:`other_source`), so no full-size float copy of either volume is made; :attr:`mri` and
    :attr:`other` give whole windowed volumes for display and tests. ``lut``: (256, 3) colour map
    for a scalar ``other`` (None: grayscale). ``coverage``: fraction of MRI voxels inside
    ``other``'s field of view. Windows are in each volume's units. ``warnings``: one line each, see
    :func:`input_warnings`. ``transform``: MRI -> other physical points, applied when resampling
    (None: identity); ``registration``: what a registration found, when one ran.
    """

    reference: sitk.Image
    task: str
    mri_voxels: np.ndarray
    other_voxels: np.ndarray
    lut: np.ndarray | None
    colormap: str
    mri_window: tuple[float, float]
    other_window: tuple[float, float] | None
    coverage: float
    mri_grid: sitk.Image | None = None
    warnings: list[str] = field(default_factory=list)
    transform: sitk.Transform | None = None
    registration: object | None = None  # a registration.RegistrationResult when the pair was registered
    other_background: float = 0.0  # what NaN (outside the field of view) stands for, in other's units
    rgb_as_grey: bool = False  # an RGB other fused through its luma (colormap 'none')
    owners: tuple = ()  # the images whose buffers the voxel views read

    @property
    def rgb_output(self) -> bool:
        """True when the fused volume is RGB (coloured or RGB functional input)."""
        return self.lut is not None or (self.other_voxels.ndim == 4 and not self.rgb_as_grey)

    def mri_unit(self, voxels: np.ndarray) -> np.ndarray:
        """MRI voxels (any shape, from :attr:`mri_voxels`) -> float32 windowed to [0, 1] (a new array)."""
        return apply_window(np.array(voxels, np.float32), self.mri_window)

    def other_source(self, voxels: np.ndarray) -> np.ndarray:
        """Other voxels (from :attr:`other_voxels`) -> what the network's source is made of: float32
        [0, 1] (windowed scalar, or an RGB's luma with colormap 'none') or uint8 (..., 3) RGB."""
        values = np.array(voxels, np.float32)
        if self.coverage < 1.0:  # only a resampled volume that does not cover the grid holds NaN
            np.copyto(values, np.float32(self.other_background), where=np.isnan(values))
        if values.ndim == 4 and not self.rgb_as_grey:
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if values.ndim == 4:
            return apply_window(luma(values), (0.0, 255.0))
        return apply_window(values, self.other_window)

    @property
    def mri(self) -> np.ndarray:
        """The whole MRI windowed: float32 (K, J, I) in [0, 1] (a full-size copy)."""
        return self.mri_unit(self.mri_voxels)

    @property
    def other(self) -> np.ndarray:
        """The whole other volume as the network's source: float32 (K, J, I) in [0, 1] or uint8
        (K, J, I, 3) RGB (a full-size copy)."""
        return self.other_source(self.other_voxels)

    def other_colour(self, planes: np.ndarray) -> "ColourSource | None":
        """(N,H,W) windowed scalar or (N,H,W,3) RGB planes of ``other`` (from :meth:`other_source`)
        -> their :class:`ColourSource`, or None for a grayscale path."""
        if planes.ndim == 4:
            return ColourSource(planes.astype(np.float32))
        if self.lut is not None:
            return ColourSource(index=colormap_index(planes), lut=self.lut)
        return None

    def other_display(self) -> np.ndarray:
        """``other`` as the network's source image: (K,J,I,3) uint8 RGB or (K,J,I) uint8."""
        other = self.other
        if other.ndim == 4:
            return other
        if self.lut is not None:
            return np.rint(apply_colormap(other, self.lut)).astype(np.uint8)
        return np.rint(other * 255).astype(np.uint8)


class ColourSource:
    """The colours of a batch of PET/SPECT planes: their luma (what the network fuses) and the way
    back from a fused luma to colour. Either RGB planes, or positions on a colour map's dense table
    (a scalar volume coloured by the map): then the luma and, for 'yuv', the colour's luma-free
    part are looked up per position instead of computed per voxel (on 512x512 planes 2.5 ms a plane
    instead of 4.8)."""

    def __init__(self, rgb: np.ndarray | None = None, index: np.ndarray | None = None,
                 lut: np.ndarray | None = None) -> None:
        self._rgb, self.index, self.lut = rgb, index, lut
        self.luma = luma(rgb) if rgb is not None else np.take(dense_luma_and_offsets(lut)[0], index)

    @property
    def rgb(self) -> np.ndarray:
        """(N,H,W,3) float32 RGB on the 0-255 scale."""
        return self._rgb if self._rgb is not None else np.take(dense_table(self.lut), self.index, axis=0)

    def restore(self, fused_y: np.ndarray, mode: str) -> np.ndarray:
        """(N,H,W) fused luma (0-255) -> (N,H,W,3) uint8 (:func:`LightFusionLib.colour.restore_colour`)."""
        if mode == "yuv" and self.index is not None:
            return add_luma(np.take(dense_luma_and_offsets(self.lut)[1], self.index, axis=0), fused_y)
        return restore_colour(self.rgb, fused_y, self.luma, mode)


def _warn(found: list[str], message: str) -> None:
    found.append(message)
    log.warning(message)


def prepare_pair(mri: sitk.Image, other: sitk.Image, task: str = "pet-mri", colormap: str | None = None,
                 mri_window: tuple[float, float] | None = None,
                 other_window: tuple[float, float] | None = None,
                 check_alignment: bool = True, transform: sitk.Transform | None = None,
                 register: str = "none", register_progress: ProgressFn | None = None) -> PreparedPair:
    """Check both volumes, warn about suspicious ones, orient canonically, window each from its own
    voxels, resample ``other`` onto the MRI grid.

    ``transform``: maps MRI physical points to ``other``'s (ITK's convention, as a registration
    returns it and a .tfm file holds it); ``other`` is resampled through it. ``register``: 'rigid'
    or 'affine' registers ``other`` to the MRI first (:mod:`LightFusionLib.registration`;
    ``register_progress(level, levels)``), 'none' uses the volumes as they lie. ``check_alignment``:
    measure whether the pair is aligned and warn when it clearly is not (about 0.1-0.5 s; after a
    registration its own before/after measure is reported instead)."""
    task_info = get_task(task)
    task = task_info.name
    mri = check_volume(mri, "MRI")
    other = check_volume(other, task_info.modality, allow_rgb=task_info.functional)
    mri_window, other_window = check_window(mri_window, "MRI"), check_window(other_window, "other")
    rgb_in = other.GetNumberOfComponentsPerPixel() == 3
    cmap = (colormap or "").strip().lower() or None  # None: the task's default
    grayscale = cmap == NONE  # asked for explicitly
    if not task_info.functional and cmap not in (None, NONE):
        raise VolumeError(f"colour maps apply to PET/SPECT, not to {task_info.label}")
    if rgb_in and cmap not in (None, NONE):
        raise VolumeError(f"the {task_info.modality} volume is already RGB; a colour map applies to scalar volumes")
    if rgb_in and other_window is not None:
        raise VolumeError("an RGB volume is used as is; other_window applies to scalar volumes")
    lut = None
    if task_info.functional and not rgb_in and cmap != NONE:
        cmap = cmap or task_info.default_colormap
        lut = lookup_table(cmap)
    cmap = "rgb input" if rgb_in and not grayscale else (cmap or NONE)

    found: list[str] = []
    for message in input_warnings(mri, other, task_info):
        _warn(found, message)

    registration = None
    if register not in ("none", None):
        if transform is not None:
            raise VolumeError("give either a transform or a registration kind, not both")
        from .registration import register as run_registration

        registration = run_registration(mri, other, register, register_progress)
        transform = registration.transform
        log.info(registration.describe())

    reference = to_canonical(mri)
    other_c = to_canonical(other)
    resampled, coverage = resample_onto(reference, other_c, transform, mark_outside=True)
    if coverage == 0.0:
        raise VolumeError(f"the MRI {describe_bounds(mri)} and the {task_info.modality} volume {describe_bounds(other)} "
                          "do not overlap in physical space; if they show the same anatomy, register them (--register rigid)")
    if coverage < LOW_COVERAGE:
        _warn(found, f"the {task_info.modality} volume covers only {100 * coverage:.0f}% of the MRI grid; the rest "
                     "is fused with 0")
    if check_alignment and not rgb_in and registration is None:
        from .alignment import check_alignment as measure

        report = measure(mri, other, transform)
        if report.misaligned:
            _warn(found, report.describe("MRI", task_info.modality))

    # Views, not copies: the float [0, 1] planes are made a batch at a time (PreparedPair.mri_unit).
    mri_voxels = sitk.GetArrayViewFromImage(reference)
    other_voxels = sitk.GetArrayViewFromImage(resampled)
    mri_window = mri_window or robust_window(mri_voxels, "mri")
    other_background = float(sitk.GetArrayViewFromImage(other_c).min())
    if not rgb_in and other_window is None:  # from the volume's own voxels, not the part on the MRI grid
        hounsfield = True if dicom_modality(other) == "CT" else None
        other_window = robust_window(sitk.GetArrayViewFromImage(other_c), task_info.window, hounsfield)
    return PreparedPair(reference, task, mri_voxels, other_voxels, lut, cmap, mri_window,
                        other_window if not rgb_in else None, coverage, mri_grid=mri, warnings=found,
                        transform=transform, registration=registration, other_background=other_background,
                        rgb_as_grey=rgb_in and grayscale, owners=(reference, resampled))


# ----------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------
def resolve_backend(backend, model, task: str, device: str, half: bool = False) -> FusionBackend:
    """A loaded backend for ``backend`` (one of :data:`LightFusionLib.backends.BACKENDS`), or a ready backend object
    (checked to run a model of ``task``)."""
    if isinstance(backend, str):
        return load_backend(model, task, backend, device, half=half)
    if not callable(backend):
        raise TypeError(f"backend must be one of {', '.join(BACKENDS)} or a backend object, got {backend!r}")
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


def _check_options(axis: str, plane_size: int | None, batch_size: int | None) -> None:
    check_axis(axis)
    if plane_size is not None and plane_size < 16:
        raise VolumeError(f"plane size must be at least 16 pixels, got {plane_size}")
    if batch_size is not None and batch_size < 1:
        raise VolumeError(f"batch size must be at least 1, got {batch_size}")


def fuse_prepared(pair: PreparedPair, backend: FusionBackend, axis: str = "axial", batch_size: int | None = None,
                  progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                  plane_size: int | None = NET_SIZE, colour_mode: str | None = None,
                  host_threads: int | None = None) -> sitk.Image:
    """Fuse a :class:`PreparedPair` plane by plane; the result is on the MRI's own grid (see
    :func:`fuse_volumes`). ``colour_mode``: how the fused luma is coloured
    (:func:`LightFusionLib.colour.restore_colour`; None: its default). ``host_threads``: threads
    preparing and finishing batches of planes (window, colour, resample, merge) around the network
    (None: :func:`host_threads_for` the backend: 1 beside a CPU network, more beside a GPU's).
    The result does not depend on it."""
    _check_options(axis, plane_size, batch_size)
    host_threads = max(1, int(host_threads or host_threads_for(backend)))
    colour_mode = check_colour_mode(colour_mode)
    ref = pair.reference
    index_axis = slicing_axis(ref, axis)
    np_axis = 2 - index_axis  # numpy axes are the index axes reversed
    mri_planes = np.moveaxis(pair.mri_voxels, np_axis, 0)  # (N, H, W) views
    other_planes = np.moveaxis(pair.other_voxels, np_axis, 0)
    n, h, w = mri_planes.shape
    spacing = np.array(ref.GetSpacing())[::-1]  # per numpy axis
    grid = PlaneGrid((h, w), tuple(np.delete(spacing, np_axis)), plane_size)

    rgb = pair.rgb_output
    # The result is made in the MRI's own storage order, written through a canonical view of it:
    # no re-orientation copy at the end.
    grid_image = pair.mri_grid if pair.mri_grid is not None else ref
    # The planes are stored straight into the result image's voxels (no copy into an image at the end).
    image, out = new_image_and_voxels(grid_image, sitk.sitkVectorUInt8 if rgb else sitk.sitkUInt8, 3 if rgb else 1)
    out_canonical = canonical_view(out, grid_image) if pair.mri_grid is not None else out
    out_planes = np.moveaxis(out_canonical, np_axis, 0)
    chunk = int(batch_size or getattr(backend, "preferred_batch", 4))
    run = _Batcher(backend, chunk)

    def prepare_batch(start: int) -> tuple:
        """Planes start..start+chunk: windowed, coloured, on the network's grid."""
        stop = min(n, start + chunk)
        m = pair.mri_unit(mri_planes[start:stop])
        src = pair.other_source(other_planes[start:stop])
        colour = pair.other_colour(src)
        y = colour.luma / np.float32(255) if colour is not None else src
        # Planes blank in both inputs (outside the head) are not worth a network call.
        busy = (m.reshape(len(m), -1).max(1) > 0) | (y.reshape(len(y), -1).max(1) > 0)
        # B-spline overshoot is clipped: the network was trained on [0, 1] inputs.
        net_in = (np.clip(grid.to_net(m[busy]), 0, 1), np.clip(grid.to_net(y[busy]), 0, 1)) if busy.any() else None
        return start, stop, colour, busy, net_in

    def finish_batch(start: int, stop: int, colour, busy: np.ndarray, net_planes: np.ndarray | None) -> None:
        """Take the network's planes back to the plane grid, colour them and store them."""
        if net_planes is not None:
            # Never let a non-finite value reach the uint8 cast (it would become an arbitrary grey
            # level). Checked on the network's planes: resampling finite values gives finite ones.
            if not np.isfinite(net_planes).all():
                raise VolumeError(f"the fusion produced non-finite values in {axis} planes {start}-{stop - 1} "
                                  "(a damaged model file or an internal error); nothing was written")
            back = grid.from_net(net_planes)
        if net_planes is not None and busy.all():
            fused = back
        else:
            fused = np.zeros((stop - start, h, w), np.float32)
            if net_planes is not None:
                fused[busy] = back
        np.clip(fused, 0.0, 1.0, out=fused)
        if rgb:
            out_planes[start:stop] = colour.restore(fused * 255, colour_mode)
        else:
            out_planes[start:stop] = np.rint(fused * 255).astype(np.uint8)

    def cancelled(done: int) -> None:
        if cancel is not None and cancel():
            raise FusionCancelled(f"fusion cancelled after {done} of {n} {axis} planes")

    starts = range(0, n, chunk)
    with ThreadPoolExecutor(1, thread_name_prefix="lightfusion-net") as network:
        if host_threads == 1:
            # The network runs on its own thread, one batch behind, while this thread prepares the
            # next batch and finishes the previous one (numpy, SimpleITK and the backends release
            # the GIL).
            in_flight = None
            for start in starts:
                cancelled(in_flight[0] if in_flight else start)
                start, stop, colour, busy, net_in = prepare_batch(start)
                batch = (start, stop, colour, busy, network.submit(run, *net_in) if net_in else None)
                if in_flight is not None:
                    _finish_in_order(finish_batch, in_flight, progress, n)
                in_flight = batch
            if in_flight is not None:
                _finish_in_order(finish_batch, in_flight, progress, n)
        else:
            # Beside a GPU network the host's cores are free: each batch is prepared, run and
            # finished by one of ``host_threads`` threads (the batches write disjoint planes), at
            # most 2 per thread in flight; progress and cancel stay on the calling thread, in order.
            def whole_batch(start: int) -> int:
                start, stop, colour, busy, net_in = prepare_batch(start)
                finish_batch(start, stop, colour, busy, network.submit(run, *net_in).result() if net_in else None)
                return stop

            with ThreadPoolExecutor(host_threads, thread_name_prefix="lightfusion-host") as host:
                pending: list[Future] = []
                done = 0
                try:
                    for start in starts:
                        cancelled(done)
                        pending.append(host.submit(whole_batch, start))
                        while len(pending) >= 2 * host_threads:
                            done = pending.pop(0).result()
                            _report(progress, done, n)
                    while pending:
                        done = pending.pop(0).result()
                        _report(progress, done, n)
                finally:
                    for job in pending:
                        job.cancel()
    out = out_canonical = out_planes = None  # views of the image's buffer: none may outlive this call
    return image


def host_threads_for(backend: FusionBackend) -> int:
    """Host threads around ``backend``'s network: 1 when it runs on the CPU (its worker threads
    need the cores), up to 8 (leaving one core) when it runs on a GPU."""
    if not str(getattr(backend, "device", "cpu")).startswith("cuda"):
        return 1
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _finish_in_order(finish_batch, batch: tuple, progress: ProgressFn | None, total: int) -> None:
    start, stop, colour, busy, job = batch
    finish_batch(start, stop, colour, busy, job.result() if job is not None else None)
    _report(progress, stop, total)


def fuse_volumes(mri: sitk.Image, other: sitk.Image, task: str = "pet-mri", model: str | Path | None = None,
                 axis: str = "axial", backend: str | FusionBackend = "auto", device: str = "auto",
                 colormap: str | None = None, batch_size: int | None = None, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, mri_window: tuple[float, float] | None = None,
                 other_window: tuple[float, float] | None = None, plane_size: int | None = NET_SIZE,
                 half: bool = False, transform: sitk.Transform | None = None, register: str = "none",
                 colour_mode: str | None = None) -> sitk.Image:
    """Fuse a 3-D MRI with a PET / SPECT / CT volume; the result lies on the MRI grid.

    Args:
        mri: scalar 3-D image (K, J, I voxels); its grid (size, spacing, origin, direction) is the output's.
        other: scalar or 8-bit RGB 3-D image, any grid overlapping the MRI in physical space;
            resampled (linear) onto the MRI grid when the grids differ. It must already be registered.
        task: 'pet-mri', 'spect-mri' or 'ct-mri' (:data:`LightFusionLib.tasks.TASKS`).
        model: a model file (.pt or .onnx) instead of the task's shipped model.
        axis: 'axial', 'coronal' or 'sagittal', from the direction cosines; planes are cut in the
            canonical anatomical orientation, whatever the voxels' storage order.
        backend: 'auto' | 'torch' | 'onnx' | 'openvino', or a ready backend object (``backend(mri, other)`` on
            (N,H,W) float32 [0,1] arrays -> (N,H,W) fused luma), which then ignores model/device.
        device: 'auto' (CUDA when available) | 'cpu' | 'cuda'.
        colormap: PET/SPECT colour map (default: the task's), or 'none' for a grayscale fused volume.
        batch_size: planes per network call (default: the backend's preferred batch); halved and
            retried on device out-of-memory.
        progress: ``progress(done, total)`` after each batch of planes.
        cancel: polled before each batch; returning True raises :class:`FusionCancelled`.
        mri_window, other_window: (lo, hi) intensity windows in the volumes' units (default: from each
            volume's own voxels, see :mod:`LightFusionLib.windows`).
        plane_size: planes are run at plane_size x plane_size (aspect kept, padded); None = native size.
        half: fp16 inference (torch on CUDA only; within 1 grey level of fp32).
        transform: MRI -> ``other`` physical points (ITK's convention; e.g. from
            :func:`LightFusionLib.registration.register_volumes` or a .tfm file), applied to ``other``.
        register: 'none' (the volumes are aligned as they lie), 'rigid' or 'affine' (register
            ``other`` to the MRI first; see :func:`prepare_pair`).
        colour_mode: PET/SPECT colour restoration, 'yuv' (the paper's) or 'saturated'
            (:func:`LightFusionLib.colour.restore_colour`; None: its default). The fused luma is the same.

    Returns:
        SimpleITK image on the MRI grid: ``sitkVectorUInt8`` RGB for PET/SPECT (coloured or RGB
        input), ``sitkUInt8`` for CT-MRI or ``colormap='none'``. Input warnings go to the
        ``LightFusionLib`` logger (use :func:`prepare_pair` to get them as a list).

    Raises:
        VolumeError: unusable input (2-D/4-D, NaN/Inf, constant, no overlap, bad option).
        ModelError: a model file that does not load or was trained for another task.
        FusionCancelled: ``cancel()`` returned True.
    """
    task = get_task(task).name
    _check_options(axis, plane_size, batch_size)
    fuser = resolve_backend(backend, model, task, device, half)
    pair = prepare_pair(mri, other, task, colormap, mri_window, other_window, transform=transform, register=register)
    return fuse_prepared(pair, fuser, axis, batch_size, progress, cancel, plane_size, colour_mode)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
@dataclass
class FileFusion:
    """What :func:`fuse_files` did: output path, planes fused, seconds of fusion, backend used,
    coverage of the MRI grid, input warnings."""

    output: Path
    planes: int
    seconds: float
    backend: str
    coverage: float
    warnings: list[str] = field(default_factory=list)
    registration: object | None = None  # registration.RegistrationResult when --register ran
    transform_file: Path | None = None  # where the transform was saved

    @property
    def planes_per_second(self) -> float:
        return self.planes / self.seconds if self.seconds > 0 else float("inf")


def fuse_files(mri: str | Path, other: str | Path, output: str | Path, task: str = "pet-mri",
               model: str | Path | None = None, axis: str = "axial", backend: str | FusionBackend = "auto",
               device: str = "auto", colormap: str | None = None, batch_size: int | None = None,
               progress: bool | ProgressFn = False, cancel: CancelFn | None = None,
               mri_window: tuple[float, float] | None = None, other_window: tuple[float, float] | None = None,
               plane_size: int | None = NET_SIZE, half: bool = False, register: str = "none",
               transform: str | Path | sitk.Transform | None = None,
               save_transform: str | Path | None = None, colour_mode: str | None = None,
               compress: bool = False) -> FileFusion:
    """Read two volumes (any SimpleITK format or a DICOM series folder), fuse, write ``output``
    atomically and verified, in the format of its extension. ``progress=True`` shows tqdm bars.

    ``register`` ('none' | 'rigid' | 'affine') registers the other volume to the MRI first;
    ``transform`` (a .tfm file or a SimpleITK transform, MRI -> other points as ITK writes them)
    applies a saved or external one instead; ``save_transform`` writes the transform used (.tfm).
    Refuses the same file given twice and an output onto an input; on any error nothing is written
    and the inputs are untouched. ``compress``: zlib for .nrrd/.mha (see
    :func:`LightFusionLib.volumeio.write_volume`). Raises VolumeError / ModelError / FusionCancelled.
    """
    mri_p, other_p, out_p = Path(mri), Path(other), Path(output)
    task_info = get_task(task)
    _check_options(axis, plane_size, batch_size)
    if mri_p.exists() and other_p.exists() and same_path(mri_p, other_p):
        raise VolumeError(f"the MRI and the other volume are the same file ({mri_p}); give two different volumes")
    check_output_path(out_p, [mri_p, other_p])
    if register not in ("none", None) and transform is not None:
        raise VolumeError("give either --register or --transform, not both")
    if save_transform is not None:
        from .registration import check_transform_output

        check_transform_output(save_transform, [mri_p, other_p, out_p])
        if register in ("none", None) and transform is None:
            raise VolumeError("--save-transform needs --register rigid|affine or --transform")
    if isinstance(transform, (str, Path)):
        from .registration import read_transform

        transform = read_transform(transform)
    fuser = resolve_backend(backend, model, task_info.name, device, half)  # a model that does not load: before reading
    mri_img = read_volume(mri_p, "MRI")
    other_img = read_volume(other_p, task_info.modality)
    with progress_bar(0, "registering", progress if register not in ("none", None) else None,
                      unit="level") as register_progress:
        pair = prepare_pair(mri_img, other_img, task_info.name, colormap, mri_window, other_window,
                            transform=transform, register=register, register_progress=register_progress)
    check_output_format(out_p, pair.rgb_output)
    n = pair.reference.GetSize()[slicing_axis(pair.reference, axis)]

    with progress_bar(n, f"fusing ({fuser.describe()})", progress) as callback:
        t0 = time.perf_counter()
        fused = fuse_prepared(pair, fuser, axis, batch_size, callback, cancel, plane_size, colour_mode)
        seconds = time.perf_counter() - t0
    result = FileFusion(out_p, n, seconds, fuser.describe(), pair.coverage, list(pair.warnings), pair.registration)
    transform = pair.transform
    del pair, mri_img, other_img  # the inputs are not needed for the write: their memory is free for its check
    write_volume(fused, out_p, compress=compress)
    if save_transform is not None:
        from .registration import write_transform

        result.transform_file = write_transform(transform, save_transform)
    return result


@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: bool | ProgressFn | None, unit: str = "plane"):
    """Yield the ``progress(done, total)`` callback to use: a tqdm bar when ``progress`` is True
    (its total set from the first call when ``total`` is 0), the given callable as is, or None."""
    if progress is not True:
        yield progress if callable(progress) else None
        return
    from tqdm import tqdm

    with tqdm(total=total or None, unit=unit, desc=desc, leave=False) as bar:
        def update(done: int, total_now: int) -> None:
            if bar.total != total_now:
                bar.total = total_now
            bar.update(done - bar.n)

        yield update
