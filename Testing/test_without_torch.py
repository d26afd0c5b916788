"""Inference needs no PyTorch: `lightfusion fuse` and the library run on ONNX Runtime alone."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
ONNX = REPO / "LightFusionLib" / "Resources" / "Models" / "pet-mri.onnx"

# The light install (no extras): make `import torch` and `import openvino` fail the way they do
# where they are not installed.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "openvino"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=REPO, capture_output=True, text=True)


@pytest.mark.skipif(not ONNX.is_file(), reason="shipped ONNX model not present")
def test_fuse_cli_runs_on_onnx_runtime_alone(tmp_path):
    rng = np.random.default_rng(0)
    mri = sitk.GetImageFromArray((rng.random((6, 40, 48)) * 300).astype(np.float32))
    pet = sitk.GetImageFromArray((rng.random((6, 40, 48)) * 5).astype(np.float32))
    sitk.WriteImage(mri, str(tmp_path / "mri.nrrd"))
    sitk.WriteImage(pet, str(tmp_path / "pet.nrrd"))
    out = tmp_path / "fused.nrrd"
    code = f"""
from LightFusionLib.cli import main
from LightFusionLib.backends import choose_backend
import json
print(json.dumps(choose_backend("auto", "auto")))
rc = main(["fuse", r"{tmp_path / 'mri.nrrd'}", r"{tmp_path / 'pet.nrrd'}", "-o", r"{out}", "--quiet"])
assert "torch" not in sys.modules
sys.exit(rc)
"""
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0]) == ["onnx", "cpu"]
    fused = sitk.ReadImage(str(out))
    assert fused.GetSize() == (48, 40, 6) and fused.GetNumberOfComponentsPerPixel() == 3


def test_torch_backend_without_torch_is_a_clear_error():
    result = run_without_torch("""
from LightFusionLib.cli import main
sys.exit(main(["benchmark", "--backend", "torch", "--no-volume"]))
""")
    assert result.returncode == 2
    assert "torch is not installed" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.skipif(not ONNX.is_file(), reason="shipped ONNX model not present")
def test_slicer_logic_fuses_on_onnx_runtime_alone():
    pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    result = run_without_torch(f"""
sys.path[:0] = [r"{REPO}", r"{REPO / 'LightFusion'}"]
import numpy as np, slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
from LightFusionSlicerLib.logic import LightFusionLogic
rng = np.random.default_rng(0)
mri = slicer.util.addVolumeFromArray((rng.random((5, 30, 40)) * 300).astype(np.float32), name="MRI")
pet = slicer.util.addVolumeFromArray((rng.random((5, 30, 40)) * 5).astype(np.float32), name="PET")
out = LightFusionLogic().process(mri, pet, task="pet-mri")
assert "torch" not in sys.modules
print(out.GetClassName(), slicer.util.arrayFromVolume(out).shape)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:1] == ["vtkMRMLVectorVolumeNode"]
    assert "(5, 30, 40, 3)" in result.stdout
