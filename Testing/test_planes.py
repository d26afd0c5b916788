"""The round trip of planes to the network's 256x256 grid and back (:class:`PlaneGrid`).

The resampling runs as banded matrices with BLAS; it must give what SimpleITK's DiscreteGaussian +
Resample (the previous implementation, kept below as the reference) gave, keep every point where it
was (no half-pixel shift, off-centre and at an edge), work for any plane size down to 1 pixel, and
stay as faithful on real 512x512 planes as before.
"""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.geometry import PlaneGrid

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdata"
PIG_MRI = REALDATA / "porcine-head" / "mr-t2-dicom"


def sitk_round_trip(grid: PlaneGrid, planes: np.ndarray, to_net: bool) -> np.ndarray:
    """The previous implementation: SimpleITK plane by plane (DiscreteGaussian before shrinking)."""
    if to_net:
        return grid._resample(planes, ((grid.w, grid.h), (grid.sw, grid.sh), (0.0, 0.0)),
                              ((grid.size, grid.size), (grid.s, grid.s), (grid.ox, grid.oy)), smooth=True)
    return grid._resample(planes, ((grid.size, grid.size), (grid.s, grid.s), (grid.ox, grid.oy)),
                          ((grid.w, grid.h), (grid.sw, grid.sh), (0.0, 0.0)), smooth=False)


def smooth_planes(shape, n=2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    phase = rng.random(n)[:, None, None] * 6
    return (0.5 + 0.4 * np.sin(xx / 6 + phase) * np.cos(yy / 5)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the same values as SimpleITK
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, spacing", [
    ((512, 512), (0.5, 0.5)),  # 2x down and up
    ((40, 100), (2.0, 1.0)),  # padded rows, anisotropic pixels
    ((300, 400), (0.5, 0.5)),  # shrink by a non-integer factor, padded
    ((110, 134), (1.2, 1.0)),  # the bundled sample's size
    ((20, 27), (1.0, 1.5)),  # 16-30 samples: the spline prefilter's exact start
    ((600, 90), (0.3, 2.0)),  # long thin, shrunk along one axis and enlarged along the other
    ((256, 256), (0.9, 1.8)),  # the net size, but anisotropic pixels
    ((5, 60), (1.0, 1.3)), ((4, 4), (1.0, 1.0)),
])
@pytest.mark.parametrize("interpolator", [sitk.sitkBSpline, sitk.sitkLinear])
def test_planes_are_resampled_as_simpleitk_did(shape, spacing, interpolator):
    rng = np.random.default_rng(1)
    grid = PlaneGrid(shape, spacing, interpolator=interpolator)
    for planes in (rng.random((2,) + shape, np.float32), rng.random((2,) + shape + (3,), np.float32)):
        net = grid.to_net(planes)
        np.testing.assert_allclose(net, sitk_round_trip(grid, planes, True), rtol=0, atol=1e-5)
        np.testing.assert_allclose(grid.from_net(net), sitk_round_trip(grid, net, False), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 50), (2, 50), (50, 2), (3, 40), (1, 1), (2, 2), (1, 2), (3, 3)])
def test_planes_under_4_pixels_are_resampled_as_simpleitk_did_linearly(shape):
    planes = smooth_planes(shape)
    grid = PlaneGrid(shape, (1.0, 1.3))
    assert grid.interpolator == sitk.sitkLinear  # SimpleITK's cubic B-spline read outside such planes
    net = grid.to_net(planes)
    np.testing.assert_allclose(net, sitk_round_trip(grid, planes, True), rtol=0, atol=1e-5)
    np.testing.assert_allclose(grid.from_net(net), sitk_round_trip(grid, net, False), rtol=0, atol=1e-5)


