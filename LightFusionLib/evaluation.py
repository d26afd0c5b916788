"""Side-by-side evaluation of LightFusion and the classical baselines on paired 2-D slices.

Every method fuses the luma (Y) of the functional image with the MRI. What is scored
(``score_on``):

- ``"luma"`` (default, the field's convention: CDDFuse's test script and the MMIF evaluator): the
  fused luma as the method outputs it, rounded to 8 bits, against the grey-level sources (the
  PET/SPECT's BT.601 luma rounded to integers, which is also what the methods fuse). These
  numbers are comparable with published ones (``shared/metrics``).
- ``"rgb"``: what a user sees. The fused Y is put back with the source's chroma (U, V), R, G, B
  rounded and clipped to [0, 255], and that image is scored on its rounded BT.601 luma; the
  methods fuse the unrounded source luma. Clipping changes the luma where colours saturate, so
  these differ from the field's numbers on saturated pairs.

CT-MRI is grayscale: both conventions give the same numbers.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .baselines import BASELINES
from .colour import check_colour_mode, luma, restore_colour
from .data import DataError, find_pairs, load_pairs
from .errors import LightFusionError
from .fileio import check_output_folder
from .tasks import check_task
from .metrics import METRIC_NAMES, evaluate_fusion

METHODS = ("lightfusion",) + tuple(BASELINES)
SCORE_ON = ("luma", "rgb")


def model_task(model: str | Path) -> str | None:
    """The task a model file (.pt or .onnx) was trained for, or None when the file does not say."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        from .backends import onnx_metadata

        try:
            return onnx_metadata(path).get("lightfusion_task") or None
        except (OSError, ValueError, IndexError):
            return None
    from .models import read_model_file

    return read_model_file(path).get("task")


def _fuse_method(method: str, mri: np.ndarray, other_y: np.ndarray, backend) -> np.ndarray:
    """(N,H,W) [0,1] inputs -> (N,H,W) [0,1] fused luma."""
    if method == "lightfusion":
        batch = max(1, getattr(backend, "preferred_batch", 4))
        return np.concatenate([backend(mri[i:i + batch], other_y[i:i + batch]) for i in range(0, len(mri), batch)])
    return BASELINES[method](other_y, mri)


def evaluate(data: str | Path, task: str, model: str | Path | None = None,
             methods: list[str] | None = None, backend: str = "auto", device: str = "auto",
             save_images: str | Path | None = None, cases: list[str] | None = None,
             progress: bool = True, half: bool = False, score_on: str = "luma",
             colour: str | None = None) -> dict:
    """Run each method over all pairs of ``data`` (optionally only ``cases``) and score it.

    ``score_on``: 'luma' (the field's convention, default) or 'rgb' (see the module docstring).
    ``colour``: how PET/SPECT fused luma is coloured for 'rgb' scoring and saved images ('yuv' or
    'saturated', :func:`LightFusionLib.colour.restore_colour`; None: its default); 'luma' scores
    do not depend on it.
    ``model`` may have been trained for another task (a cross-task experiment, e.g. the PET-MRI
    model on SPECT-MRI pairs): it is run as it is, and the report says so.

    Returns ``{"task", "pairs", "score_on", "methods": {name: {metric: mean, ..., "seconds": float}}}``,
    metric means over pairs; "seconds" is the method's total fusion time over all pairs. With a
    model of another task, also ``"model_task"`` and ``"note"``.
    """
    from tqdm import tqdm

    task = check_task(task)
    if score_on not in SCORE_ON:
        raise LightFusionError(f"unknown score_on {score_on!r}; choose from {', '.join(SCORE_ON)}")
    try:
        colour_mode = check_colour_mode(colour)
    except ValueError as exc:
        raise LightFusionError(str(exc)) from None
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
    trained_for = None
    if "lightfusion" in methods:
        from .backends import load_backend

        if model is not None and Path(model).is_file():
            trained_for = model_task(model)
        # A model of another task is run as it is (the backend checks it against its own task).
        net = load_backend(model, trained_for or task, backend, device, half=half)
    arrays = load_pairs(pairs)
    if save_images:  # inputs are all checked: make (and check) it now, not after every method has run
        check_output_folder(save_images, "image folder")
    mri = arrays.mri.astype(np.float32) / 255.0
    is_colour = arrays.other.ndim == 4
    source_y = luma(arrays.other)  # 0-255 float32
    if score_on == "luma":
        source_y = np.rint(source_y)  # the grey-level source, as the field reads it
        scored_other = source_y.astype(np.uint8)
    other_y = source_y / np.float32(255)

    report = {"task": task, "pairs": len(pairs), "score_on": score_on, "methods": {}}
    if is_colour and score_on == "rgb":
        report["colour"] = colour_mode
    if net is not None:
        report["backend"] = net.describe()
        if trained_for and trained_for != task:
            report["model_task"] = trained_for
            report["note"] = f"the model was trained for {trained_for}, not {task} (a cross-task evaluation)"
    for method in methods:
        t0 = time.perf_counter()
        fused_y = _fuse_method(method, mri, other_y, net)
        seconds = time.perf_counter() - t0
        grey = _to_uint8(fused_y)
        # The image a user sees (and --save-images writes): RGB for PET/SPECT, grey for CT.
        fused = restore_colour(arrays.other, fused_y * 255.0, None, colour_mode) if is_colour else grey
        scored, scored_a = (grey, scored_other) if score_on == "luma" else (fused, arrays.other)
        scores = {k: [] for k in METRIC_NAMES}
        for i in tqdm(range(len(pairs)), desc=f"score {method}", disable=not progress, leave=False):
            for k, v in evaluate_fusion(scored[i], scored_a[i], arrays.mri[i]).items():
                scores[k].append(v)
        row = {k: float(np.mean(v)) for k, v in scores.items()}
        row["seconds"] = round(seconds, 4)
        report["methods"][method] = row
        if save_images:
            _save_images(Path(save_images) / method, arrays.names, fused)
    return report


def _to_uint8(fused_y: np.ndarray) -> np.ndarray:
    """[0, 1] fused luma -> uint8 0-255, rounded half to even like the field's np.round.

    Values are snapped to 1e-3 grey levels first, so float noise from the [0, 1] scale (e.g.
    (10 + 11) / 2 computed as 10.500001) does not decide a tie that the exact value would.
    """
    y = np.round(np.asarray(fused_y, np.float64) * 255.0, 3)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


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
