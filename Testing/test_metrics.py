"""Tests for LightFusionLib.metrics: conformance with the shared reference values + hand-checkable cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from LightFusionLib import metrics as M

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF_JSON = SHARED / "metrics" / "reference_values.json"
DATA = SHARED / "data" / "harvard" / "train"


def _load_reference() -> list[dict]:
    if not REF_JSON.is_file():
        return []
    return json.loads(REF_JSON.read_text())


def _read(path: Path) -> np.ndarray:
    sitk = pytest.importorskip("SimpleITK")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------ conformance
_REF = _load_reference()


@pytest.mark.skipif(not _REF, reason=f"shared reference values not found at {REF_JSON}")
@pytest.mark.parametrize("entry", _REF, ids=lambda e: f"{e['task']}-{e['pair']}-{e['fusion']}")
def test_reference_values(entry: dict) -> None:
    task = entry["task"]
    modality = task.split("-")[0]  # PET / SPECT / CT
    a_path = DATA / task / modality / entry["pair"]
    b_path = DATA / task / "MRI" / entry["pair"]
    if not (a_path.is_file() and b_path.is_file()):
        pytest.skip(f"shared image pair missing: {a_path} / {b_path}")
    a = M.to_luma(_read(a_path))
    b = M.to_luma(_read(b_path))
    if entry["fusion"] == "average":
        f = np.round((a + b) / 2)
    elif entry["fusion"] == "max":
        f = np.maximum(a, b)
    else:
        pytest.fail(f"unknown fusion {entry['fusion']}")
    got = M.evaluate_fusion(f, a, b)
    assert tuple(got) == M.METRIC_NAMES
    for name, expected in entry["metrics"].items():
        assert got[name] == pytest.approx(expected, rel=1e-4), name


# ------------------------------------------------------------------ hand-checkable cases
@pytest.fixture
def rand_img() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(48, 40)).astype(np.float64)


def test_to_luma() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # 76.245 -> 76
    rgb[0, 1] = (0, 255, 0)  # 149.685 -> 150
    rgb[1, 0] = (255, 255, 255)
    y = M.to_luma(rgb)
    assert y.shape == (2, 2) and y.dtype == np.float64
    np.testing.assert_array_equal(y, [[76, 150], [255, 0]])
    gray = np.array([[1.5, 2.0]], np.float32)
    np.testing.assert_array_equal(M.to_luma(gray), gray)


def test_entropy_two_values_is_one_bit() -> None:
    f = np.zeros((10, 10))
    f[:, 5:] = 200
    assert M.entropy(f) == pytest.approx(1.0)
    assert M.entropy(np.full((5, 5), 7.0)) == pytest.approx(0.0)


def test_standard_deviation() -> None:
    assert M.standard_deviation(np.full((8, 8), 42.0)) == 0.0
    f = np.zeros((4, 4))
    f[:, 2:] = 10
    assert M.standard_deviation(f) == pytest.approx(5.0)


def test_spatial_frequency_checkerboard() -> None:
    yy, xx = np.mgrid[:16, :16]
    f = 255.0 * ((yy + xx) % 2)
    # every horizontal and vertical neighbour difference is +-255
    assert M.spatial_frequency(f) == pytest.approx(255.0 * math.sqrt(2))
    assert M.spatial_frequency(np.full((6, 6), 3.0)) == 0.0


def test_average_gradient_ramp() -> None:
    f = 3.0 * np.tile(np.arange(10.0), (7, 1))  # Gx = 3 everywhere (also one-sided), Gy = 0
    assert M.average_gradient(f) == pytest.approx(3.0 / math.sqrt(2))


def test_mutual_information_identical() -> None:
    f = np.zeros((10, 10))
    f[:5] = 100
    # MI(F, F) = H(F) = ln 2 nats, twice
    assert M.mutual_information(f, f, f) == pytest.approx(2 * math.log(2))
    # independent halves: zero
    a = np.zeros((10, 10))
    a[:, :5] = 1
    assert M.mutual_information(f, a, a) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_value_relabelling(rand_img: np.ndarray) -> None:
    # MI only depends on which pixels share values: non-integer / wide-range values (generic
    # np.unique path) must give the same result as the 0-255 integer fast path.
    b = np.random.default_rng(5).integers(0, 256, rand_img.shape).astype(float)
    f = np.maximum(rand_img, b)
    ref = M.mutual_information(f, rand_img, b)
    assert ref > 0
    assert M.mutual_information(f / 3.7, rand_img * 1e4, np.sqrt(b) + 0.5) == pytest.approx(ref)


def test_correlation_and_scd(rand_img: np.ndarray) -> None:
    f = rand_img
    assert M.correlation_coefficient(f, f, f) == pytest.approx(1.0)
    assert M.correlation_coefficient(f, 255 - f, 255 - f) == pytest.approx(-1.0)
    # F = A + B: F - B = A and F - A = B, so SCD = 2
    a, b = f, np.random.default_rng(1).integers(0, 256, f.shape).astype(float)
    assert M.scd(a + b, a, b) == pytest.approx(2.0)


def test_psnr_known_value() -> None:
    f = np.full((8, 8), 200.0)
    a, b = f + 10, f - 10  # MSE = 100 for both
    assert M.psnr(f, a, b) == pytest.approx(10 * math.log10(200.0**2 / 100.0))


def test_ssim_identical_is_two(rand_img: np.ndarray) -> None:
    assert M.ssim(rand_img, rand_img, rand_img) == pytest.approx(2.0)
    assert M.ssim(rand_img, 255 - rand_img, rand_img) < 1.5


def test_vif_identical_is_two() -> None:
    f = np.random.default_rng(2).integers(0, 256, size=(64, 64)).astype(float)
    assert M.vif(f, f, f) == pytest.approx(2.0, rel=1e-6)
    # constant images give 0/0 -> NaN, counted as 1.0 per pair
    c = np.full((64, 64), 9.0)
    assert M.vif(c, c, c) == 2.0


def test_qabf_identical_near_max(rand_img: np.ndarray) -> None:
    # With F == A == B: orientation term is at its max, and (reference quirk) G = g_F, which is
    # >> 1 on a noisy 0-255 image, so the strength term saturates at Tg.
    qmax = 0.9994 * 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))
    q = M.qabf(rand_img, rand_img, rand_img)
    assert q == pytest.approx(qmax, rel=1e-3)
    assert q <= qmax + 1e-12
    assert M.qabf(np.zeros_like(rand_img), rand_img, rand_img) < 0.1


def test_evaluate_fusion_accepts_rgb() -> None:
    rng = np.random.default_rng(3)
    a_rgb = rng.integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    b = rng.integers(0, 256, size=(32, 32)).astype(np.uint8)
    f = np.maximum(M.to_luma(a_rgb), b)
    res = M.evaluate_fusion(f, a_rgb, b)
    assert tuple(res) == M.METRIC_NAMES
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.values())
    assert res == M.evaluate_fusion(f, M.to_luma(a_rgb), b.astype(float))
    with pytest.raises(ValueError):
        M.evaluate_fusion(f[:-1], a_rgb, b)


def test_tiny_images_do_not_crash() -> None:
    # coarse VIF scales become empty for images smaller than the windows: they contribute nothing
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 256, size=(20, 24)).astype(float) for _ in range(2))
    res = M.evaluate_fusion(np.maximum(a, b), a, b)
    assert all(math.isfinite(v) for v in res.values())