def test_other_interpolators_still_run_through_simpleitk():
    planes = smooth_planes((30, 40))
    grid = PlaneGrid((30, 40), (1.0, 1.0), 64, interpolator=sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(grid.to_net(planes), sitk_round_trip(grid, planes, True))


# ----------------------------------------------------------------------------------------------
# no shift
# ----------------------------------------------------------------------------------------------
def net_position(grid: PlaneGrid, row: float, col: float) -> tuple[float, float]:
    """Net-grid pixel coordinates of a plane position (pixel-centre coordinates both)."""
    return (row * grid.sh - grid.oy) / grid.s, (col * grid.sw - grid.ox) / grid.s


def centroid(image: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    return float((yy * image).sum() / image.sum()), float((xx * image).sum() / image.sum())


@pytest.mark.parametrize("shape, spacing", [((512, 512), (0.5, 0.5)), ((40, 100), (2.0, 1.0)),
                                            ((300, 400), (0.5, 0.5)), ((90, 70), (1.0, 1.3))])
def test_an_off_centre_point_stays_where_it_is(shape, spacing):
    grid = PlaneGrid(shape, spacing)
    row, col = 0.31 * shape[0] + 0.37, 0.68 * shape[1] - 0.21  # well off the centre, between pixel centres
    sigma = max(shape) / 40  # a blob a few net pixels wide, smooth enough for any of these grids
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    blob = np.exp(-(((yy - row) * spacing[0]) ** 2 + ((xx - col) * spacing[1]) ** 2)
                  / (2 * (sigma * max(spacing)) ** 2)).astype(np.float32)[None]
    net = grid.to_net(blob)[0]
    expected = net_position(grid, row, col)
    assert np.allclose(centroid(np.clip(net, 0, None)), expected, atol=0.01)  # net pixels
    back = grid.from_net(net[None])[0]
    assert np.allclose(centroid(np.clip(back, 0, None)), (row, col), atol=0.01)  # plane pixels


def edge_position(profile: np.ndarray, start: int) -> float:
    """Where a profile falling from 1 (at ``start`` and before) to 0 has its edge, in sample
    coordinates: the area under it from ``start`` on (exact for a step between two samples, and for
    any smooth symmetric edge, which a crossing found between samples is not)."""
    return start - 0.5 + float(profile[start:].sum())


@pytest.mark.parametrize("shape, spacing, width", [
    ((512, 512), (0.5, 0.5), 0),  # a hard edge: between two pixel centres, half-way between two net ones
    ((512, 512), (0.5, 0.5), 2), ((64, 300), (2.0, 0.4), 2), ((100, 60), (1.0, 1.0), 2), ((40, 100), (2.0, 1.0), 3),
])
def test_an_off_centre_edge_stays_where_it_is(shape, spacing, width):
    grid = PlaneGrid(shape, spacing)
    cols = np.arange(shape[1])
    if width == 0:
        edge = int(0.3 * shape[1]) + 0.5  # columns up to int(0.3 W) bright
        profile = (cols < edge).astype(np.float32)
    else:  # a smooth edge (tanh, ``width`` pixels), so that the crossing between samples is exact
        edge = 0.3 * shape[1] + 0.37
        profile = (0.5 - 0.5 * np.tanh((cols - edge) / width)).astype(np.float32)
    planes = np.broadcast_to(profile, (1,) + shape)
    net = grid.to_net(planes)[0]
    mid = shape[0] // 2
    net_row = int(round(net_position(grid, mid, 0)[0]))
    net_start = int(np.ceil(net_position(grid, mid, 0.1 * shape[1])[1]))  # well inside the plane, left of the edge
    assert edge_position(net[net_row], net_start) == pytest.approx(net_position(grid, mid, edge)[1], abs=0.01)
    back = grid.from_net(net[None])[0]
    assert edge_position(back[mid], int(0.1 * shape[1])) == pytest.approx(edge, abs=0.01)  # plane pixels


def test_the_net_grid_is_the_plane_centred_with_its_aspect_kept():
    grid = PlaneGrid((40, 100), (2.0, 1.0))  # 80 x 100 mm: 1 net pixel = 100 / 256 mm
    assert grid.s == pytest.approx(100 / 256)
    # the plane's centre (19.5, 49.5) is the net grid's centre (127.5, 127.5)
    assert net_position(grid, 19.5, 49.5) == pytest.approx((127.5, 127.5))
    # its outer pixel edges are the net grid's edges along the long side, 25.1 net pixels in along the short one
    assert net_position(grid, 0, -0.5)[1] == pytest.approx(-0.5)
    assert net_position(grid, -0.5, 0)[0] == pytest.approx(-0.5 + (256 - 80 / grid.s) / 2)


# ----------------------------------------------------------------------------------------------
# any plane size; how faithful
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 50), (50, 1), (2, 200), (3, 3), (5, 7),
                                   (17, 23), (29, 31), (196, 3)])
def test_any_plane_size_round_trips_finite_and_faithful(shape):
    grid = PlaneGrid(shape, (1.0, 1.3))  # each plane pixel at least one net pixel: nothing to lose
    planes = smooth_planes(shape, 3)
    net = grid.to_net(planes)
    back = grid.from_net(net)
    assert net.shape == (3, 256, 256) and back.shape == planes.shape
    assert np.isfinite(net).all() and np.isfinite(back).all()
    assert np.abs(back - planes).max() < 0.05
    constant = np.full((1,) + shape, 0.7, np.float32)  # the spline rings a little where the content meets the padding
    assert np.abs(grid.from_net(grid.to_net(constant)) - 0.7).max() < 0.01


@pytest.mark.parametrize("shape", [(1, 512), (512, 1), (2, 700), (700, 3), (1, 4000)])
def test_long_thin_planes_stay_finite_and_keep_a_constant(shape):
    # The short side is a net pixel or less (aspect kept), so detail across it is lost, but the plane is
    # not: SimpleITK's resampling gave an all-zero net plane for the thinnest (1 x 512 here).
    grid = PlaneGrid(shape, (1.0, 1.3))
    planes = smooth_planes(shape, 2)
    back = grid.from_net(grid.to_net(planes))
    assert np.isfinite(back).all() and back.min() > -0.1 and back.max() < 1.1
    constant = np.full((1,) + shape, 0.7, np.float32)
    assert np.abs(grid.from_net(grid.to_net(constant)) - 0.7).max() < 1e-4


