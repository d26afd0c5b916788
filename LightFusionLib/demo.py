"""``lightfusion demo``: fuse the bundled sample PET/MRI pair and write what a person wants to look at.

Outputs in ``out``: ``fused.nrrd`` (RGB on the MRI grid), ``montage.png`` (rows axial, coronal,
sagittal through the same point, the centre of the hottest PET region; columns MRI, coloured PET,
fused; radiological convention: patient's right on the image left) and ``metrics.json`` (the core
fusion metrics averaged over the fused volume's axial planes that contain head).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .colour import check_colour_mode, luma
from .fileio import atomic_output, check_output_file, check_output_folder
from .metrics import METRIC_NAMES, evaluate_fusion
from .errors import VolumeError
from .fusion import PreparedPair, fuse_prepared, prepare_pair, progress_bar, resolve_backend
from .geometry import PlaneGrid, slicing_axis, to_canonical
from .volumeio import read_volume, write_volume

SAMPLE_MRI = "mni152-t1.nrrd"
SAMPLE_PET = "mni152-fdg-pet-sim.nrrd"
CELL = 256  # montage cell size (pixels)
OUTPUTS = ("fused.nrrd", "montage.png", "metrics.json")


def sample_data_dir() -> Path:
    """Folder of the bundled sample volumes: $LIGHTFUSION_SAMPLE_DATA when set, else
    ``Resources/SampleData`` inside the package (checkout, wheel and Slicer install alike)."""
    env = os.environ.get("LIGHTFUSION_SAMPLE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "Resources" / "SampleData"


def sample_paths() -> tuple[Path, Path]:
    """(MRI, PET) paths of the bundled pair; VolumeError when they are missing."""
    folder = sample_data_dir()
    paths = folder / SAMPLE_MRI, folder / SAMPLE_PET
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise VolumeError(f"sample data {', '.join(missing)} not found in {folder} "
                          "(make it with scripts/make_sample_data.py, or set LIGHTFUSION_SAMPLE_DATA)")
    return paths


def hottest_point(pair: PreparedPair, sigma_mm: float = 4.0) -> tuple[float, float, float]:
    """Physical point (LPS mm) of the maximum of the smoothed functional volume (its hot region)."""
    other = luma(pair.other) if pair.other.ndim == 4 else pair.other
    img = sitk.GetImageFromArray(np.ascontiguousarray(other, np.float32))
    img.CopyInformation(pair.reference)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))  # a view would outlive its image
    k, j, i = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return pair.reference.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))


def _orthogonal_planes(volume: np.ndarray, reference: sitk.Image, point) -> list[np.ndarray]:
    """(K,J,I,3) uint8 volume on ``reference``'s grid -> [axial, coronal, sagittal] (CELL, CELL, 3)
    uint8 views through ``point``: reoriented to LPS (SimpleITK), square pixels, aspect kept."""
    img = sitk.GetImageFromArray(volume, isVector=True)
    img.CopyInformation(reference)
    img = sitk.DICOMOrient(img, "LPS")  # index axes now run towards patient left, posterior, superior
    i, j, k = img.TransformPhysicalPointToIndex(point)
    arr = sitk.GetArrayViewFromImage(img)  # (S, P, L, 3)
    si, sj, sk = img.GetSpacing()
    views = [(arr[k], (sj, si)),  # rows anterior -> posterior, columns right -> left
             (arr[::-1, j], (sk, si)),  # rows superior -> inferior
             (arr[::-1, :, i], (sk, sj))]  # columns anterior -> posterior
    out = []
    for plane, spacing in views:
        grid = PlaneGrid(plane.shape[:2], spacing, CELL, interpolator=sitk.sitkLinear)
        out.append(np.clip(np.rint(grid.to_net(plane[None].astype(np.float32))[0]), 0, 255).astype(np.uint8))
    return out


def make_montage(pair: PreparedPair, fused: sitk.Image, point=None) -> np.ndarray:
    """(3*CELL, 3*CELL, 3) uint8: rows axial / coronal / sagittal through ``point`` (default: the
    hottest PET region), columns MRI / functional (as the network saw it) / fused."""
    point = hottest_point(pair) if point is None else point
    fused = to_canonical(fused)  # the pair's arrays are in the canonical orientation
    gray = lambda a: np.repeat(a[..., None], 3, axis=-1) if a.ndim == 3 else a  # noqa: E731
    volumes = [gray(np.rint(pair.mri * 255).astype(np.uint8)), gray(pair.other_display()),
               gray(sitk.GetArrayViewFromImage(fused))]
    columns = [_orthogonal_planes(v, pair.reference, point) for v in volumes]
    return np.concatenate([np.concatenate([col[r] for col in columns], axis=1) for r in range(3)], axis=0)


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG (SimpleITK), atomically."""
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp))
    return Path(path)


