"""ONNX export agrees with torch; the onnx backend refuses another task's model."""
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from LightFusionLib.backends import load_backend  # noqa: E402
from LightFusionLib.cli import main  # noqa: E402
from LightFusionLib.models import ModelError  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "pet.onnx"
    assert main(["export-onnx", "--task", "pet-mri", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 100, 77), (2, 256, 256)])
def test_onnx_matches_torch(exported, shape):
    rng = np.random.default_rng(0)
    mri, other = rng.random(shape, np.float32), rng.random(shape, np.float32)
    torch_out = load_backend(None, "pet-mri", "torch", "cpu")(mri, other)
    onnx_out = load_backend(exported, "pet-mri", "onnx", "cpu")(mri, other)
    assert onnx_out.shape == shape
    assert np.abs(torch_out - onnx_out).max() < 1e-5


def test_onnx_task_is_checked(exported):
    with pytest.raises(ModelError, match="trained for pet-mri"):
        load_backend(exported, "ct-mri", "onnx", "cpu")


def test_export_refuses_bad_output(tmp_path, capsys):
    assert main(["export-onnx", "--task", "pet-mri", "-o", str(tmp_path / "x.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["pet-mri", "spect-mri", "ct-mri"])
def test_shipped_onnx_model_is_the_export_of_the_shipped_pt(task):
    """A retrained .pt shipped with a stale .onnx would make the CPU default run another model."""
    from LightFusionLib.models import shipped_model_path

    rng = np.random.default_rng(1)
    mri, other = rng.random((2, 96, 80), np.float32), rng.random((2, 96, 80), np.float32)
    torch_out = load_backend(shipped_model_path(task, ".pt"), task, "torch", "cpu")(mri, other)
    onnx_out = load_backend(shipped_model_path(task, ".onnx"), task, "onnx", "cpu")(mri, other)
    assert np.abs(torch_out - onnx_out).max() < 1e-5
