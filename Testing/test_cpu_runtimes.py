"""The CPU runtimes: ONNX Runtime and OpenVINO run the exported model; ``auto`` picks the faster,
measured once per machine and remembered."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from LightFusionLib import backends  # noqa: E402
from LightFusionLib.backends import (BackendUnavailable, OnnxBackend, OpenVinoBackend, choose_backend,  # noqa: E402
                                     faster_cpu_runtime, load_backend)
from LightFusionLib.demo import sample_paths  # noqa: E402
from LightFusionLib.models import shipped_model_path  # noqa: E402


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "lightfusion" / "cpu-runtime.json"


def test_auto_measures_both_runtimes_once_and_remembers_the_faster(fresh_cache, monkeypatch):
    choice = faster_cpu_runtime()
    known = json.loads(fresh_cache.read_text())
    (entry,) = known.values()
    rates = entry["planes_per_second"]
    assert rates["onnx"] > 1 and rates["openvino"] > 1  # both really ran
    assert choice == entry["choice"] == ("openvino" if rates["openvino"] >= 1.1 * rates["onnx"] else "onnx")

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(backends, "measure_cpu_runtimes", no_second_measurement)
    assert faster_cpu_runtime() == choice
    assert choose_backend("auto", "cpu") == (choice, "cpu")
    # The remembered choice is what 'auto' loads, for the shipped model and for an .onnx file.
    for remembered, kind in (("openvino", OpenVinoBackend), ("onnx", OnnxBackend)):
        fresh_cache.write_text(json.dumps({key: {**entry, "choice": remembered} for key in known}))
        assert isinstance(load_backend(None, "pet-mri", "auto", "cpu"), kind)
        assert isinstance(load_backend(shipped_model_path("pet-mri", ".onnx"), "pet-mri", "auto", "auto"), kind)


def test_a_damaged_choices_file_is_measured_again_and_rewritten(fresh_cache):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text("{not json")
    assert faster_cpu_runtime() in ("onnx", "openvino")
    assert len(json.loads(fresh_cache.read_text())) == 1


def test_openvino_is_refused_where_it_cannot_run(monkeypatch, tmp_path):
    with pytest.raises(BackendUnavailable, match="openvino backend runs on the CPU, not on cuda"):
        choose_backend("openvino", "cuda")
    with pytest.raises(Exception, match="backend 'openvino' needs an .onnx model"):
        load_backend(tmp_path / "model.pt", "pet-mri", "openvino", "cpu")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(BackendUnavailable, match="openvino is not installed .*pip install openvino"):
        choose_backend("openvino", "auto")
    assert faster_cpu_runtime() == "onnx"  # only ONNX Runtime: no measurement


def test_fuse_with_openvino_matches_onnx_runtime_to_a_grey_level(tmp_path):
    mri, pet = sample_paths()
    outputs = {}
    for backend in ("onnx", "openvino"):
        out = tmp_path / f"{backend}.nrrd"
        proc = subprocess.run([sys.executable, "-m", "LightFusionLib", "fuse", str(mri), str(pet), "-o", str(out),
                               "--backend", backend, "--quiet"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"with {backend} on cpu" in proc.stdout
        outputs[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(int)
    difference = np.abs(outputs["openvino"] - outputs["onnx"])
    assert outputs["onnx"].std() > 10 and difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_auto_on_a_machine_without_an_nvidia_driver_does_not_import_torch():
    pytest.importorskip("torch")
    if backends.cuda_driver_present():
        pytest.skip("an NVIDIA driver is installed here")
    code = ("import sys; from LightFusionLib.backends import choose_backend, cuda_available; "
            "print(choose_backend('auto', 'auto'), cuda_available(), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # the GPU question answered without importing torch (about 1.3 s on every fuse before)
    assert proc.stdout.split(")")[1].split() == ["False", "False"]


def test_an_openvino_that_fails_to_run_leaves_auto_on_onnx_runtime(fresh_cache, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("Exception from src/inference: CPU plug-in cannot run here")

    monkeypatch.setattr(OpenVinoBackend, "__call__", broken)
    assert faster_cpu_runtime() == "onnx"
    assert choose_backend("auto", "cpu") == ("onnx", "cpu")
