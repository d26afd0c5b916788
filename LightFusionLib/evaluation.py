"""Side-by-side evaluation of LightFusion and the classical baselines on paired 2-D slices.

Every method fuses the luma (Y) of the functional image with the MRI; for pseudo-colour PET/SPECT
the fused Y is put back with the source's chroma (U, V) and the RGB result is scored on its
rounded BT.601 luma, as the field's reference evaluator does.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .baselines import BASELINES
from .colour import luma, replace_luma
from .data import DataError, find_pairs, load_pairs
from .errors import LightFusionError
from .fileio import check_output_folder
from .tasks import check_task
from .metrics import METRIC_NAMES, evaluate_fusion

METHODS = ("lightfusion",) + tuple(BASELINES)


def _fuse_method(method: str, mri: np.ndarray, other_y: np.ndarray, backend) -> np.ndarray:
    """(N,H,W) [0,1] inputs -> (N,H,W) [0,1] fused luma."""
    if method == "lightfusion":
        batch = max(1, getattr(backend, "preferred_batch", 4))
        return np.concatenate([backend(mri[i:i + batch], other_y[i:i + batch]) for i in range(0, len(mri), batch)])
    return BASELINES[method](other_y, mri)


def evaluate(data: str | Path, task: str, model: str | Path | None = None,
             methods: list[str] | None = None, backend: str = "auto", device: str = "auto",
             save_images: str | Path | None = None, cases: list[str] | None = None,
             progress: bool = True, half: bool = False) -> dict:
    """Run each method over all pairs of ``data`` (optionally only ``cases``) and score it.

    Returns ``{"task", "pairs", "methods": {name: {metric: mean, ..., "seconds": float}}}``, metric
    means over pairs; "seconds" is the method's total fusion time over all pairs.
    """
    from tqdm import tqdm

    task = check_task(task)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LightFusionError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    pairs = find_pairs(data, task)
    if cases:
        pairs = [p for p in pairs if p.case in set(cases)]
        if not pairs:
            raise DataError(f"no pairs of case(s) {', '.join(cases)} in {data}")
    net = None
    if "lightfusion" in methods:
        from .backends import load_backend

        net = load_backend(model, task, backend, device, half=half)
    arrays = load_pairs(pairs)
    if save_images:  # inputs are all checked: make (and check) it now, not after every method has run
        check_output_folder(save_images, "image folder")
    mri = arrays.mri.astype(np.float32) / 255.0
    colour = arrays.other.ndim == 4
    other_y = luma(arrays.other) / 255.0

    report = {"task": task, "pairs": len(pairs), "methods": {}}
    if net is not None:
        report["backend"] = net.describe()
    for method in methods:
        t0 = time.perf_counter()
        fused_y = _fuse_method(method, mri, other_y, net)
        seconds = time.perf_counter() - t0
        fused = replace_luma(arrays.other, fused_y * 255.0) if colour else np.clip(np.rint(fused_y * 255.0), 0, 255).astype(np.uint8)
        scores = {k: [] for k in METRIC_NAMES}
        for i in tqdm(range(len(pairs)), desc=f"score {method}", disable=not progress, leave=False):
            for k, v in evaluate_fusion(fused[i], arrays.other[i], arrays.mri[i]).items():
                scores[k].append(v)
        row = {k: float(np.mean(v)) for k, v in scores.items()}
        row["seconds"] = round(seconds, 4)
        report["methods"][method] = row
        if save_images:
            _save_images(Path(save_images) / method, arrays.names, fused)
    return report


def _save_images(folder: Path, names: list[str], fused: np.ndarray) -> None:
    import SimpleITK as sitk

    from .fileio import atomic_output

    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, fused):
        with atomic_output(folder / f"{name}.png") as tmp:
            sitk.WriteImage(sitk.GetImageFromArray(image, isVector=image.ndim == 3), str(tmp))


def format_table(report: dict) -> str:
    """Markdown table: one row per method, metric columns then seconds; best value per column in bold."""
    columns = list(METRIC_NAMES) + ["seconds"]
    rows = report["methods"]
    best = {}
    for c in columns:
        values = [r[c] for r in rows.values()]
        best[c] = min(values) if c == "seconds" else max(values)
    lines = [f"{report['task']}: {report['pairs']} pairs",
             "| method | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        cells = [(f"**{r[c]:.4g}**" if r[c] == best[c] and len(rows) > 1 else f"{r[c]:.4g}") for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
