"""Trust on real data: each defect that gave a plausible but wrong volume (or a damaged file) with
exit 0 has a test here that failed before its fix, most of them on the real scans of
../shared/data/realdata (SPM templates, a pig head's CT and MRI, a PET phantom's DICOM series)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.backends import load_backend
from LightFusionLib.cli import main
from LightFusionLib.errors import VolumeError
from LightFusionLib.fileio import OutputError, remove_stale_temp_files
from LightFusionLib.fusion import fuse_files, fuse_prepared, fuse_volumes, prepare_pair
from LightFusionLib.geometry import PlaneGrid, same_grid
from LightFusionLib.volumeio import check_volume, read_volume, write_volume
from LightFusionLib.windows import CT_BRAIN_WINDOW
from stand_ins import NEMA_PET, PORCINE_CT, PORCINE_MR, SPM, MeanBackend, needs_realdata

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_pet():
    pytest.importorskip("onnxruntime")
    return load_backend(None, "pet-mri", "onnx", "cpu")


@pytest.fixture(scope="module")
def porcine():
    if not PORCINE_MR.is_dir():
        pytest.skip("realdata not present")
    return read_volume(PORCINE_MR, "MRI"), read_volume(PORCINE_CT, "CT")


def crop_physical(image: sitk.Image, fraction: float) -> sitk.Image:
    """The central ``fraction`` of ``image`` in i and j (all of k): a tightly cropped MRI, same
    physical voxel positions."""
    size = image.GetSize()
    lo = [int(s * (1 - fraction) / 2) for s in size[:2]] + [0]
    return sitk.RegionOfInterest(image, [int(s * fraction) for s in size[:2]] + [size[2]], lo)


# ----------------------------------------------------------------------------------------------
# defect 2: a volume's window comes from its own voxels, not from the MRI's field of view
# ----------------------------------------------------------------------------------------------
@needs_realdata
def test_ct_window_does_not_depend_on_a_cropped_mri(porcine):
    mri, ct = porcine
    cropped = crop_physical(mri, 0.4)  # inside the pig's head: no air left in that region of the CT
    full_pair = prepare_pair(mri, ct, "ct-mri", check_alignment=False)
    crop_pair = prepare_pair(cropped, ct, "ct-mri", check_alignment=False)
    assert full_pair.other_window == crop_pair.other_window == CT_BRAIN_WINDOW
    # The CT looks the same in the overlap: the cropped pair's CT voxels equal the full pair's there.
    full = sitk.GetImageFromArray(full_pair.other)
    full.CopyInformation(full_pair.reference)
    again = sitk.GetArrayFromImage(sitk.Resample(full, crop_pair.reference, sitk.Transform(),
                                                 sitk.sitkNearestNeighbor))
    np.testing.assert_allclose(again, crop_pair.other, atol=1e-6)


@needs_realdata
def test_pet_window_does_not_depend_on_a_skull_stripped_mri():
    t1, pet = sitk.ReadImage(str(SPM / "T1.nii")), sitk.ReadImage(str(SPM / "PET.nii"))
    stripped = sitk.Mask(t1, sitk.Cast(pet > 0.3, sitk.sitkUInt8))  # keep the brain only
    windows = {prepare_pair(m, pet, "pet-mri", check_alignment=False).other_window for m in (t1, stripped)}
    assert len(windows) == 1


# ----------------------------------------------------------------------------------------------
# defect 3: planes 1 or 2 voxels wide, and no non-finite value ever reaches the uint8 cast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 50), (2, 50), (50, 2), (2, 2), (3, 40), (1, 1)])
def test_plane_round_trip_is_finite_and_faithful_for_any_plane_size(shape):
    rng = np.random.default_rng(0)
    grid = PlaneGrid(shape, (1.0, 1.3))
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for _ in range(4):  # the cubic B-spline's out-of-image reads were random: try several times
        phase = rng.random(3)[:, None, None] * 6
        planes = (0.5 + 0.4 * np.sin(xx / 6 + phase) * np.cos(yy / 5)).astype(np.float32)
        net = grid.to_net(planes)
        back = grid.from_net(net)
        assert np.isfinite(net).all() and np.isfinite(back).all()
        assert np.abs(back - planes).max() < 0.05


def test_volume_with_two_voxel_wide_planes_fuses_to_the_expected_values():
    rng = np.random.default_rng(1)
    mri = sitk.GetImageFromArray((rng.random((12, 2, 30)) * 100).astype(np.float32))
    pet = sitk.GetImageFromArray((rng.random((12, 2, 30)) * 5).astype(np.float32))
    outs = [sitk.GetArrayFromImage(fuse_volumes(mri, pet, backend=MeanBackend(), colormap="none"))
            for _ in range(2)]
    pair = prepare_pair(mri, pet, colormap="none", check_alignment=False)
    expected = sitk.GetArrayFromImage(fuse_prepared(pair, MeanBackend(), plane_size=None))
    assert np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0].astype(int) - expected).max() <= 13  # 1e37 garbage used to saturate at 255


class NaNBackend(MeanBackend):
    def __call__(self, mri, other):
        out = super().__call__(mri, other)
        out[:, 0, 0] = np.nan
        return out


def test_non_finite_network_output_is_refused_and_nothing_is_written(tmp_path):
    rng = np.random.default_rng(2)
    mri = tmp_path / "mri.nrrd"
    pet = tmp_path / "pet.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((6, 20, 20)) * 100).astype(np.float32)), str(mri))
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((6, 20, 20)) * 5).astype(np.float32)), str(pet))
    with pytest.raises(VolumeError, match="non-finite"):
        fuse_files(mri, pet, tmp_path / "fused.nrrd", backend=NaNBackend())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mri.nrrd", "pet.nrrd"]


# ----------------------------------------------------------------------------------------------
# defect 4: colour only as 8-bit RGB
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, words", [(np.float32, "32-bit float"), (np.uint16, "16-bit unsigned"),
                                          (np.float64, "64-bit float")])
def test_non_8_bit_rgb_is_refused_naming_the_pixel_type(dtype, words):
    rgb = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 6, 5, 3)).astype(dtype), isVector=True)
    with pytest.raises(VolumeError, match=f"components of type vector of {words}.*only as 8-bit RGB"):
        check_volume(rgb, "PET", allow_rgb=True)
    mri = sitk.GetImageFromArray(np.random.default_rng(1).random((4, 6, 5)).astype(np.float32))
    with pytest.raises(VolumeError, match="8-bit RGB"):
        fuse_volumes(mri, rgb, backend=MeanBackend())


def test_a_displacement_field_is_not_taken_as_an_rgb_pet():  # 3 x float64, what a registration writes
    field = sitk.Compose([sitk.Image([5, 6, 4], sitk.sitkFloat64) + float(c + 1) for c in range(3)])
    with pytest.raises(VolumeError, match="only as 8-bit RGB"):
        check_volume(field, "PET", allow_rgb=True)


def test_8_bit_rgb_is_accepted():
    rgb = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (4, 6, 5, 3), dtype=np.uint8),
                                 isVector=True)
    assert check_volume(rgb, "PET", allow_rgb=True).GetNumberOfComponentsPerPixel() == 3


# ----------------------------------------------------------------------------------------------
# defect 5: the result does not depend on how the voxels are stored
# ----------------------------------------------------------------------------------------------
@needs_realdata
@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_storage_order_does_not_change_the_fused_voxels_on_a_real_volume(onnx_pet, axis):
    t1, pet = sitk.ReadImage(str(SPM / "T1.nii")), sitk.ReadImage(str(SPM / "PET.nii"))  # T1 is stored LAS
    reference = fuse_volumes(t1, pet, backend=onnx_pet, axis=axis)
    for order in ("RAS", "LPS", "PIR"):
        stored = sitk.DICOMOrient(t1, order)
        fused = fuse_volumes(stored, pet, backend=onnx_pet, axis=axis)
        assert same_grid(fused, stored)
        # Map onto the reference grid: the voxel centres coincide, so nearest neighbour is exact.
        back = sitk.Resample(fused, reference, sitk.Transform(), sitk.sitkNearestNeighbor)
        diff = np.abs(sitk.GetArrayViewFromImage(back).astype(int) - sitk.GetArrayViewFromImage(reference))
        assert np.percentile(diff, 99) <= 1, (order, diff.max())


# ----------------------------------------------------------------------------------------------
# defect 6: a full disk never leaves a truncated file, and is named as such
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A real 300 kB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def noise_rgb(shape=(40, 64, 64)) -> sitk.Image:  # incompressible: about 490 kB
    return sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, shape + (3,), dtype=np.uint8),
                                  isVector=True)


@pytest.mark.parametrize("name", ["fused.nii.gz", "fused.nrrd", "fused.mha"])
def test_full_disk_is_a_clear_error_and_leaves_the_old_output_intact(full_disk, capfd, name):
    old = full_disk / name
    old.write_bytes(b"the previous good result")
    with pytest.raises(OutputError, match="disk is full"):
        write_volume(noise_rgb(), old)
    assert old.read_bytes() == b"the previous good result"
    assert sorted(p.name for p in full_disk.iterdir()) == [name]  # no temporary left
    assert capfd.readouterr().err == ""  # the NIfTI library's 'NWAD' message is not printed


@needs_realdata
def test_cli_names_a_full_disk_in_one_line(full_disk, capfd):
    code = main(["fuse", str(SPM / "T1.nii"), str(SPM / "PET.nii"), "-o", str(full_disk / "f.nii.gz"),
                 "--quiet", "--plane-size", "0"])
    err = capfd.readouterr().err
    # The RGB result (2.7 MB raw, ~0.6 MB compressed) does not fit on the 300 kB disk.
    assert code == 2 and "disk is full" in err and err.count("\n") == 1, err
    assert list(full_disk.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# defect 7: a killed run's temporary file is cleaned up by the next write to that folder
# ----------------------------------------------------------------------------------------------
def test_a_killed_runs_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "fused.nrrd"
    script = ("import sys, time\nfrom LightFusionLib.fileio import atomic_output\n"
              "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a volume')\n"
              "    print('writing', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".lightfusion-tmp-") and left[0].endswith("fused.nrrd")
    legacy = tmp_path / ".tmp-0123abcd-old.nrrd"  # the name versions before 0.2 used
    legacy.write_bytes(b"x")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    write_volume(noise_rgb((2, 4, 4)), tmp_path / "other.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.nrrd"]


def test_a_live_runs_temp_file_is_kept(tmp_path):
    from LightFusionLib.fileio import temp_path_for

    mine = temp_path_for(tmp_path / "fused.nrrd")  # this process is alive
    mine.write_bytes(b"being written")
    assert remove_stale_temp_files(tmp_path) == []
    assert mine.exists()


# ----------------------------------------------------------------------------------------------
# real scans end to end: finite output on the MRI grid; the warnings each real pair gets
# ----------------------------------------------------------------------------------------------
@needs_realdata
@pytest.mark.parametrize("mri_name, other_name, task", [("T1.nii", "PET.nii", "pet-mri"),
                                                        ("T1.nii", "SPECT.nii", "spect-mri")])
def test_real_aligned_templates_fuse_on_the_mri_grid_without_warnings(tmp_path, mri_name, other_name, task):
    result = fuse_files(SPM / mri_name, SPM / other_name, tmp_path / "fused.nrrd", task=task, backend="onnx")
    fused, mri = sitk.ReadImage(str(result.output)), sitk.ReadImage(str(SPM / mri_name))
    assert same_grid(fused, mri) and fused.GetPixelID() == sitk.sitkVectorUInt8
    assert sitk.GetArrayViewFromImage(fused).max() > 100  # not black
    assert result.warnings == []


@needs_realdata
def test_real_unaligned_pig_head_fuses_with_a_misalignment_warning(porcine, tmp_path):
    mri, ct = porcine
    pair = prepare_pair(mri, ct, "ct-mri")
    assert any("register" in w for w in pair.warnings), pair.warnings
    assert all("Hounsfield" not in w and "swapped" not in w for w in pair.warnings), pair.warnings
    fused = fuse_prepared(pair, load_backend(None, "ct-mri", "onnx", "cpu"))  # the shipped CT model
    assert same_grid(fused, mri) and fused.GetPixelID() == sitk.sitkUInt8
    assert sitk.GetArrayViewFromImage(fused).max() > 100  # not black


@needs_realdata
def test_dicom_modality_warnings_on_real_series(porcine):
    mri = porcine[0]
    nema = read_volume(NEMA_PET, "PET")
    wrong_task = prepare_pair(mri, nema, "ct-mri", check_alignment=False).warnings
    assert any("DICOM PT series, not CT" in w and "--task" in w for w in wrong_task), wrong_task
    swapped = prepare_pair(nema, mri, "pet-mri", check_alignment=False).warnings
    assert [w for w in swapped if "swapped" in w] == [
        "the MRI volume is a DICOM PT series and the PET volume an MR series: the two volumes look swapped "
        "(give the MRI first)"], swapped
    assert prepare_pair(mri, nema, "pet-mri", check_alignment=False).warnings == []


def test_a_ct_given_for_a_pet_task_is_warned_about_from_its_hounsfield_values():
    rng = np.random.default_rng(3)
    mri = sitk.GetImageFromArray((rng.random((8, 20, 20)) * 100).astype(np.float32))
    ct = sitk.GetImageFromArray(np.where(rng.random((8, 20, 20)) > 0.5, -1000, 40).astype(np.int16))
    warnings = prepare_pair(mri, ct, "pet-mri", check_alignment=False).warnings
    assert any("Hounsfield" in w and "--task" in w for w in warnings), warnings
    swapped = prepare_pair(ct, mri, "ct-mri", check_alignment=False).warnings
    assert any("MRI volume holds values below -500" in w for w in swapped), swapped


def test_a_ct_not_in_hounsfield_units_is_warned_about():
    rng = np.random.default_rng(4)
    mri = sitk.GetImageFromArray((rng.random((8, 20, 20)) * 100).astype(np.float32))
    ct = sitk.GetImageFromArray((rng.random((8, 20, 20)) * 3000).astype(np.uint16))
    warnings = prepare_pair(mri, ct, "ct-mri", check_alignment=False).warnings
    assert any("does not look like Hounsfield units" in w for w in warnings), warnings
