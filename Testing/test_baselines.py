"""Tests for LightFusionLib.baselines."""

from __future__ import annotations

import numpy as np
import pytest

from LightFusionLib.baselines import BASELINES, fuse_average, fuse_laplacian, fuse_max


def test_average_and_max_exact() -> None:
    a = np.array([[0.0, 0.25], [1.0, 0.5]], np.float32)
    b = np.array([[1.0, 0.75], [0.0, 0.5]], np.float32)
    avg = fuse_average(a, b)
    mx = fuse_max(a, b)
    assert avg.dtype == np.float32 and mx.dtype == np.float32
    np.testing.assert_array_equal(avg, [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_array_equal(mx, [[1.0, 0.75], [1.0, 0.5]])


def test_registry() -> None:
    assert set(BASELINES) == {"average", "max", "laplacian"}
    assert BASELINES["laplacian"] is fuse_laplacian


@pytest.mark.parametrize("shape", [(64, 64), (37, 51), (3, 33, 20), (2, 17, 17), (5, 6)])
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_shapes_dtype_range(name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    b = rng.random(shape).astype(np.float32)
    out = BASELINES[name](a, b)
    assert out.shape == shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("shape", [(64, 64), (37, 51), (2, 33, 20)])
def test_laplacian_identity(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    np.testing.assert_allclose(fuse_laplacian(x, x), x, atol=1e-5)
    np.testing.assert_allclose(fuse_laplacian(x, x, levels=0), x, atol=1e-5)


def test_laplacian_batch_matches_single() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((3, 29, 40)).astype(np.float32)
    b = rng.random((3, 29, 40)).astype(np.float32)
    batch = fuse_laplacian(a, b)
    for i in range(3):
        np.testing.assert_allclose(batch[i], fuse_laplacian(a[i], b[i]), atol=1e-6)


def test_laplacian_keeps_stronger_edge() -> None:
    a = np.zeros((64, 63), np.float32)
    a[:, 32:] = 1.0  # step edge only in a
    b = np.full_like(a, 0.5)  # flat in b
    lap = fuse_laplacian(a, b)
    avg = fuse_average(a, b)
    jump_lap = lap[:, 32] - lap[:, 31]
    jump_avg = avg[:, 32] - avg[:, 31]
    np.testing.assert_allclose(jump_avg, 0.5)
    assert jump_lap.min() > 0.9  # near full contrast survives, unlike averaging


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        fuse_laplacian(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.float32))