def plane_metrics(pair: PreparedPair, fused: sitk.Image, axis: str = "axial",
                  min_foreground: float = 0.05) -> tuple[dict[str, float | None], int]:
    """Core metrics (:func:`evaluate_fusion`) averaged over the ``axis`` planes whose MRI foreground
    (> 10% of its window) covers at least ``min_foreground`` of the plane -> (means, plane count).
    A = functional source as the network saw it, B = MRI, F = fused; all 0-255."""
    np_axis = 2 - slicing_axis(pair.reference, axis)
    fused = to_canonical(fused)  # the pair's arrays are in the canonical orientation
    mri = np.moveaxis(pair.mri, np_axis, 0)
    other = np.moveaxis(pair.other_display(), np_axis, 0)
    out = np.moveaxis(sitk.GetArrayViewFromImage(fused), np_axis, 0)
    rows = []
    for k in range(mri.shape[0]):
        if np.mean(mri[k] > 0.1) < min_foreground:
            continue
        rows.append(evaluate_fusion(out[k], other[k], np.rint(mri[k] * 255).astype(np.uint8)))
    means: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = np.array([r[name] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        means[name] = round(float(values.mean()), 4) if values.size else None  # JSON has no NaN
    return means, len(rows)


def run_demo(out: str | Path = "lightfusion-demo", backend="auto", device: str = "auto", progress: bool = True,
             model: str | Path | None = None, half: bool = False, colour_mode: str | None = None) -> dict:
    """Fuse the bundled pair (axial planes, PET-MRI model) and write fused.nrrd, montage.png and
    metrics.json into ``out`` (created). Prints where they went and the timing; returns the summary.
    ``colour_mode``: 'yuv' (default) or 'saturated' (:func:`LightFusionLib.colour.restore_colour`)."""
    mri_path, pet_path = sample_paths()
    out = check_output_folder(out, "demo output folder")
    for name in OUTPUTS:
        check_output_file(out / name, "demo output")
    t_start = time.perf_counter()
    pair = prepare_pair(read_volume(mri_path, "MRI"), read_volume(pet_path, "PET"), "pet-mri")
    fuser = resolve_backend(backend, model, "pet-mri", device, half)
    n = pair.reference.GetSize()[slicing_axis(pair.reference, "axial")]
    with progress_bar(n, f"fusing ({fuser.describe()})", bool(progress)) as callback:
        t0 = time.perf_counter()
        fused = fuse_prepared(pair, fuser, "axial", progress=callback, colour_mode=colour_mode)
        fuse_seconds = time.perf_counter() - t0
    fused_path = write_volume(fused, out / "fused.nrrd")
    montage_path = write_png(make_montage(pair, fused), out / "montage.png")
    t0 = time.perf_counter()
    means, count = plane_metrics(pair, fused)
    metrics_seconds = time.perf_counter() - t0
    total_seconds = time.perf_counter() - t_start
    summary = {
        "task": "pet-mri",
        "inputs": {"mri": str(mri_path), "pet": str(pet_path)},
        "backend": fuser.describe(),
        "model": str(getattr(fuser, "model_path", model) or "shipped"),
        "axis": "axial",
        "planes": n,
        "fusion_seconds": round(fuse_seconds, 3),
        "planes_per_second": round(n / fuse_seconds, 2) if fuse_seconds > 0 else None,
        "total_seconds": round(total_seconds, 3),
        "metrics_seconds": round(metrics_seconds, 3),
        "windows": {"mri": list(pair.mri_window), "pet": list(pair.other_window or ())},
        "colormap": pair.colormap,
        "colour": check_colour_mode(colour_mode),
        "metrics_planes": count,
        "metrics": means,
    }
    with atomic_output(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fused {n} axial planes in {fuse_seconds:.1f} s ({n / max(fuse_seconds, 1e-9):.1f} planes/s) "
          f"with {fuser.describe()}; demo total {total_seconds:.1f} s")
    print(f"  {fused_path}  (RGB volume on the MRI grid)")
    print(f"  {montage_path}  (rows: axial, coronal, sagittal; columns: MRI, PET, fused)")
    print(f"  {out / 'metrics.json'}  (metrics averaged over {count} axial planes)")
    summary["files"] = {"fused": str(fused_path), "montage": str(montage_path), "metrics": str(out / "metrics.json")}
    return summary
