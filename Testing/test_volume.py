"""Volume fusion (LightFusionLib.fusion, geometry, windows, colormaps): geometry, resampling, slicing, windows, colour,
progress/cancel, out-of-memory fallback, bad input. Small synthetic volumes; the shipped models are
untrained placeholders, so nothing here depends on fused values, only on what the pipeline
guarantees around the network."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.backends import BackendOutOfMemory, load_backend
from LightFusionLib.colormaps import COLORMAPS, apply_colormap, lookup_table
from LightFusionLib.colour import rgb_to_yuv
from LightFusionLib.models import ModelError
from LightFusionLib.tasks import TASKS
from LightFusionLib.errors import FusionCancelled, LightFusionError, VolumeError
from LightFusionLib.fusion import fuse_files, fuse_volumes, prepare_pair
from LightFusionLib import geometry
from LightFusionLib.geometry import PlaneGrid, canonical_view, resample_onto, same_grid, slicing_axis, to_canonical
from LightFusionLib.volumeio import check_volume
from LightFusionLib.windows import CT_BRAIN_WINDOW, FUNCTIONAL_TOP_POSITION, robust_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBLIQUE = sitk.Euler3DTransform((0, 0, 0), 0.35, -0.2, 0.15).GetMatrix()  # ~20, 11, 9 degrees


@functools.lru_cache(maxsize=None)
def placeholder(task: str = "pet-mri"):
    """The task's shipped model on torch CPU (loaded once per test session)."""
    return load_backend(None, task, "torch", "cpu")


