#!/usr/bin/env python3
"""Make the bundled sample pair in ``LightFusionLib/Resources/SampleData`` from the MNI ICBM152 2009a template.

- ``mni152-t1.nrrd``: the T1 template cropped to the head (10 mm margin), 1.5 mm isotropic, uint8,
  stored RAS like the template (SimpleITK direction diag(-1, -1, 1)).
- ``mni152-fdg-pet-sim.nrrd``: a simulated FDG-PET in SUV (float32) on a coarser PET grid
  (2.5 x 2.5 x 3.0 mm, LPS identity direction, a larger field of view with a different origin), so
  the demo exercises resampling onto the MRI grid (spacing, size, origin and direction all differ).
  Uptake: grey matter SUV 9, white matter 2.5, a little elsewhere in the template's head; a hot
  region (right parietal cortex, radius 9 mm, + SUV 14) and a cold one (mirror position on the
  left, grey-matter uptake x 0.25, radius 18 mm); blurred to PET resolution (6 mm FWHM) and
  resampled to the PET grid; Gaussian noise with variance proportional to the uptake (seeded).

Usage: python scripts/make_sample_data.py [--src ../shared/data/mni152] [--out LightFusionLib/Resources/SampleData]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
T1, GM, WM = (f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz" for n in ("t1", "gm", "wm"))
MRI_SPACING = 1.5
PET_SPACING = (2.5, 2.5, 3.0)
FWHM_MM = 6.0
# Lesion centres in MNI RAS mm (SimpleITK works in LPS: x and y change sign).
HOT_RAS, HOT_RADIUS, HOT_SUV = (45.0, -40.0, 30.0), 9.0, 14.0
COLD_RAS, COLD_RADIUS, COLD_FACTOR = (-45.0, -40.0, 30.0), 18.0, 0.25
SUV_GM, SUV_WM, SUV_OTHER = 9.0, 2.5, 0.6
NOISE = 0.06  # noise variance per unit SUV: about 8% at grey-matter uptake


def _ras_to_lps(p: tuple[float, float, float]) -> np.ndarray:
    return np.array([-p[0], -p[1], p[2]])


def _sphere(ref: sitk.Image, centre_ras: tuple[float, float, float], radius: float) -> np.ndarray:
    """(Z,Y,X) bool mask of the voxels of ``ref`` within ``radius`` mm of the RAS point."""
    centre = _ras_to_lps(centre_ras)
    idx = np.indices(ref.GetSize()[::-1]).reshape(3, -1)[::-1].T.astype(float)  # (N, 3) as (i, j, k)
    d = np.array(ref.GetDirection()).reshape(3, 3)
    pts = np.asarray(ref.GetOrigin()) + (idx * ref.GetSpacing()) @ d.T
    inside = np.linalg.norm(pts - centre, axis=1) <= radius
    return inside.reshape(ref.GetSize()[::-1])


def make_mri(t1: sitk.Image) -> sitk.Image:
    """Crop the template to its head (+10 mm) and resample to 1.5 mm isotropic (linear), uint8."""
    arr = sitk.GetArrayViewFromImage(t1)
    nz = np.argwhere(arr > 20)
    lo = np.maximum(nz.min(0) - 10, 0)[::-1]  # (i, j, k)
    hi = np.minimum(nz.max(0) + 10, np.array(arr.shape) - 1)[::-1]
    cropped = sitk.RegionOfInterest(t1, [int(s) for s in hi - lo + 1], [int(s) for s in lo])
    extent = np.array(cropped.GetSize()) * np.array(cropped.GetSpacing())
    size = [int(s) for s in np.round(extent / MRI_SPACING)]
    # Keep the cropped box's first corner: origin shifts by half a voxel of each grid.
    d = np.array(cropped.GetDirection()).reshape(3, 3)
    corner = np.array(cropped.GetOrigin()) - d @ (0.5 * np.array(cropped.GetSpacing()))
    origin = corner + d @ (0.5 * np.full(3, MRI_SPACING))
    out = sitk.Resample(cropped, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        [MRI_SPACING] * 3, cropped.GetDirection(), 0.0, sitk.sitkUInt8)
    return out


def make_pet(t1: sitk.Image, gm: sitk.Image, wm: sitk.Image, seed: int = 0) -> sitk.Image:
    """Simulated FDG-PET (SUV, float32) on a 2.5 x 2.5 x 3 mm LPS grid covering the template."""
    g = sitk.GetArrayFromImage(gm).astype(np.float32) / 255.0
    w = sitk.GetArrayFromImage(wm).astype(np.float32) / 255.0
    head = sitk.GetArrayFromImage(t1) > 20
    cold = _sphere(gm, COLD_RAS, COLD_RADIUS)
    hot = _sphere(gm, HOT_RAS, HOT_RADIUS)
    uptake = SUV_GM * g * np.where(cold, COLD_FACTOR, 1.0) + SUV_WM * w
    uptake += SUV_OTHER * (head & (g + w < 0.5))  # CSF / deep structures: a little uptake
    uptake += HOT_SUV * hot * np.clip(g + w, 0, 1)  # hot region in tissue, not in CSF
    activity = sitk.GetImageFromArray(uptake.astype(np.float32))
    activity.CopyInformation(gm)
    activity = sitk.SmoothingRecursiveGaussian(activity, FWHM_MM / (2 * np.sqrt(2 * np.log(2))))

    # PET grid: LPS identity direction, covering the template's physical box plus a margin.
    corners = [gm.TransformContinuousIndexToPhysicalPoint([float(c) for c in (i, j, k)])
               for i in (-0.5, gm.GetSize()[0] - 0.5) for j in (-0.5, gm.GetSize()[1] - 0.5)
               for k in (-0.5, gm.GetSize()[2] - 0.5)]
    lo, hi = np.min(corners, 0) - 6.0, np.max(corners, 0) + 6.0
    size = [int(s) for s in np.ceil((hi - lo) / PET_SPACING)]
    origin = lo + 0.5 * np.asarray(PET_SPACING)
    pet = sitk.Resample(activity, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                        PET_SPACING, np.eye(3).ravel().tolist(), 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(pet)
    rng = np.random.default_rng(seed)
    # Counting noise: variance proportional to uptake; none outside the body (compresses well).
    noise = rng.standard_normal(arr.shape).astype(np.float32) * np.sqrt(NOISE * np.maximum(arr, 0))
    arr = np.where(arr > 0.05, arr + noise, 0.0)
    arr = np.round(arr, 2).astype(np.float32)  # SUV to 0.01: realistic and much smaller files
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(pet)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "mni152"))
    parser.add_argument("--out", default=str(ROOT / "LightFusionLib" / "Resources" / "SampleData"))
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    t1, gm, wm = (sitk.ReadImage(str(src / n)) for n in (T1, GM, WM))
    out.mkdir(parents=True, exist_ok=True)
    mri, pet = make_mri(t1), make_pet(t1, gm, wm)
    for image, name in ((mri, "mni152-t1.nrrd"), (pet, "mni152-fdg-pet-sim.nrrd")):
        path = out / name
        sitk.WriteImage(image, str(path), useCompression=True)
        print(f"wrote {path}: {image.GetSize()} voxels of {image.GetSpacing()} mm, "
              f"{image.GetPixelIDTypeAsString()}, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
