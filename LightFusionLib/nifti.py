"""Colour NIfTI that neuroimaging viewers show as colour: 3-D RGB24 (datatype 128), written with nibabel.

SimpleITK writes an RGB volume to ``.nii``/``.nii.gz`` as a 5-D vector image (dim[5] = 3 components,
float-free but not RGB24), which FSLeyes, MRIcroGL, ITK-SNAP and nibabel-based tools load as three
separate volumes or not at all. The NIfTI way to store colour is datatype ``NIFTI_TYPE_RGB24`` (128):
a 3-D image whose voxels are (R, G, B) bytes. nibabel writes it from a structured numpy array.

Geometry: the image's grid (spacing, origin, direction; SimpleITK's LPS) becomes the RAS affine that
NIfTI stores, written both as the qform (rotation + voxel sizes) and the sform (the full affine), with
code 1 (scanner anatomical), as ITK writes grayscale NIfTI. A fused volume lies on the MRI's grid,
so these are the MRI's qform/sform. SimpleITK reads the file back as an RGB vector image on the same
grid; the write is verified that way and with nibabel before the file replaces anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .fileio import OutputError, atomic_output, captured_native_stderr

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
NIFTI_RGB24 = 128  # the NIfTI-1 datatype code of 24-bit RGB
XFORM_SCANNER_ANAT = 1
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def is_nifti_path(path: str | Path) -> bool:
    """``.nii`` or ``.nii.gz`` (any case)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_rgb_volume(image: sitk.Image) -> bool:
    """A 3-D 8-bit RGB volume (what fusion writes for PET/SPECT)."""
    return (image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 3
            and image.GetPixelID() == sitk.sitkVectorUInt8)


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-RAS (mm) affine NIfTI stores for ``image``'s grid (SimpleITK's is LPS)."""
    direction = np.array(image.GetDirection(), np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), np.float64)
    return affine


def rgb_voxels(image: sitk.Image) -> np.ndarray:
    """``image``'s voxels as an (I, J, K) RGB24 structured array (NIfTI's index order)."""
    arr = sitk.GetArrayViewFromImage(image)  # (K, J, I, 3)
    out = np.empty(arr.shape[2::-1], RGB24)
    for c, name in enumerate(RGB24.names):
        out[name] = arr[..., c].transpose(2, 1, 0)
    return out


def write_rgb_nifti(image: sitk.Image, path: str | Path) -> Path:
    """Write a 3-D 8-bit RGB ``image`` to ``path`` (``.nii`` or ``.nii.gz``) as an RGB24 NIfTI with
    its grid as qform and sform; atomically and verified (read back with nibabel and SimpleITK and
    compared voxel for voxel). Raises OutputError."""
    path = Path(path)
    try:
        import nibabel as nib
    except ImportError:  # a dependency of the package; an environment such as Slicer's may lack it
        raise OutputError(f"cannot write {path}: colour NIfTI (RGB24) is written with nibabel, which is not "
                          "installed (pip install nibabel), or write .nrrd") from None

    if not is_rgb_volume(image):
        raise OutputError(f"cannot write {path} as RGB24 NIfTI: the volume is not 3-D 8-bit RGB "
                          f"({image.GetDimension()}-D, {image.GetPixelIDTypeAsString()})")
    if not is_nifti_path(path):
        raise OutputError(f"{path} is not a NIfTI file name (.nii or .nii.gz)")
    affine = ras_affine(image)
    voxels = rgb_voxels(image)

    def verify(tmp: Path) -> None:
        problem = _read_back_problem(tmp, image, voxels, affine)
        if problem is not None:
            raise OutputError(f"cannot write {path}: {problem}; nothing was written")

    with atomic_output(path, verify=verify) as tmp:
        nifti = nib.Nifti1Image(voxels, affine)
        nifti.header.set_xyzt_units("mm")
        nifti.set_qform(affine, XFORM_SCANNER_ANAT)
        nifti.set_sform(affine, XFORM_SCANNER_ANAT)
        nib.save(nifti, str(tmp))
    return path


def _read_back_problem(tmp: Path, image: sitk.Image, voxels: np.ndarray, affine: np.ndarray) -> str | None:
    """Why the written file is not ``image`` as RGB24 NIfTI (None: it is)."""
    import nibabel as nib

    try:
        back = nib.load(str(tmp))
        data = np.asanyarray(back.dataobj)
    except Exception as exc:  # nibabel raises several types for a truncated or garbled file
        return f"the file does not read back ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if int(back.header["datatype"]) != NIFTI_RGB24 or data.shape != voxels.shape or not np.array_equal(data, voxels):
        return "the file read back differs from the volume written"
    for xform, code in (back.header.get_qform(coded=True), back.header.get_sform(coded=True)):
        if code != XFORM_SCANNER_ANAT or not np.allclose(xform, affine, atol=1e-4):
            return "the file's qform/sform differ from the volume's grid"

    try:
        with captured_native_stderr():
            itk = sitk.ReadImage(str(tmp))
    except RuntimeError as exc:
        return f"SimpleITK does not read the file back ({str(exc).strip().splitlines()[-1]})"
    if (itk.GetSize() != image.GetSize() or itk.GetNumberOfComponentsPerPixel() != 3 or not float32_grid_equal(itk, image)
            or not np.array_equal(sitk.GetArrayViewFromImage(itk), sitk.GetArrayViewFromImage(image))):
        return "SimpleITK reads the file back differently from the volume written"
    return None


def float32_grid_equal(a: sitk.Image, b: sitk.Image) -> bool:
    """Same grid up to what NIfTI keeps: its affine is stored in float32 (a 1e-4 voxel tolerance,
    plus float32 rounding of the origin's magnitude)."""
    if a.GetSize() != b.GetSize():
        return False
    spacing = np.array(b.GetSpacing())
    origin_tol = 1e-4 * spacing.min() + 4 * np.finfo(np.float32).eps * np.abs(b.GetOrigin()).max()
    return bool(np.allclose(a.GetSpacing(), spacing, rtol=1e-5, atol=0)
                and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=origin_tol)
                and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5))
