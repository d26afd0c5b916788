"""`lightfusion evaluate`: every method over all pairs, the JSON schema, saved images."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.cli import main
from LightFusionLib.metrics import METRIC_NAMES
from tiny_pairs import make_pairs


@pytest.mark.parametrize("task,modality", [("pet-mri", "PET"), ("ct-mri", "CT")])
def test_evaluate_json_schema(tmp_path, task, modality, capsys):
    data = make_pairs(tmp_path / "d", modality=modality)
    out = tmp_path / "report.json"
    code = main(["evaluate", "--data", str(data), "--task", task, "--json", str(out), "--quiet",
                 "--backend", "torch", "--save-images", str(tmp_path / "img")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["task"] == task and report["pairs"] == 5
    assert list(report["methods"]) == ["lightfusion", "average", "max", "laplacian"]
    for row in report["methods"].values():
        assert set(row) == set(METRIC_NAMES) | {"seconds"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in row.values())
    table = capsys.readouterr().out
    assert "| lightfusion |" in table and "| laplacian |" in table
    saved = sitk.ReadImage(str(tmp_path / "img" / "max" / "1001.png"))
    assert saved.GetNumberOfComponentsPerPixel() == (3 if modality == "PET" else 1)


def test_evaluate_rejects_unknown_method(tmp_path, capsys):
    data = make_pairs(tmp_path / "d")
    assert main(["evaluate", "--data", str(data), "--task", "pet-mri", "--methods", "max,magic"]) == 2
    assert "magic" in capsys.readouterr().err


def test_max_baseline_scores_match_the_metrics(tmp_path):
    from LightFusionLib.evaluation import evaluate

    data = make_pairs(tmp_path / "d", modality="CT")
    report = evaluate(data, "ct-mri", methods=["max"], progress=False)
    # Fusing by max reproduces max(A, B): its correlation with the brighter source is high.
    assert report["methods"]["max"]["SD"] > 0 and report["pairs"] == 5
