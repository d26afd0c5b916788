"""`lightfusion evaluate` scores like the field: the fused luma against the grey-level sources
(``--score-on luma``, default) reproduces the reference evaluator's values in shared/metrics; the
RGB convention (``--score-on rgb``) stays available. And a model of another task is evaluated
(a cross-task experiment), with a note, while `fuse` still refuses it."""
import json
from pathlib import Path

import numpy as np
import pytest

from LightFusionLib.cli import main
from LightFusionLib.evaluation import evaluate
from LightFusionLib.models import shipped_model_path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT.parent / "shared" / "metrics"
HARVARD = ROOT.parent / "shared" / "data" / "harvard" / "train"
TOLERANCE = 1e-4  # shared/metrics/README.md: a conforming implementation reproduces every value to this

needs_data = pytest.mark.skipif(not (METRICS / "reference_values.json").is_file() or not HARVARD.is_dir(),
                                reason="shared/metrics or shared/data/harvard not present")


def _reference() -> list[dict]:
    return json.loads((METRICS / "reference_values.json").read_text())


def _pair_folder(tmp_path: Path, task_label: str, names: list[str]) -> Path:
    """A data folder (MRI/ and PET|SPECT|CT/) holding only ``names`` of ``task_label``'s pairs."""
    modality = task_label.split("-")[0]
    folder = tmp_path / task_label
    for sub in ("MRI", modality):
        (folder / sub).mkdir(parents=True)
        for name in names:
            (folder / sub / name).symlink_to(HARVARD / task_label / sub / name)
    return folder


def _check(row: dict, expected: dict, what: str) -> None:
    bad = {k: (row[k], v) for k, v in expected.items() if not np.isclose(row[k], v, rtol=TOLERANCE, atol=0)}
    assert not bad, f"{what}: (ours, reference) {bad}"


@needs_data
@pytest.mark.parametrize("task_label", ["PET-MRI", "SPECT-MRI", "CT-MRI"])
def test_luma_scoring_reproduces_the_reference_values(tmp_path, task_label):
    entries = [e for e in _reference() if e["task"] == task_label]
    assert entries
    for name in sorted({e["pair"] for e in entries}):
        data = _pair_folder(tmp_path / name.split(".")[0], task_label, [name])
        report = evaluate(data, task_label, methods=["average", "max"], progress=False)  # default: luma
        assert report["score_on"] == "luma" and report["pairs"] == 1
        for e in entries:
            if e["pair"] == name:
                _check(report["methods"][e["fusion"]], e["metrics"], f"{task_label} {name} {e['fusion']}")


@needs_data
def test_rgb_scoring_is_the_clipped_colour_image_and_differs_where_colours_saturate(tmp_path):
    """30058 is one of the saturated pairs: the luma of the clipped RGB result is not the fused luma."""
    data = _pair_folder(tmp_path, "PET-MRI", ["30058.png"])
    luma = evaluate(data, "pet-mri", methods=["max"], progress=False, score_on="luma")["methods"]["max"]
    rgb = evaluate(data, "pet-mri", methods=["max"], progress=False, score_on="rgb")["methods"]["max"]
    ref = next(e["metrics"] for e in _reference() if e["pair"] == "30058.png" and e["fusion"] == "max")
    assert np.isclose(luma["SD"], ref["SD"], rtol=TOLERANCE)
    assert abs(rgb["SD"] / ref["SD"] - 1) > 1e-3  # the old convention is not the field's here


@needs_data
def test_cli_score_on_option(tmp_path, capsys):
    data = _pair_folder(tmp_path, "SPECT-MRI", ["3037.png"])
    out = {}
    for mode in ("luma", "rgb"):
        path = tmp_path / f"{mode}.json"
        assert main(["evaluate", "--data", str(data), "--task", "spect-mri", "--methods", "max", "--quiet",
                     "--score-on", mode, "--json", str(path)]) == 0
        out[mode] = json.loads(path.read_text())
        assert out[mode]["score_on"] == mode
    ref = next(e["metrics"] for e in _reference() if e["pair"] == "3037.png" and e["fusion"] == "max")
    _check(out["luma"]["methods"]["max"], ref, "SPECT-MRI 3037 max via the CLI")
    assert main(["evaluate", "--data", str(data), "--task", "spect-mri", "--score-on", "y"]) == 2


def test_ct_scores_the_same_either_way(tmp_path):
    from tiny_pairs import make_pairs

    data = make_pairs(tmp_path / "d", modality="CT")
    a = evaluate(data, "ct-mri", methods=["average", "max"], progress=False, score_on="luma")
    b = evaluate(data, "ct-mri", methods=["average", "max"], progress=False, score_on="rgb")
    for m in ("average", "max"):
        a["methods"][m].pop("seconds"), b["methods"][m].pop("seconds")
        assert a["methods"][m] == b["methods"][m]


@needs_data
@pytest.mark.parametrize("suffix,backend", [(".pt", "torch"), (".onnx", "onnx")])
def test_evaluate_runs_a_model_of_another_task(tmp_path, suffix, backend, capsys):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    else:
        pytest.importorskip("torch")
    model = shipped_model_path("pet-mri", suffix)
    data = _pair_folder(tmp_path, "SPECT-MRI", ["3037.png", "10007.png"])
    path = tmp_path / "cross.json"
    assert main(["evaluate", "--data", str(data), "--task", "spect-mri", "--model", str(model),
                 "--methods", "lightfusion,max", "--backend", backend, "--quiet", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["model_task"] == "pet-mri" and "trained for pet-mri" in report["note"]
    row = report["methods"]["lightfusion"]
    assert all(np.isfinite(v) for v in row.values())
    assert "trained for pet-mri" in capsys.readouterr().out
    # fusing a SPECT with the PET model is still refused
    from LightFusionLib.backends import load_backend
    from LightFusionLib.models import ModelError

    with pytest.raises(ModelError, match="trained for pet-mri"):
        load_backend(model, "spect-mri", backend)


@needs_data
def test_evaluate_with_the_model_of_the_task_has_no_note(tmp_path):
    pytest.importorskip("torch")
    data = _pair_folder(tmp_path, "PET-MRI", ["25015.png"])
    report = evaluate(data, "pet-mri", model=shipped_model_path("pet-mri"), methods=["lightfusion"],
                      backend="torch", progress=False)
    assert "note" not in report and "model_task" not in report
