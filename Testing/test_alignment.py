"""The alignment check (LightFusionLib.alignment) on real data: it must warn on the porcine CT/MRI pair
(scans from different days, not co-registered) and on aligned pairs moved by known rigid transforms,
and must not warn on aligned pairs (SPM12 templates, the bundled sample), tiny moves, or partial fields
of view. Data: ``shared/data/realdata`` next to the repository (skipped when absent) and the bundled
sample in ``LightFusionLib/Resources/SampleData``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.alignment import (GAIN_THRESHOLD, REGISTER_HINT, AlignmentReport, check_alignment,
                                      measure_alignment)

from stand_ins import PORCINE_CENTRE, PORCINE_RIGID, REALDATA, SAMPLE  # noqa: E402


def _read(path: Path) -> sitk.Image:
    if not path.exists():
        pytest.skip(f"{path} not available")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def porcine() -> tuple[sitk.Image, sitk.Image]:
    """(T2 MRI, CT in HU) of the same pig head, not co-registered."""
    return _read(REALDATA / "porcine-head" / "mr-t2-dicom"), _read(REALDATA / "porcine-head" / "ct.nrrd")


_PAIRS = {
    # T1 (head, stored LAS) with smooth brain-only group templates; SPECT is stored RAS.
    "spm-pet": (REALDATA / "spm12" / "T1.nii", REALDATA / "spm12" / "PET.nii"),
    "spm-spect": (REALDATA / "spm12" / "T1.nii", REALDATA / "spm12" / "SPECT.nii"),
    # MNI T1 1.5 mm with a PET simulated from it on a 2.5 x 2.5 x 3 mm grid.
    "sample": (SAMPLE / "mni152-t1.nrrd", SAMPLE / "mni152-fdg-pet-sim.nrrd"),
}
_cache: dict[str, tuple[sitk.Image, sitk.Image]] = {}


def aligned_pair(name: str) -> tuple[sitk.Image, sitk.Image]:
    """(MRI, PET/SPECT) of an aligned pair, read once per session."""
    if name not in _cache:
        _cache[name] = tuple(_read(p) for p in _PAIRS[name])
    return _cache[name]


def _centre(image: sitk.Image) -> tuple[float, ...]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


def moved(image: sitk.Image, translation=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0)) -> sitk.Image:
    """``image`` resampled on its own grid through a rigid transform about its centre (known misalignment)."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(_centre(image))
    rigid.SetRotation(*(math.radians(a) for a in rotation_deg))
    rigid.SetTranslation(translation)
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, rigid, sitk.sitkLinear, background)


def shifted_origin(image: sitk.Image, shift_mm) -> sitk.Image:
    """``image`` with its content moved by ``shift_mm`` (the origin changed, no resampling)."""
    out = sitk.Image(image)
    out.SetOrigin([o + s for o, s in zip(image.GetOrigin(), shift_mm)])
    return out


def cropped(image: sitk.Image, margin_mm: float = 4.0, slab_axis: int | None = None, slab_mm: float = 0.0) -> sitk.Image:
    """``image`` cropped to its Otsu foreground's bounding box (plus margin), or to a slab of ``slab_mm``
    through the middle along ``slab_axis``: a partial field of view."""
    size = list(image.GetSize())
    if slab_axis is not None:
        keep = int(round(slab_mm / image.GetSpacing()[slab_axis]))
        lo = [0, 0, 0]
        lo[slab_axis] = (size[slab_axis] - keep) // 2
        size[slab_axis] = keep
        return sitk.RegionOfInterest(image, size, lo)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1))
    box = stats.GetBoundingBox(1)
    margin = [int(round(margin_mm / s)) for s in image.GetSpacing()]
    lo = [max(0, box[i] - margin[i]) for i in range(3)]
    hi = [min(size[i], box[i] + box[i + 3] + margin[i]) for i in range(3)]
    return sitk.RegionOfInterest(image, [h - l for l, h in zip(lo, hi)], lo)


def _explain(report: AlignmentReport) -> str:
    return f"gain {report.gain:+.3f} (threshold {GAIN_THRESHOLD}): {report.describe()}"


# ------------------------------------------------------------------------------------------------
# the real misaligned pair


def test_porcine_ct_vs_mri_warns(porcine):
    mri, ct = porcine
    report = check_alignment(mri, ct)
    assert report.misaligned, _explain(report)
    assert report.gain > 2 * GAIN_THRESHOLD, _explain(report)  # measured +0.45: not a near miss
    message = report.describe("MRI", "CT")
    assert "look misaligned" in message and REGISTER_HINT in message


def test_porcine_after_rigid_registration_does_not_warn(porcine):
    """What the registration feature will do: the same measure before and after, and no warning after."""
    mri, ct = porcine
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(PORCINE_CENTRE)
    rigid.SetParameters(PORCINE_RIGID)
    report = check_alignment(mri, ct, rigid)
    assert not report.misaligned, _explain(report)
    before, after = measure_alignment(mri, ct), measure_alignment(mri, ct, rigid)
    assert after > 1.5 * before  # measured 0.27 -> 0.67
    assert after == pytest.approx(report.score)