def image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None,
          vector: bool = False) -> sitk.Image:
    """(K,J,I[,3]) array -> SimpleITK image with the given geometry."""
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def head(shape=(8, 14, 12), seed: int = 0) -> np.ndarray:
    """(K,J,I) float32 'head': an ellipsoid of textured tissue on a 0 background."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = k**2 / 1.2 + j**2 + i**2 < 0.8
    rng = np.random.default_rng(seed)
    tissue = 100 + 60 * np.sin(5 * j) * np.cos(4 * i) + 10 * rng.standard_normal(shape)
    return np.where(inside, tissue, 0).astype(np.float32)


def cylinder(shape=(8, 14, 12), seed: int = 0) -> np.ndarray:
    """(K,J,I) float32: the same textured disc in every slice (no blank slices)."""
    return np.repeat(head((3,) + shape[1:], seed)[1:2], shape[0], axis=0)


def pair(shape=(8, 14, 12), spacing=(1.0, 1.2, 2.5), direction=OBLIQUE, origin=(5.0, -3.0, 7.0)):
    """An MRI and a PET on the same (oblique, anisotropic) grid."""
    mri = image(head(shape), spacing, origin, direction)
    pet = image(np.clip(head(shape, seed=1) / 20, 0, None), spacing, origin, direction)
    return mri, pet


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


# ----------------------------------------------------------------------------------------------
# geometry and resampling
# ----------------------------------------------------------------------------------------------
def test_output_lies_exactly_on_an_oblique_anisotropic_mri_grid():
    mri, pet = pair()
    # PET on its own grid: identity direction, coarser, shifted origin, bigger field of view.
    pet_grid = sitk.Resample(pet, [12, 14, 10], sitk.Transform(), sitk.sitkLinear, (-8.0, -10.0, -6.0),
                             (2.0, 2.0, 3.0), np.eye(3).ravel().tolist(), 0.0, sitk.sitkFloat32)
    fused = fuse_volumes(mri, pet_grid, backend=placeholder(), plane_size=None)
    assert_same_geometry(fused, mri)
    assert fused.GetPixelID() == sitk.sitkVectorUInt8 and fused.GetNumberOfComponentsPerPixel() == 3


def test_output_geometry_through_the_256_grid_and_every_axis():
    mri, pet = pair(shape=(5, 6, 7))
    for axis in ("axial", "coronal", "sagittal"):
        fused = fuse_volumes(mri, pet, backend=placeholder(), axis=axis, plane_size=32)
        assert_same_geometry(fused, mri)
    fused = fuse_volumes(mri, pet, backend=placeholder())  # default 256 path
    assert_same_geometry(fused, mri)


def test_ct_and_grayscale_fusion_give_scalar_uint8():
    mri, _ = pair()
    ct = image(np.where(head() > 0, 35.0, -1000.0).astype(np.float32) + head(seed=2) / 10,
               mri.GetSpacing(), mri.GetOrigin(), mri.GetDirection())
    out = fuse_volumes(mri, ct, task="ct-mri", backend=placeholder("ct-mri"), plane_size=None)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(out, mri)
    _, pet = pair()
    gray = fuse_volumes(mri, pet, colormap="none", backend=placeholder(), plane_size=None)
    assert gray.GetPixelID() == sitk.sitkUInt8


def test_resampling_onto_the_mri_grid_is_linear_in_physical_space():
    mri, _ = pair()
    # A linear function of physical position on a different grid is reproduced exactly by linear
    # interpolation, so the resampled values must equal the function at the MRI voxel centres.
    other = image(np.zeros((20, 20, 24), np.float32), (2.0, 2.5, 3.0), (-20.0, -20.0, -20.0))
    idx = np.indices(other.GetSize()[::-1]).reshape(3, -1)[::-1].T
    pts = np.array([other.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx])
    coef = np.array([0.5, -0.25, 2.0])
    other = image((pts @ coef + 10).reshape(other.GetSize()[::-1]).astype(np.float32),
                  other.GetSpacing(), other.GetOrigin())
    out, coverage = resample_onto(mri, other)
    assert coverage == 1.0
    assert same_grid(out, mri)
    idx = np.indices(mri.GetSize()[::-1]).reshape(3, -1)[::-1].T
    pts = np.array([mri.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx])
    expected = (pts @ coef + 10).reshape(mri.GetSize()[::-1])
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), expected, atol=1e-3)


def test_resampling_reports_partial_coverage_and_keeps_same_grids_untouched():
    mri, pet = pair(direction=None, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    half = image(np.ones((8, 14, 6), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # i < 6 of 12
    _, coverage = resample_onto(mri, half)
    assert coverage == pytest.approx(0.5)
    same, coverage = resample_onto(mri, pet)
    assert coverage == 1.0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(pet))


def test_resampling_of_grids_sharing_their_directions_is_simpleitks_to_float_precision():
    # The axis-aligned path (one banded matrix per index axis) against SimpleITK's own linear
    # Resample: the same values, the same field of view (NaN outside) and coverage, on grids with
    # the identity, a flipped, a permuted and an oblique direction, partly overlapping.
    import math

    rng = np.random.default_rng(1)
    oblique, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    directions = [np.eye(3), np.diag([1.0, 1.0, -1.0]), np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0.0]]), oblique]
    fast_path_used = 0
    for trial in range(24):
        direction = tuple(directions[trial % 4].ravel())
        mri = sitk.Image([int(n) for n in rng.integers(5, 40, 3)], sitk.sitkInt16)
        mri.SetSpacing(tuple(rng.uniform(0.4, 3, 3)))
        mri.SetOrigin(tuple(rng.uniform(-10, 10, 3)))
        mri.SetDirection(direction)
        other = sitk.GetImageFromArray((rng.normal(size=tuple(rng.integers(3, 30, 3))) * 100).astype(np.float32))
        other.SetSpacing(tuple(rng.uniform(0.4, 4, 3)))
        other.SetOrigin(tuple(rng.uniform(-15, 15, 3)))
        other.SetDirection(direction)
        want = sitk.GetArrayFromImage(sitk.Resample(other, mri, sitk.Transform(), sitk.sitkLinear, math.nan,
                                                    sitk.sitkFloat32))
        if np.isnan(want).all():
            continue
        fast_path_used += geometry._resample_axis_aligned(mri, other) is not None
        resampled, coverage = resample_onto(mri, other, mark_outside=True)
        assert same_grid(resampled, mri)
        got = sitk.GetArrayViewFromImage(resampled)  # a view: the image must stay alive
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], atol=1e-4)
        assert coverage == pytest.approx(np.mean(~np.isnan(want)), abs=1e-12)
    assert fast_path_used >= 18


def test_volumes_that_do_not_overlap_are_refused():
    mri, pet = pair()
    pet.SetOrigin((500.0, 0.0, 0.0))
    with pytest.raises(VolumeError, match="do not overlap"):
        fuse_volumes(mri, pet, backend=placeholder())


def test_slicing_axis_comes_from_direction_cosines_not_array_order():
    mri, _ = pair(direction=None)
    assert [slicing_axis(mri, a) for a in ("sagittal", "coronal", "axial")] == [0, 1, 2]
    mri.SetDirection(OBLIQUE)  # ~20 degrees off: same choice
    assert [slicing_axis(mri, a) for a in ("sagittal", "coronal", "axial")] == [0, 1, 2]
    mri.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS storage: same axes, flipped
    assert [slicing_axis(mri, a) for a in ("sagittal", "coronal", "axial")] == [0, 1, 2]
    # Sagittal acquisition: i runs posterior, j inferior, k left (rows = physical x, y, z).
    sag = (0, 0, 1, 1, 0, 0, 0, -1, 0)
    mri.SetDirection(sag)
    assert slicing_axis(mri, "axial") == 1
    assert slicing_axis(mri, "coronal") == 0
    assert slicing_axis(mri, "sagittal") == 2
    with pytest.raises(VolumeError, match="unknown axis"):
        slicing_axis(mri, "oblique")


def test_fusion_steps_through_the_planes_of_the_chosen_axis():
    mri, pet = pair(shape=(4, 6, 5), direction=(0, 0, 1, 1, 0, 0, 0, -1, 0))  # size (i,j,k) = (5, 6, 4)
    for axis, planes in (("axial", 6), ("coronal", 5), ("sagittal", 4)):
        calls = []
        fuse_volumes(mri, pet, backend=placeholder(), axis=axis, plane_size=None,
                     progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (planes, planes)


# ----------------------------------------------------------------------------------------------
# the 256 round trip
# ----------------------------------------------------------------------------------------------
def test_planes_keep_their_physical_aspect_ratio_and_are_centred_and_padded():
    # 40 rows x 100 columns of 2.0 x 1.0 mm: 80 x 100 mm -> 256 columns, 204.8 rows, padded.
    grid = PlaneGrid((40, 100), (2.0, 1.0), 256)
    net = grid.to_net(np.ones((1, 40, 100), np.float32))[0]
    rows = np.flatnonzero(net[:, 128] > 0.5)
    cols = np.flatnonzero(net[128] > 0.5)
    assert len(cols) == 256
    assert abs(len(rows) - 204.8) <= 2
    assert abs(rows[0] - (255 - rows[-1])) <= 1  # centred: equal padding above and below
    assert net[0].max() == 0 and net[-1].max() == 0  # padding is 0
    # A physical disc stays a disc whatever the pixel aspect.
    y, x = np.mgrid[0:40, 0:100]
    disc = (((y - 19.5) * 2.0) ** 2 + ((x - 49.5) * 1.0) ** 2 < 30**2).astype(np.float32)
    net = grid.to_net(disc[None])[0] > 0.5
    height, width = np.ptp(np.flatnonzero(net.any(1))), np.ptp(np.flatnonzero(net.any(0)))
    assert abs(height - width) <= 2


def test_round_trip_through_256_is_nearly_lossless_for_smooth_planes():
    y, x = np.mgrid[0:50, 0:70]
    planes = np.stack([0.5 + 0.4 * np.sin(x / 7 + k) * np.cos(y / 9) for k in range(3)]).astype(np.float32)
    for spacing in ((1.0, 1.0), (1.4, 0.8)):
        grid = PlaneGrid((50, 70), spacing, 256)
        back = grid.from_net(grid.to_net(planes))
        assert back.shape == planes.shape
        error = np.abs(back - planes)
        assert error[:, 1:-1, 1:-1].max() < 0.005  # measured: 0.0004 / 0.0017
        assert error.max() < 0.1  # outermost ring, where the content meets the zero padding: 0.02 / 0.08
    # planes larger than 256 are anti-aliased on the way down; the way back still fits the grid
    big = PlaneGrid((300, 400), (0.5, 0.5), 256)
    assert big.from_net(big.to_net(np.zeros((1, 300, 400), np.float32))).shape == (1, 300, 400)
    assert PlaneGrid((50, 70), (1.0, 1.0), None).to_net(planes).shape == planes.shape


def test_planes_are_resampled_independently_of_their_batch():
    rng = np.random.default_rng(0)
    planes = rng.random((5, 20, 30)).astype(np.float32)
    grid = PlaneGrid((20, 30), (1.0, 1.5), 64)
    together = grid.to_net(planes)
    alone = np.concatenate([grid.to_net(planes[k:k + 1]) for k in range(5)])
    np.testing.assert_array_equal(together, alone)


# ----------------------------------------------------------------------------------------------
# intensity windows
# ----------------------------------------------------------------------------------------------
def test_windows_are_per_volume_so_dim_slices_stay_dim():
    base = cylinder((6, 14, 12))
    scale = np.array([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], np.float32)[:, None, None]
    mri, pet = pair(shape=(6, 14, 12))
    mri = image(base * scale, mri.GetSpacing(), mri.GetOrigin(), mri.GetDirection())
    pet = image(np.clip(base / 20, 0, None) * scale, mri.GetSpacing(), mri.GetOrigin(), mri.GetDirection())
    p = prepare_pair(mri, pet)
    # The pair's arrays are in the canonical orientation: compare the slices' peaks in order of scale.
    peaks = np.sort(p.mri.reshape(6, -1).max(1))
    assert peaks[0] < 0.5 * peaks[3]  # per-slice normalisation would stretch every slice to 1
    np.testing.assert_allclose(peaks[:3] / peaks[3], [0.25, 0.5, 0.75], atol=0.05)
    other_peaks = np.sort(p.other.reshape(6, -1).max(1))
    np.testing.assert_allclose(other_peaks[:3] / other_peaks[3], [0.25, 0.5, 0.75], atol=0.05)


def test_default_windows_and_overrides():
    rng = np.random.default_rng(1)
    values = np.concatenate([np.zeros(5000), rng.uniform(5, 10, 5000)]).astype(np.float32)
    lo, hi = robust_window(values, "functional")
    assert lo == 0.0
    assert hi == pytest.approx(np.percentile(values[5000:], 99.5) / FUNCTIONAL_TOP_POSITION, rel=0.01)
    assert robust_window(values - 1000, "ct") == CT_BRAIN_WINDOW  # air present: Hounsfield units
    lo, hi = robust_window(values, "ct")  # no air: not HU, windowed like an MRI
    assert lo == 0.0 and hi == pytest.approx(np.percentile(values[5000:], 99.5), rel=0.01)
    mri, pet = pair()
    p = prepare_pair(mri, pet, mri_window=(0, 50), other_window=(1, 2))
    assert p.mri_window == (0.0, 50.0) and p.other_window == (1.0, 2.0)
    assert p.mri.min() >= 0 and p.mri.max() == 1.0
    with pytest.raises(VolumeError, match="lo < hi"):
        prepare_pair(mri, pet, mri_window=(5, 5))


# ----------------------------------------------------------------------------------------------
# colour
# ----------------------------------------------------------------------------------------------
def test_colour_maps_are_lookup_tables():
    for name in COLORMAPS:
        lut = lookup_table(name)
        assert lut.shape == (256, 3) and lut.min() >= 0 and lut.max() <= 255
    pet = lookup_table("harvard-pet")
    np.testing.assert_allclose(pet[0], [0, 0, 0])
    np.testing.assert_allclose(pet[-1], [255, 0, 255])  # hottest: magenta, like the training PET
    assert {t.name: t.default_colormap for t in TASKS.values()} == {"pet-mri": "harvard-pet", "spect-mri": "harvard-spect", "ct-mri": None}
    np.testing.assert_allclose(apply_colormap(np.array([-1.0, 0.0, 1.0, 2.0]), pet), pet[[0, 0, -1, -1]])
    # Between entries: linear interpolation (evaluated on a dense grid, so within 0.04 RGB units).
    values = np.random.default_rng(0).random(100_000)
    for name in COLORMAPS:
        lut = lookup_table(name)
        exact = np.stack([np.interp(values, np.linspace(0, 1, 256), lut[:, c]) for c in range(3)], -1)
        assert np.abs(apply_colormap(values, lut) - exact).max() < 0.04
    with pytest.raises(ValueError, match="unknown colour map"):
        lookup_table("viridis")


def _unclipped_uv_error(out: np.ndarray, source_rgb: np.ndarray) -> tuple[float, int]:
    """Max |U,V| difference between the fused RGB and its colour source over pixels that were not
    clipped to the RGB gamut (clipping legitimately moves U,V), and how many such pixels."""
    ok = ((out > 0) & (out < 255)).all(-1)
    diff = np.abs(rgb_to_yuv(out)[..., 1:] - rgb_to_yuv(source_rgb)[..., 1:])[ok]
    return float(diff.max()), int(ok.sum())


def test_colour_of_a_scalar_pet_is_carried_exactly():
    mri, pet = pair(shape=(4, 10, 9))
    p = prepare_pair(mri, pet)
    assert p.colormap == "harvard-pet"
    # a network-free fusion (the mean of the inputs): how many voxels clip depends on the network's
    # luma, not on the colour path under test
    from stand_ins import MeanBackend

    fused = fuse_volumes(mri, pet, backend=MeanBackend(), plane_size=None)
    out = sitk.GetArrayFromImage(to_canonical(fused))  # the pair's arrays are canonical
    coloured = apply_colormap(p.other, p.lut)
    error, n = _unclipped_uv_error(out, coloured)
    assert n > 0.1 * out[..., 0].size  # this map has many channels at 0 (black, blues): those are left out
    assert error < 0.7  # uint8 rounding of R, G, B moves U by at most 0.44 and V by at most 0.62
    # and every voxel is the source's colour under the fused luma, (MRI + PET luma) / 2 here
    from LightFusionLib.colour import luma, replace_luma

    fused_y = np.clip((p.mri + luma(coloured) / 255) / 2, 0, 1) * 255
    expected = replace_luma(coloured, fused_y, luma(coloured)).astype(int)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_an_rgb_pet_volume_is_used_as_is():
    mri, _ = pair(shape=(4, 10, 9))
    rgb = np.random.default_rng(4).integers(30, 220, (4, 10, 9, 3)).astype(np.uint8)
    pet = image(rgb, mri.GetSpacing(), mri.GetOrigin(), mri.GetDirection(), vector=True)
    out = fuse_volumes(mri, pet, task="spect-mri", backend=placeholder("spect-mri"), plane_size=None)
    assert out.GetNumberOfComponentsPerPixel() == 3
    error, n = _unclipped_uv_error(sitk.GetArrayFromImage(out), rgb)
    assert n > 0 and error < 0.7
    with pytest.raises(VolumeError, match="already RGB"):
        fuse_volumes(mri, pet, colormap="hot", backend=placeholder())
    assert fuse_volumes(mri, pet, colormap="none", backend=placeholder(), plane_size=None).GetPixelID() == sitk.sitkUInt8


# ----------------------------------------------------------------------------------------------
# batches, progress, cancel, out of memory, determinism
# ----------------------------------------------------------------------------------------------
class OutOfMemoryBackend:
    """The one fake: fuses by averaging, but 'runs out of device memory' for batches above ``limit``."""

    task, device, name, preferred_batch = "pet-mri", "fake", "fake", 8

    def __init__(self, limit: int) -> None:
        self.limit, self.sizes = limit, []

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        self.sizes.append(len(mri))
        if len(mri) > self.limit:
            raise BackendOutOfMemory("CUDA out of memory (simulated)")
        return (mri + other) / 2

    def describe(self) -> str:
        return "fake"


def test_out_of_memory_halves_the_batch_and_finishes():
    mri = image(cylinder((11, 8, 9)))
    pet = image(cylinder((11, 8, 9), seed=1) / 20)
    fake = OutOfMemoryBackend(limit=2)
    fused = fuse_volumes(mri, pet, backend=fake, batch_size=8, plane_size=None)
    assert fake.sizes[:3] == [8, 4, 2]  # halved until it fits ...
    assert max(fake.sizes[3:]) <= 2  # ... and stays small for the rest of the volume
    reference = fuse_volumes(mri, pet, backend=OutOfMemoryBackend(limit=99), batch_size=1, plane_size=None)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fused), sitk.GetArrayFromImage(reference))
    with pytest.raises(VolumeError, match="out of memory even for one plane"):
        fuse_volumes(mri, pet, backend=OutOfMemoryBackend(limit=0), plane_size=None)


class FailingBackend(OutOfMemoryBackend):
    """Fails with a model error on its second call (the network runs on its own thread)."""

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        if self.sizes:
            raise ModelError("model broke on the second batch (simulated)")
        return super().__call__(mri, other)


def test_an_error_on_the_network_thread_reaches_the_caller():
    mri = image(cylinder((11, 8, 9)))
    pet = image(cylinder((11, 8, 9), seed=1) / 20)
    calls = []
    with pytest.raises(ModelError, match="second batch"):
        fuse_volumes(mri, pet, backend=FailingBackend(limit=99), batch_size=4, plane_size=None,
                     progress=lambda done, total: calls.append(done))
    assert calls == [4]  # the first batch finished; nothing after the failure


def test_progress_reports_every_batch_and_cancel_stops(tmp_path):
    mri, pet = pair(shape=(7, 8, 9), direction=None)
    calls = []
    fuse_volumes(mri, pet, backend=placeholder(), batch_size=3, plane_size=None,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    calls.clear()
    with pytest.raises(FusionCancelled, match="after 3 of 7"):
        fuse_volumes(mri, pet, backend=placeholder(), batch_size=3, plane_size=None,
                     progress=lambda done, total: calls.append(done), cancel=lambda: bool(calls))
    # through files: a cancelled run writes nothing
    sitk.WriteImage(mri, str(tmp_path / "mri.nrrd"))
    sitk.WriteImage(pet, str(tmp_path / "pet.nrrd"))
    with pytest.raises(FusionCancelled):
        fuse_files(tmp_path / "mri.nrrd", tmp_path / "pet.nrrd", tmp_path / "out.nrrd", backend=placeholder(),
                   cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mri.nrrd", "pet.nrrd"]


def test_cpu_fusion_is_deterministic():
    mri, pet = pair(shape=(3, 9, 8))
    runs = [sitk.GetArrayFromImage(fuse_volumes(mri, pet, backend=placeholder(), plane_size=64)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_backend_for_another_task_is_refused():
    mri, pet = pair()
    with pytest.raises(VolumeError, match="ct-mri model, not pet-mri"):
        fuse_volumes(mri, pet, backend=placeholder("ct-mri"))


# ----------------------------------------------------------------------------------------------
# bad volumes (the file-level cases are in test_cli_volume.py)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arr, vector, message", [
    (np.ones((5, 6), np.float32), False, "2-D"),
    (None, False, "4-D"),
    (np.zeros((3, 4, 5), np.float32), False, "empty"),
    (np.full((3, 4, 5), 7, np.int16), False, "constant"),
    (np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan, 1).astype(np.float32), False, "1 NaN/Inf"),
    (np.where(np.arange(60).reshape(3, 4, 5) < 2, np.inf, 1).astype(np.float32), False, "2 NaN/Inf"),
    (np.ones((3, 4, 5, 2), np.uint8), True, "2 components"),
])
def test_unusable_volumes_are_refused(arr, vector, message):
    img = four_d(2) if arr is None else sitk.GetImageFromArray(arr, isVector=vector)
    with pytest.raises(VolumeError, match=message):
        check_volume(img, "PET", allow_rgb=True)


def four_d(frames: int) -> sitk.Image:
    """A 4-D scalar image (5 x 4 x 3 x frames), as a 4-D NIfTI reads."""
    return sitk.JoinSeries([sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5) + t)
                            for t in range(frames)])


def test_a_single_frame_4d_volume_is_accepted_and_an_rgb_mri_is_not():
    one_frame = four_d(1)
    assert one_frame.GetDimension() == 4
    assert check_volume(one_frame, "MRI").GetDimension() == 3
    rgb = sitk.GetImageFromArray(np.arange(180, dtype=np.uint8).reshape(3, 4, 5, 3), isVector=True)
    with pytest.raises(VolumeError, match="3 components"):
        check_volume(rgb, "MRI")


def test_bad_options_are_refused():
    mri, pet = pair()
    with pytest.raises(VolumeError, match="unknown axis"):
        fuse_volumes(mri, pet, axis="oblique", backend=placeholder())
    with pytest.raises(VolumeError, match="batch size"):
        fuse_volumes(mri, pet, batch_size=0, backend=placeholder())
    with pytest.raises(VolumeError, match="plane size"):
        fuse_volumes(mri, pet, plane_size=4, backend=placeholder())
    with pytest.raises(LightFusionError, match="unknown colour map"):
        fuse_volumes(mri, pet, colormap="viridis", backend=placeholder())
    with pytest.raises(VolumeError, match="not to CT-MRI"):
        fuse_volumes(mri, pet, task="ct-mri", colormap="hot", backend=placeholder("ct-mri"))


def test_plane_already_on_the_net_grid_is_not_resampled():
    planes = np.random.default_rng(0).random((2, 256, 256)).astype(np.float32)
    grid = PlaneGrid((256, 256), (0.9, 0.9), 256)
    assert np.array_equal(grid.to_net(planes), planes)
    assert np.array_equal(grid.from_net(planes), planes)
    # Anisotropic pixels still go through the resampler.
    assert not np.array_equal(PlaneGrid((256, 256), (0.9, 1.8), 256).to_net(planes)[:, 128], planes[:, 128])


# ------------------------------------------------------------------------------------------------
# memory: no full-size copies of the inputs, the result made in the MRI's own storage order


def _direction(perm, signs, tilt_deg=0.0):
    d = np.zeros((3, 3))
    for column, (row, sign) in enumerate(zip(perm, signs)):
        d[row, column] = sign
    t = np.radians(tilt_deg)  # an oblique volume: re-stored by the nearest axes
    tilt = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    return (tilt @ d).ravel().tolist()


@pytest.mark.parametrize("tilt", [0.0, 20.0])
def test_canonical_view_is_what_to_canonical_stores_for_every_orientation(tilt):
    import itertools

    rng = np.random.default_rng(0)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product([1, -1], repeat=3):
            voxels = rng.integers(0, 255, (5, 6, 7, 3)).astype(np.uint8)
            img = sitk.GetImageFromArray(voxels, isVector=True)
            img.SetDirection(_direction(perm, signs, tilt))
            expected = sitk.GetArrayFromImage(to_canonical(img))
            view = canonical_view(voxels, img)
            assert np.shares_memory(view, voxels)
            np.testing.assert_array_equal(view, expected)


def test_prepared_pair_holds_views_of_the_inputs_not_float_copies():
    """512x512x400 took 2.8 GB: float32 copies of both volumes beside their images. Now the pair
    holds read-only views in the volumes' own types, windowed a batch of planes at a time."""
    mri, pet = pair()
    mri = sitk.Cast(mri, sitk.sitkInt16)
    prepared = prepare_pair(mri, pet, "pet-mri", check_alignment=False)
    assert prepared.mri_voxels.dtype == np.int16 and not prepared.mri_voxels.flags.writeable
    assert not prepared.mri_voxels.flags.owndata and not prepared.other_voxels.flags.owndata
    # ... and the windowed volumes are exactly what the full-size conversion gave
    full = sitk.GetArrayFromImage(sitk.Cast(prepared.reference, sitk.sitkFloat32))
    lo, hi = prepared.mri_window
    np.testing.assert_array_equal(prepared.mri, np.clip((full - np.float32(lo)) * np.float32(1 / (hi - lo)), 0, 1))


