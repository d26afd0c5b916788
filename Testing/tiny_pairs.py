"""Small synthetic paired-slice folders (real PNG files written with SimpleITK) for tests."""
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HARVARD = SHARED / "data" / "harvard" / "train"


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8), isVector=array.ndim == 3), str(path))


def make_pairs(root: Path, modality: str = "PET", names=("1001", "1002", "2001", "2002", "3001"),
               size: int = 32, seed: int = 0) -> Path:
    """root/MRI/<name>.png (gray) + root/<modality>/<name>.png (RGB for PET/SPECT, gray for CT)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i, name in enumerate(names):
        blob = 255 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2 - i) ** 2) / (2 * (size / 5) ** 2))
        mri = np.clip(blob * 0.6 + rng.normal(0, 20, (size, size)) + 40 * (xx > size / 2), 0, 255)
        write_png(root / "MRI" / f"{name}.png", mri)
        if modality == "CT":
            other = np.clip(255 * ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 > (size / 2.5) ** 2), 0, 255)
        else:
            heat = np.clip(blob + rng.normal(0, 10, (size, size)), 0, 255)
            other = np.stack([heat, heat * 0.6, 255 - heat], axis=-1)
        write_png(root / modality / f"{name}.png", other)
    return root
