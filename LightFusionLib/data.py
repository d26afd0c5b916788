"""Paired 2-D training/evaluation data: discovery, validation, loading, case-level splits, crops.

Layout (the shared Harvard layout): ``DIR/MRI/<name>.png`` paired with ``DIR/PET|SPECT|CT/<name>.png``.
``DIR`` may also be the parent holding ``PET-MRI/``, ``SPECT-MRI/``, ``CT-MRI/``. File names are
``<case><3-digit slice>``; validation splits are made by case, never by slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .colour import luma
from .errors import LightFusionError
from .tasks import check_task, get_task
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataError(LightFusionError):
    """A data folder that cannot be used; the message names the offending files."""


@dataclass(frozen=True)
class Pair:
    name: str  # file stem, e.g. "25015"
    mri: Path
    other: Path

    @property
    def case(self) -> str:
        return case_of(self.name)


def case_of(name: str) -> str:
    """'25015' -> '25' (the last three digits are the slice number)."""
    stem = Path(name).stem
    if len(stem) < 4 or not stem[-3:].isdigit():
        raise DataError(f"file name {name!r} is not <case><3-digit slice>")
    return stem[:-3]


def _describe(paths: list, limit: int = 10) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def find_pairs(data_dir: str | Path, task: str) -> list[Pair]:
    """List the pairs of ``data_dir`` for ``task``, sorted by name; raise DataError if unusable."""
    task = check_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / task.upper()).is_dir() and not (root / "MRI").is_dir():
        root = root / task.upper()
    other_dir = root / get_task(task).modality
    missing = [str(d) for d in (root / "MRI", other_dir) if not d.is_dir()]
    if missing:
        raise DataError(f"data folder {root} lacks {_describe(missing)} (expected MRI/ and {get_task(task).modality}/)")
    mri, other = _images_in(root / "MRI"), _images_in(other_dir)
    if not mri and not other:
        raise DataError(f"no images in {root / 'MRI'} or {other_dir}")
    unpaired = sorted(set(mri) ^ set(other))
    if unpaired:
        files = [mri.get(n) or other.get(n) for n in unpaired]
        raise DataError(f"{len(unpaired)} unpaired file(s) in {root}: {_describe(files)}")
    return [Pair(n, mri[n], other[n]) for n in sorted(mri)]


def read_image(path: Path) -> np.ndarray:
    """Read a 2-D image with SimpleITK -> (H,W) or (H,W,3) uint8 array. Raises DataError."""
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise DataError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
    if array.ndim == 3 and array.shape[-1] == 4:  # RGBA PNGs: drop alpha
        array = array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise DataError(f"{path} is not a 2-D grayscale or RGB image (array shape {array.shape})")
    return array


@dataclass
class PairArrays:
    """Loaded pairs. ``mri`` (N,H,W) uint8, ``other`` (N,H,W) or (N,H,W,3) uint8, ``names`` N stems."""

    names: list[str]
    mri: np.ndarray
    other: np.ndarray

    @property
    def other_luma(self) -> np.ndarray:
        """(N,H,W) float32 0-255 luma of the functional / CT image."""
        return luma(self.other)


def load_pairs(pairs: list[Pair]) -> PairArrays:
    """Read every pair; one DataError lists all unreadable files or all size mismatches."""
    if not pairs:
        raise DataError("no image pairs to load")
    mri, other, unreadable = [], [], []
    for p in pairs:
        for path, sink in ((p.mri, mri), (p.other, other)):
            try:
                sink.append(read_image(path))
            except DataError:
                unreadable.append(path)
    if unreadable:
        raise DataError(f"{len(unreadable)} unreadable image file(s): {_describe(unreadable)}")
    shapes = [m.shape[:2] for m in mri] + [o.shape[:2] for o in other]
    reference = shapes[0]
    paths = [p.mri for p in pairs] + [p.other for p in pairs]
    odd = [f"{path} ({s[0]}x{s[1]})" for path, s in zip(paths, shapes) if s != reference]
    if odd:
        raise DataError(f"mixed image sizes (first is {reference[0]}x{reference[1]}): {_describe(odd)}")
    grey = [m if m.ndim == 2 else np.rint(luma(m)).astype(np.uint8) for m in mri]
    kinds = {o.ndim for o in other}
    if len(kinds) > 1:  # mixed RGB / grayscale functional images: use luma for all
        other = [o if o.ndim == 2 else np.rint(luma(o)).astype(np.uint8) for o in other]
    return PairArrays([p.name for p in pairs], np.stack(grey), np.stack(other))


def split_by_case(pairs: list[Pair], val_cases: list[str] | None) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, validation) by case id; unknown case ids raise DataError."""
    if not val_cases:
        return list(pairs), []
    cases = {p.case for p in pairs}
    unknown = sorted(set(val_cases) - cases)
    if unknown:
        raise DataError(f"validation case(s) {', '.join(unknown)} not in data (cases: {', '.join(sorted(cases, key=int))})")
    if set(val_cases) >= cases:
        raise DataError("validation cases cover every case: nothing left to train on")
    train = [p for p in pairs if p.case not in val_cases]
    val = [p for p in pairs if p.case in val_cases]
    return train, val


def to_unit(arrays: PairArrays) -> tuple[np.ndarray, np.ndarray]:
    """-> (mri, other_luma) as float32 (N,H,W) in [0, 1], the network's input scale."""
    return arrays.mri.astype(np.float32) / 255.0, arrays.other_luma / 255.0


def random_crops(mri: np.ndarray, other: np.ndarray, size: int, rng: np.random.Generator,
                 count: int | None = None, rotate: bool = False,
                 jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Same random crop, flips and (``rotate``) 90-degree rotation for both modalities.

    ``jitter`` > 0 scales each modality's contrast independently by a factor in
    [1 - jitter, 1 + jitter] about its crop mean (clipped to [0, 1]), so the network does not
    learn one scanner's exact grey levels.
    mri, other: (N,H,W) float32. Returns two (count,1,size,size) float32 arrays, one crop per image
    (in a shuffled order) unless ``count`` is given. Without rotate/jitter the random stream is the
    same as before they existed (same seed, same crops).
    """
    n, h, w = mri.shape
    if size > min(h, w):
        raise DataError(f"crop size {size} exceeds image size {h}x{w}")
    idx = rng.permutation(n) if count is None else rng.integers(0, n, count)
    ys = rng.integers(0, h - size + 1, len(idx))
    xs = rng.integers(0, w - size + 1, len(idx))
    flips = rng.integers(0, 2, (len(idx), 2)).astype(bool)
    turns = rng.integers(0, 4, len(idx)) if rotate else np.zeros(len(idx), int)
    out_m = np.empty((len(idx), 1, size, size), np.float32)
    out_o = np.empty_like(out_m)
    for k, (i, y, x, (fv, fh), turn) in enumerate(zip(idx, ys, xs, flips, turns)):
        m, o = mri[i, y:y + size, x:x + size], other[i, y:y + size, x:x + size]
        if fv:
            m, o = m[::-1], o[::-1]
        if fh:
            m, o = m[:, ::-1], o[:, ::-1]
        if turn:
            m, o = np.rot90(m, turn), np.rot90(o, turn)
        out_m[k, 0], out_o[k, 0] = m, o
    if jitter > 0:
        for out in (out_m, out_o):
            gain = rng.uniform(1 - jitter, 1 + jitter, (len(idx), 1, 1, 1)).astype(np.float32)
            mean = out.mean(axis=(2, 3), keepdims=True)
            np.clip((out - mean) * gain + mean, 0.0, 1.0, out=out)
    return out_m, out_o