def test_batches_views_and_empty_stacks_give_the_same_planes():
    rng = np.random.default_rng(0)
    volume = rng.random((40, 7, 30), np.float32)  # (H, N, W): planes are a strided view
    planes = np.moveaxis(volume, 1, 0)
    grid = PlaneGrid((40, 30), (1.0, 1.5), 64)
    together = grid.to_net(planes)
    np.testing.assert_array_equal(together, np.concatenate([grid.to_net(planes[k:k + 1]) for k in range(7)]))
    np.testing.assert_array_equal(together, grid.to_net(np.ascontiguousarray(planes).astype(np.float64)))
    assert grid.to_net(planes[:0]).shape == (0, 64, 64) and grid.from_net(together[:0]).shape == (0, 40, 30)
    threaded = PlaneGrid((40, 30), (1.0, 1.5), 64, threads=3)  # runs of planes on 3 threads: the same planes
    np.testing.assert_array_equal(threaded.to_net(planes), together)
    np.testing.assert_array_equal(threaded.from_net(together), grid.from_net(together))
    with pytest.raises(ValueError, match="shape"):
        grid.to_net(planes[:, :, :29])


def test_numpy_blas_threads_are_given_back():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()]
    grid = PlaneGrid((300, 300), (0.5, 0.5))
    grid.from_net(grid.to_net(np.ones((2, 300, 300), np.float32)))
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info()] == before


@pytest.mark.skipif(not PIG_MRI.is_dir(), reason="real data not present (../shared/data/realdata)")
def test_round_trip_of_real_512_planes_is_as_faithful_as_before():
    from LightFusionLib.geometry import to_canonical
    from LightFusionLib.volumeio import read_volume
    from LightFusionLib.windows import apply_window, robust_window

    image = to_canonical(read_volume(PIG_MRI, "MRI"))  # 512x512x94 T2, 0.5 x 0.5 mm
    volume = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    apply_window(volume, robust_window(volume, "mri"))
    planes = volume[30:94:8]  # 8 axial planes through the head
    grid = PlaneGrid(planes.shape[1:], (image.GetSpacing()[1], image.GetSpacing()[0]))
    back = grid.from_net(grid.to_net(planes))
    error = np.abs(back - planes) * 255  # grey levels
    # Measured on all 94 planes: mean 1.057, 99th percentile 12.55 grey levels, the same as SimpleITK
    # (the detail a 256 grid cannot hold); these 8: mean 1.3, p99 13.4.
    assert error.mean() < 1.4 and np.percentile(error, 99) < 14
    np.testing.assert_allclose(back, sitk_round_trip(grid, sitk_round_trip(grid, planes, True), False),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# where the time goes: the benchmark's stage table
# ----------------------------------------------------------------------------------------------
def test_benchmark_stage_table_splits_host_work_from_the_network(tmp_path):
    pytest.importorskip("onnxruntime")
    from LightFusionLib.backends import load_backend
    from LightFusionLib.benchmark import HOST_STAGES, STAGES, format_stages, synthetic_pair, warm_stages

    mri, pet = synthetic_pair((40, 36, 24), tmp_path)
    stages = warm_stages(load_backend(None, "pet-mri", "onnx", "cpu"), mri, pet, tmp_path / "fused.nrrd", "pet-mri")
    assert all(stages[k] >= 0 for k in STAGES)
    assert stages["host"] == pytest.approx(sum(stages[k] for k in HOST_STAGES), abs=0.01)
    assert 0 < stages["network_planes"] <= 24 and stages["network_plane_size"] == [256, 256]
    assert (tmp_path / "fused.nrrd").is_file() and "host" in format_stages({"stages": stages})


def test_openvino_runtime_measured_beside_onnx_runtime_gives_the_same_planes():
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    from LightFusionLib.backends import OpenVinoBackend, load_backend, onnx_metadata
    from LightFusionLib.models import ModelError, shipped_model_path

    path = shipped_model_path("pet-mri", ".onnx")
    assert onnx_metadata(path)["lightfusion_task"] == "pet-mri"
    rng = np.random.default_rng(0)
    mri, other = rng.random((2, 3, 40, 56), np.float32)
    fused = OpenVinoBackend("pet-mri", path)(mri, other)
    np.testing.assert_allclose(fused, load_backend(None, "pet-mri", "onnx", "cpu")(mri, other), atol=1e-5)
    with pytest.raises(ModelError, match="trained for pet-mri"):
        OpenVinoBackend("ct-mri", path)