def test_resampled_voxels_outside_the_field_of_view_are_the_background():
    mri, pet = pair(direction=None, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    half = image(np.full((8, 14, 6), 5.0, np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # i < 6 of 12
    half[0, 0, 0] = 1.0  # the volume's minimum: what outside voxels stand for
    prepared = prepare_pair(mri, half, "pet-mri", check_alignment=False, other_window=(0.0, 10.0))
    assert prepared.coverage == pytest.approx(0.5)
    assert np.isnan(prepared.other_voxels).any()
    other = prepared.other
    assert np.isfinite(other).all()
    outside = np.isnan(prepared.other_voxels)
    np.testing.assert_allclose(other[outside], 0.1)  # (1 - 0) / (10 - 0)


# ------------------------------------------------------------------------------------------------
# host threads: beside a GPU network the batches are prepared and finished on several threads


class _GpuLikeMean:
    """A stand-in network 'on a GPU' (device cuda): the mean of its inputs, with a delay."""

    name, device, preferred_batch, task = "fake", "cuda", 2, "pet-mri"

    def __call__(self, mri, other):
        import time

        time.sleep(0.002)
        return (np.asarray(mri, np.float32) + np.asarray(other, np.float32)) / 2

    def describe(self):
        return "fake on cuda"


def test_host_threads_beside_a_gpu_give_the_same_volume_progress_in_order_and_cancel():
    from LightFusionLib.fusion import fuse_prepared, host_threads_for

    mri, pet = pair()
    backend = _GpuLikeMean()
    assert host_threads_for(backend) >= 1 and host_threads_for(placeholder()) == 1
    prepared = prepare_pair(mri, pet, "pet-mri", check_alignment=False)
    one = sitk.GetArrayFromImage(fuse_prepared(prepared, backend, host_threads=1, plane_size=32))
    seen = []
    many = fuse_prepared(prepared, backend, host_threads=3, plane_size=32, progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(many), one)
    n = seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == n
    calls = []
    with pytest.raises(FusionCancelled, match="cancelled after"):
        fuse_prepared(prepared, backend, host_threads=3, plane_size=32, cancel=lambda: len(calls) > 2 or calls.append(1))


def test_new_image_and_voxels_writes_land_in_the_image_on_the_given_grid():
    from LightFusionLib.volumeio import new_image_and_voxels

    like = sitk.Image([5, 4, 3], sitk.sitkInt16)
    like.SetSpacing((0.5, 2.0, 3.0))
    like.SetOrigin((4.0, -5.0, 6.0))
    like.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    rgb, voxels = new_image_and_voxels(like, sitk.sitkVectorUInt8, 3)
    assert voxels.shape == (3, 4, 5, 3) and voxels.dtype == np.uint8 and not voxels.any()
    voxels[2, 1, 4] = (10, 20, 30)
    assert rgb.GetPixel(4, 1, 2) == (10, 20, 30)
    assert rgb.GetSpacing() == like.GetSpacing() and rgb.GetDirection() == like.GetDirection()
    grey, voxels = new_image_and_voxels(like, sitk.sitkUInt8)
    voxels[...] = 7
    assert grey.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayViewFromImage(grey).min() == 7
