"""Issue 11's colour measurements: how saturated, and how distinct from their surround, the hot lesions
look in the fused colour image, per colour restoration (``--colour yuv|saturated``), with the shipped models.

    python scripts/colour_study.py [--out DIR]   # prints the model card's table; DIR gets the montages

Recipe (model card, "What a clinician sees"): CIELAB (scikit-image ``rgb2lab`` / ``deltaE_ciede2000``,
D65). Lesion = the hottest uptake (for an RGB PET/SPECT: its colour map inverted, nearest entry),
connected, at least 85% of the peak; surround = a 14-30 px ring around it, under 60% of the peak, inside the
head. C* = mean lesion chroma; dE00 = CIEDE2000 between the mean lesion and mean surround colour; |dY| =
mean difference between the displayed luma and the fused luma in the lesion. The bundled sample is measured
on the demo montage's axial cell through its hottest point; the Harvard pairs (training pairs with focal
uptake) on their 256x256 images. Needs scikit-image (not a dependency of LightFusion).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "harvard" / "train"
HARVARD = {"pet-mri": ["41048", "41047", "41046"], "spect-mri": ["18006", "18007", "18009"]}
MODES = ("yuv", "saturated")


def lesion_and_ring(uptake: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    peak = uptake.max()
    hot, _ = ndimage.label(uptake >= 0.85 * peak)
    lesion = hot == hot.flat[int(np.argmax(uptake))]
    distance = ndimage.distance_transform_edt(~lesion)
    ring = (distance >= 14) & (distance <= 30) & (uptake < 0.6 * peak) & head
    return lesion, ring


def measure(rgb: np.ndarray, lesion: np.ndarray, ring: np.ndarray, head: np.ndarray,
            fused_y: np.ndarray | None = None) -> dict:
    from skimage.color import deltaE_ciede2000, rgb2lab

    from LightFusionLib.colour import luma

    lab = rgb2lab(rgb.astype(np.float64) / 255)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    row = {"a": lab[..., 1][lesion].mean(), "C": chroma[lesion].mean(),
           "dE00": float(deltaE_ciede2000(lab[lesion].mean(0), lab[ring].mean(0))), "head_C": chroma[head].mean()}
    if fused_y is not None:
        row["dY"] = float(np.abs(luma(rgb.astype(np.float32)) - fused_y)[lesion].mean())
    return row


def demo_plane(backend) -> dict:
    """The bundled pair's axial montage cell through its hottest point: MRI, PET (RGB), uptake, and each mode's fused RGB."""
    from LightFusionLib.colour import luma
    from LightFusionLib.demo import _orthogonal_planes, hottest_point, sample_paths
    from LightFusionLib.fusion import fuse_prepared, prepare_pair
    from LightFusionLib.geometry import to_canonical
    from LightFusionLib.volumeio import read_volume
    import SimpleITK as sitk

    pair = prepare_pair(*(read_volume(p) for p in sample_paths()), "pet-mri")
    point = hottest_point(pair)

    def cell(volume: np.ndarray) -> np.ndarray:
        rgb = volume if volume.ndim == 4 else np.repeat(volume[..., None], 3, axis=-1)
        return _orthogonal_planes(np.ascontiguousarray(rgb), pair.reference, point)[0]

    planes = {"mri": cell(np.rint(pair.mri * 255).astype(np.uint8))[..., 0].astype(np.float32),
              "pet": cell(pair.other_display()),
              "uptake": cell(np.rint(pair.other * 255).astype(np.uint8))[..., 0].astype(np.float32)}
    for mode in MODES:
        fused = to_canonical(fuse_prepared(pair, backend, colour_mode=mode))
        planes[mode] = cell(np.ascontiguousarray(sitk.GetArrayViewFromImage(fused)))
    # 'saturated' shows the fused luma exactly (to uint8 rounding), and the montage's linear resampling
    # commutes with the luma: the fused luma of the cell
    planes["fused_y"] = luma(planes["saturated"].astype(np.float32))
    return planes


def harvard_plane(task: str, name: str, backend) -> dict:
    from LightFusionLib.colormaps import lookup_table
    from LightFusionLib.colour import luma, restore_colour
    from LightFusionLib.data import read_image
    from LightFusionLib.tasks import get_task

    folder = DATA / task.upper()
    mri = read_image(folder / "MRI" / f"{name}.png").astype(np.float32)
    pet = read_image(folder / get_task(task).modality / f"{name}.png")
    pet_y = luma(pet.astype(np.float32))
    fused_y = np.clip(backend(mri[None] / 255, pet_y[None] / 255)[0], 0, 1) * 255
    lut = lookup_table(get_task(task).default_colormap)
    nearest = np.argmin(((pet.astype(np.float32)[..., None, :] - lut[None, None]) ** 2).sum(-1), axis=-1)
    planes = {"mri": mri, "pet": pet, "uptake": nearest / (len(lut) - 1) * 255, "fused_y": fused_y}
    for mode in MODES:
        planes[mode] = restore_colour(pet, fused_y, pet_y, mode)
    return planes


def row_for(label: str, planes: dict) -> tuple[str, dict]:
    head = (planes["mri"] > 0.1 * planes["mri"].max()) | (planes["uptake"] > 0)
    lesion, ring = lesion_and_ring(planes["uptake"], head)
    measured = {"pet": measure(planes["pet"], lesion, ring, head)}
    for mode in MODES:
        measured[mode] = measure(planes[mode], lesion, ring, head, planes["fused_y"])
    cells = [f"{measured['pet']['a']:.1f} / {measured['pet']['C']:.1f} (dE00 {measured['pet']['dE00']:.1f})"]
    cells += [f"{measured[m]['a']:.1f} / {measured[m]['C']:.1f} / {measured[m]['dE00']:.1f} / {measured[m]['dY']:.1f}"
              for m in MODES]
    return f"| {label} | " + " | ".join(cells) + " |", measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the montages (MRI, PET, yuv, saturated per row)")
    args = parser.parse_args()
    from LightFusionLib.backends import load_backend

    rows = [("demo, axial through the lesion", demo_plane(load_backend(None, "pet-mri", "onnx", "cpu")))]
    for task, names in HARVARD.items():
        backend = load_backend(None, task, "onnx", "cpu")
        rows += [(f"{task.upper()} {name}", harvard_plane(task, name, backend)) for name in names]
    print("| image | PET a* / C* | yuv a* / C* / dE00 / abs dY | saturated a* / C* / dE00 / abs dY |")
    print("|---|---|---|---|")
    head_chroma = []
    for label, planes in rows:
        line, measured = row_for(label, planes)
        print(line)
        head_chroma.append(f"{label}: PET {measured['pet']['head_C']:.1f}, yuv {measured['yuv']['head_C']:.1f}, "
                           f"saturated {measured['saturated']['head_C']:.1f}")
        if args.out:
            from LightFusionLib.demo import write_png

            grey = np.repeat(np.clip(planes["mri"], 0, 255).astype(np.uint8)[..., None], 3, -1)
            args.out.mkdir(parents=True, exist_ok=True)
            write_png(np.concatenate([grey, planes["pet"], planes["yuv"], planes["saturated"]], axis=1),
                      args.out / (label.split(",")[0].replace(" ", "-") + ".png"))
    print("\nMean chroma over the head: " + "; ".join(head_chroma))


if __name__ == "__main__":
    main()
