"""Registration as a user runs it: ``lightfusion fuse --register``, ``--save-transform`` then
``--transform``, ``lightfusion register``, and refusals; on the bundled sample, whose PET was
simulated from the T1, so the true alignment is known exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.cli import main
from LightFusionLib.demo import sample_paths
from LightFusionLib.fusion import fuse_volumes

pytest.importorskip("onnxruntime")

# A known rigid move of the PET: 10 degrees about z, 6 about x, and (18, -12, 8) mm.
MOVE = (0.105, 0.0, 0.175, 18.0, -12.0, 8.0)


@pytest.fixture(scope="module")
def moved_pair(tmp_path_factory) -> tuple[Path, Path, sitk.Transform]:
    """(MRI file, PET file moved by MOVE, the move as MRI -> moved-PET points)."""
    folder = tmp_path_factory.mktemp("moved")
    mri_path, pet_path = sample_paths()
    mri, pet = sitk.ReadImage(str(mri_path)), sitk.ReadImage(str(pet_path))
    move = sitk.Euler3DTransform()
    move.SetCenter(mri.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in mri.GetSize()]))
    move.SetParameters(MOVE)
    # The moved PET's content at p is the original's at move(p): the original point q sits at move^-1(q).
    moved = sitk.Resample(pet, pet, move, sitk.sitkLinear, 0.0)
    sitk.WriteImage(moved, str(folder / "pet-moved.nrrd"))
    return mri_path, folder / "pet-moved.nrrd", move.GetInverse()


def tre_mm(found: sitk.Transform, truth: sitk.Transform, image: sitk.Image) -> float:
    """Median distance between where ``found`` and ``truth`` map the head's voxels (every 6th)."""
    arr = sitk.GetArrayViewFromImage(image)
    k, j, i = np.nonzero(arr[::6, ::6, ::6] > np.percentile(arr, 60))
    points = [image.TransformIndexToPhysicalPoint((int(a) * 6, int(b) * 6, int(c) * 6)) for a, b, c in zip(i, j, k)]
    return float(np.median([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                            for p in points]))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_unaligned_pair_warns_and_register_rigid_recovers_the_move(tmp_path, capsys, moved_pair):
    mri, pet, truth = moved_pair
    code, _, err = run(["fuse", str(mri), str(pet), "-o", str(tmp_path / "plain.nrrd"), "--quiet",
                        "--backend", "onnx"], capsys)
    assert code == 0 and "look misaligned" in err and "--register rigid" in err

    code, out, err = run(["fuse", str(mri), str(pet), "-o", str(tmp_path / "reg.nrrd"), "--quiet", "--backend",
                          "onnx", "--register", "rigid", "--save-transform", str(tmp_path / "t.tfm")], capsys)
    assert code == 0 and "misaligned" not in err, err
    assert "rigid registration" in out and "alignment measure" in out and "t.tfm" in out
    found = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    assert tre_mm(found, truth, sitk.ReadImage(str(mri))) < 2.0

    # The saved transform applied again gives the same fused volume as registering directly.
    code, _, err = run(["fuse", str(mri), str(pet), "-o", str(tmp_path / "again.nrrd"), "--quiet", "--backend",
                        "onnx", "--transform", str(tmp_path / "t.tfm")], capsys)
    assert code == 0 and "misaligned" not in err, err
    direct = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "reg.nrrd")))
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nrrd")))
    assert np.array_equal(direct, again)
    # ... and it is the fusion of the truly aligned pair, up to the registration's sub-voxel error.
    aligned = sitk.GetArrayFromImage(fuse_volumes(sitk.ReadImage(str(mri)), sitk.ReadImage(str(pet)), backend="onnx",
                                                  transform=truth)).astype(int)
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nrrd"))).astype(int)
    registered_error, plain_error = np.abs(direct - aligned).mean(), np.abs(plain - aligned).mean()
    assert registered_error < 0.2 * plain_error, (registered_error, plain_error)


def test_register_command_writes_a_transform_that_recovers_the_move(tmp_path, capsys, moved_pair):
    mri, pet, truth = moved_pair
    code, out, err = run(["register", str(mri), str(pet), "-o", str(tmp_path / "t.tfm"), "--quiet"], capsys)
    assert code == 0 and err == ""
    before, after = (float(v) for v in out.split("alignment measure ")[1].split(" (")[0].split(" -> "))
    assert after > 1.5 * before
    assert tre_mm(sitk.ReadTransform(str(tmp_path / "t.tfm")), truth, sitk.ReadImage(str(mri))) < 2.0


def test_register_none_is_byte_identical_to_no_registration(tmp_path, capsys, moved_pair):
    mri, pet, _ = moved_pair
    for name, extra in (("default.nrrd", []), ("none.nrrd", ["--register", "none"])):
        assert run(["fuse", str(mri), str(pet), "-o", str(tmp_path / name), "--quiet", "--backend", "onnx"] + extra,
                   capsys)[0] == 0
    assert (tmp_path / "default.nrrd").read_bytes() == (tmp_path / "none.nrrd").read_bytes()


def test_a_registration_that_finds_nothing_is_refused_in_one_line(tmp_path, capsys, moved_pair):
    mri, _, _ = moved_pair
    noise = sitk.GetImageFromArray(np.random.default_rng(0).random((60, 70, 60)).astype(np.float32))
    noise.SetSpacing((2.0, 2.0, 2.0))
    noise.SetOrigin((-60.0, -70.0, -60.0))
    sitk.WriteImage(noise, str(tmp_path / "noise.nrrd"))
    code, _, err = run(["fuse", str(mri), str(tmp_path / "noise.nrrd"), "-o", str(tmp_path / "f.nrrd"), "--quiet",
                        "--backend", "onnx", "--register", "rigid"], capsys)
    assert code == 2 and err.count("\n") == 1 and "registration" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.nrrd"]


@pytest.mark.parametrize("extra, words", [
    (["--register", "rigid", "--transform", "t.tfm"], "not both"),
    (["--save-transform", "t.tfm"], "needs --register"),
    (["--register", "rigid", "--save-transform", "t.png"], "extensions .tfm"),
    (["--transform", "missing.tfm"], "does not exist"),
])
def test_bad_registration_options_are_refused_before_any_work(tmp_path, capsys, moved_pair, extra, words):
    mri, pet, _ = moved_pair
    extra = [str(tmp_path / a) if a.endswith((".tfm", ".png")) else a for a in extra]
    code, _, err = run(["fuse", str(mri), str(pet), "-o", str(tmp_path / "f.nrrd"), "--quiet"] + extra, capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
