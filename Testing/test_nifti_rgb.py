"""Colour results written to .nii/.nii.gz are 3-D RGB24 NIfTI (datatype 128), what FSLeyes, MRIcroGL,
ITK-SNAP and nibabel show as colour, with the MRI's grid as qform and sform; scalar results stay as
SimpleITK writes them."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

nib = pytest.importorskip("nibabel")

from LightFusionLib.cli import main  # noqa: E402
from LightFusionLib.demo import sample_paths  # noqa: E402
from LightFusionLib.nifti import NIFTI_RGB24, RGB24, ras_affine  # noqa: E402
from LightFusionLib.volumeio import write_volume  # noqa: E402


def rgb_volume(shape=(5, 6, 7), seed=0) -> sitk.Image:
    """A noise RGB volume (K, J, I) with an oblique direction, anisotropic spacing and an odd origin."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(shape + (3,)) * 256).astype(np.uint8), isVector=True)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((123.456789, -98.7654321, 12.3456789))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    return image


def close_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same grid to NIfTI's float32 precision."""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


@pytest.mark.parametrize("name", ["fused.nii.gz", "fused.nii", "FUSED.NII.GZ"])
def test_rgb_volume_is_written_as_3d_rgb24_with_qform_and_sform(tmp_path, name):
    image = rgb_volume()
    path = write_volume(image, tmp_path / name)
    nifti = nib.load(str(path))
    header = nifti.header
    assert int(header["datatype"]) == NIFTI_RGB24 == 128
    assert int(header["dim"][0]) == 3 and nifti.shape == (7, 6, 5)  # 3-D, not SimpleITK's 5-D vector image
    assert nifti.get_data_dtype() == RGB24
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    assert qcode == 1 and scode == 1
    assert np.allclose(qform, ras_affine(image), atol=1e-4) and np.allclose(sform, ras_affine(image), atol=1e-4)
    # voxel (i, j, k) of the NIfTI is voxel [k, j, i] of the SimpleITK array
    data = np.asanyarray(nifti.dataobj)
    arr = sitk.GetArrayViewFromImage(image)
    assert tuple(data[4, 3, 2]) == tuple(arr[2, 3, 4])
    assert np.array_equal(np.stack([data["R"], data["G"], data["B"]], -1).transpose(2, 1, 0, 3), arr)
    # SimpleITK (ITK-SNAP's reader) reads it back as colour on the same grid
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkVectorUInt8 and back.GetNumberOfComponentsPerPixel() == 3
    assert close_grid(back, image) and np.array_equal(sitk.GetArrayViewFromImage(back), arr)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left


def test_affine_is_the_ras_form_of_the_grid():
    image = rgb_volume()
    affine = ras_affine(image)
    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 4), (3, 2, 1)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = affine @ np.array(list(index) + [1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1])


def test_scalar_results_stay_as_simpleitk_writes_them(tmp_path):
    image = sitk.GetImageFromArray(np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7))
    path = write_volume(image, tmp_path / "fused.nii.gz")
    nifti = nib.load(str(path))
    assert nifti.get_data_dtype() == np.uint8 and int(nifti.header["datatype"]) == 2 and nifti.shape == (7, 6, 5)


def test_fuse_to_nii_gz_gives_colour_with_the_mris_qform_and_sform(tmp_path):
    """End to end: the bundled pair fused to .nii.gz is RGB24 whose affine is the MRI's (the MRI given as NIfTI)."""
    mri_path, pet_path = sample_paths()
    mri_nii = tmp_path / "mri.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(mri_path)), str(mri_nii))
    out = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(mri_nii), str(pet_path), "-o", str(out), "--quiet", "--backend", "onnx"]) == 0
    fused, mri = nib.load(str(out)), nib.load(str(mri_nii))
    assert int(fused.header["datatype"]) == NIFTI_RGB24 and fused.shape == mri.shape
    for get in ("get_qform", "get_sform"):
        f_xform, f_code = getattr(fused.header, get)(coded=True)
        m_xform, m_code = getattr(mri.header, get)(coded=True)
        assert f_code == m_code == 1 and np.allclose(f_xform, m_xform, atol=1e-4)
    rgb = np.asanyarray(fused.dataobj)
    assert rgb["R"].max() > 100 and not np.array_equal(rgb["R"], rgb["B"])  # colour, not grey