# ------------------------------------------------------------------------------------------------
# aligned pairs, as they are and moved by known amounts


@pytest.mark.parametrize("pair", list(_PAIRS))
def test_aligned_pairs_do_not_warn(pair):
    mri, other = aligned_pair(pair)
    report = check_alignment(mri, other)
    assert not report.misaligned, _explain(report)
    assert report.gain < -0.1, _explain(report)  # measured -0.12 .. -0.34: every offset clearly worse


# Translations along each axis, rotations about each axis, a combination, and a shifted origin.
_MISALIGNMENTS = {
    "25 mm x": dict(translation=(25, 0, 0)),
    "25 mm y": dict(translation=(0, -25, 0)),
    "25 mm z": dict(translation=(0, 0, 25)),
    "15 deg x": dict(rotation_deg=(15, 0, 0)),
    "15 deg y": dict(rotation_deg=(0, 15, 0)),
    "20 deg z": dict(rotation_deg=(0, 0, -20)),
    "20 mm + 15 deg": dict(translation=(20, 0, 0), rotation_deg=(0, 0, 15)),
}


# Every move on spm-spect (the pair with the smallest margins) and on the sample (different grids);
# spm-pet, which behaves like spm-spect with larger margins, gets the combined move (time budget).
@pytest.mark.parametrize("pair, move", [(pair, move) for pair in ("spm-spect", "sample") for move in _MISALIGNMENTS]
                         + [("spm-pet", "20 mm + 15 deg")])
def test_known_misalignments_warn(pair, move):
    mri, other = aligned_pair(pair)
    report = check_alignment(mri, moved(other, **_MISALIGNMENTS[move]))
    assert report.misaligned, _explain(report)


@pytest.mark.parametrize("pair", list(_PAIRS))
def test_shifted_origin_warns_and_points_back(pair):
    """Content moved 30 mm toward the patient's posterior (+y in LPS): the best offset moves it back."""
    mri, other = aligned_pair(pair)
    report = check_alignment(mri, shifted_origin(other, (0, 30, 0)))
    assert report.misaligned, _explain(report)
    assert report.best_offset.endswith("anterior"), report.best_offset


_TINY = {
    "3 mm x": dict(translation=(3, 0, 0)),
    "3 mm y": dict(translation=(0, 3, 0)),
    "3 mm z": dict(translation=(0, 0, 3)),
    "2 deg x": dict(rotation_deg=(2, 0, 0)),
    "2 deg y": dict(rotation_deg=(0, 2, 0)),
    "2 deg z": dict(rotation_deg=(0, 0, 2)),
    "2 mm + 2 deg on all axes": dict(translation=(2, 2, 2), rotation_deg=(2, 2, 2)),
}


# Every tiny move on spm-spect, the pair with the smallest margins (worst: -0.02, the combined move);
# the combined move on the others.
@pytest.mark.parametrize("pair, move", [("spm-spect", move) for move in _TINY]
                         + [(pair, "2 mm + 2 deg on all axes") for pair in ("spm-pet", "sample")])
def test_tiny_moves_do_not_warn(pair, move):
    mri, other = aligned_pair(pair)
    report = check_alignment(mri, moved(other, **_TINY[move]))
    assert not report.misaligned, _explain(report)


@pytest.mark.parametrize("crop", ["moving to foreground", "MRI to foreground", "moving 40 mm slab"])
@pytest.mark.parametrize("pair", list(_PAIRS))
def test_partial_field_of_view_does_not_warn(pair, crop):
    mri, other = aligned_pair(pair)
    if crop == "moving to foreground":
        other = cropped(other)
    elif crop == "MRI to foreground":
        mri = cropped(mri)
    else:
        other = cropped(other, slab_axis=2, slab_mm=40.0)
    report = check_alignment(mri, other)
    assert not report.misaligned, _explain(report)


# ------------------------------------------------------------------------------------------------
# API behaviour


def test_transform_is_fixed_to_moving():
    """``transform`` maps fixed points to moving points: undoing a known origin shift restores the score."""
    mri, pet = aligned_pair("spm-pet")
    shift = (0.0, 30.0, 0.0)
    undo = sitk.TranslationTransform(3, shift)
    assert measure_alignment(mri, shifted_origin(pet, shift), undo) == pytest.approx(measure_alignment(mri, pet), rel=1e-6)
    assert not check_alignment(mri, shifted_origin(pet, shift), undo).misaligned


def test_pixel_types():
    """Any scalar pixel type: the bundled MRI is uint8, SPECT int16; as float32 they score the same."""
    mri, pet = aligned_pair("sample")
    _, spect = aligned_pair("spm-spect")
    assert mri.GetPixelID() == sitk.sitkUInt8 and spect.GetPixelID() == sitk.sitkInt16
    as_float = measure_alignment(sitk.Cast(mri, sitk.sitkFloat64), pet)
    assert measure_alignment(mri, pet) == pytest.approx(as_float, rel=1e-3)
    assert measure_alignment(mri, sitk.Cast(sitk.RescaleIntensity(pet, 0, 30000), sitk.sitkUInt16)) == \
        pytest.approx(measure_alignment(mri, sitk.RescaleIntensity(pet, 0, 30000)), rel=0.02)


def test_inputs_unchanged(porcine):
    mri, ct = porcine
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(PORCINE_CENTRE)
    rigid.SetParameters(PORCINE_RIGID)

    def state(image: sitk.Image):
        return (sitk.GetArrayFromImage(image), image.GetPixelID(), image.GetOrigin(), image.GetSpacing(),
                image.GetDirection())

    before = [state(mri), state(ct)]
    check_alignment(mri, ct, rigid)
    measure_alignment(mri, ct, rigid)
    for (a, *geometry_a), (b, *geometry_b) in zip(before, [state(mri), state(ct)]):
        assert np.array_equal(a, b) and geometry_a == geometry_b
    assert rigid.GetParameters() == pytest.approx(PORCINE_RIGID) and rigid.GetCenter() == pytest.approx(PORCINE_CENTRE)


def test_describe_is_one_line_and_names_the_fix():
    mri, pet = aligned_pair("spm-pet")
    bad = check_alignment(mri, moved(pet, translation=(25, 0, 0))).describe("MRI", "PET")
    good = check_alignment(mri, pet).describe("MRI", "PET")
    for message in (bad, good):
        assert "\n" not in message and message.strip() == message
    assert "look misaligned" in bad and REGISTER_HINT in bad
    assert "look aligned" in good and REGISTER_HINT not in good


def test_no_overlap():
    mri, pet = aligned_pair("spm-pet")
    far = shifted_origin(pet, (1000.0, 0.0, 0.0))
    report = check_alignment(mri, far)
    assert report.misaligned and not report.overlap and report.score == 0.0
    assert measure_alignment(mri, far) == 0.0
    message = report.describe()
    assert "\n" not in message and "misaligned" in message and REGISTER_HINT in message


def test_rejects_non_scalar_or_non_3d():
    mri, _ = aligned_pair("sample")
    rgb = sitk.Compose([mri, mri, mri])
    with pytest.raises(ValueError, match="components"):
        check_alignment(mri, rgb)
    with pytest.raises(ValueError, match="3-D"):
        measure_alignment(mri[:, :, 50], mri[:, :, 60])
    with pytest.raises(ValueError, match="constant"):
        measure_alignment(mri, sitk.Image(mri.GetSize(), sitk.sitkFloat32))


# ------------------------------------------------------------------------------------------------
# large volumes: the coarse grid is capped, and the check still tells aligned from misaligned


@pytest.mark.parametrize("pair", ["spm-pet", "sample"])
def test_capped_coarse_grid_still_separates_aligned_from_misaligned(pair, monkeypatch):
    """A 512x512x400 MRI made 1.6 M voxels at 4 mm (13 evaluations: 2.5 s); the grid is now made
    coarser until it holds at most MAX_COARSE_VOXELS. Here the cap is lowered so that these
    brain volumes are capped the way a large one is, and the verdicts must stay right."""
    import LightFusionLib.alignment as alignment

    mri, other = aligned_pair(pair)
    full = np.prod(alignment._coarse(mri, "fixed").GetSize())
    monkeypatch.setattr(alignment, "MAX_COARSE_VOXELS", 20_000)
    capped = alignment._coarse(mri, "fixed")
    assert np.prod(capped.GetSize()) <= 20_000 < full
    assert not check_alignment(mri, other).misaligned
    assert check_alignment(mri, moved(other, translation=(25, 0, 0))).misaligned
    assert check_alignment(mri, moved(other, rotation_deg=(0, 0, -20))).misaligned


def test_the_native_shrink_decision_is_the_whole_volumes_even_where_a_sample_misses_the_range():
    from LightFusionLib.alignment import _coarse
    from LightFusionLib.windows import voxel_sample

    rng = np.random.default_rng(0)
    few_levels = rng.integers(0, 10, (260, 128, 128)).astype(np.int16)  # 10 grey levels: averaged as floats
    # (4 M voxels: the sample takes every other one)
    image = sitk.GetImageFromArray(few_levels)
    image.SetSpacing((1.0, 1.0, 1.0))
    averaged = sitk.GetArrayFromImage(_coarse(image, "fixed"))
    assert not np.allclose(averaged, np.round(averaged))
    # one bright voxel off the sample's stride gives the volume 1000 levels: block-averaged in int16
    with_outlier = few_levels.copy()
    with_outlier.reshape(-1)[1] = 1000
    assert voxel_sample(with_outlier).max() < 10
    image = sitk.GetImageFromArray(with_outlier)
    image.SetSpacing((1.0, 1.0, 1.0))
    averaged = sitk.GetArrayFromImage(_coarse(image, "fixed"))
    np.testing.assert_array_equal(averaged, np.round(averaged))
