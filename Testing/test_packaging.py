"""`pip install .` gives a working, light `lightfusion`: the wheel carries the models and the sample pair as
package data, and installed into a fresh virtual environment without PyTorch (numpy, SimpleITK, ONNX
Runtime, pydicom, nibabel, tqdm only) it runs `lightfusion demo` and `lightfusion fuse`.

The wheel test is marked slow (it builds the wheel and pip-installs its dependencies: a minute or two);
`make test` and CI run it. The static checks below it run always."""
from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "LightFusionLib" / "Resources"
LIGHT_VENV_LIMIT_MB = 600  # the light set measures about 400 MB; PyTorch alone would be far over
HEAVY = ("torch", "vtk", "slicer", "onnx", "pytest")


def _package_data_globs() -> list[str]:
    """pyproject's package-data as paths under LightFusionLib/ ("Resources/Models/*.onnx", ...)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"\[tool\.setuptools\.package-data\]\s*(.*?)\n\n", text, re.S).group(1)
    globs = []
    for package, patterns in re.findall(r'^"LightFusionLib\.([\w.]+)"\s*=\s*\[(.*?)\]', block, re.M):
        globs += [f"{package.replace('.', '/')}/{g}" for g in re.findall(r'"([^"]+)"', patterns)]
    return globs


def _cmake_globs() -> list[str]:
    text = (REPO / "LightFusion" / "CMakeLists.txt").read_text()
    return re.findall(r"\$\{LIGHTFUSION_ROOT\}/LightFusionLib/(Resources/\S+)", text)


def _resource_files() -> list[str]:
    return sorted(str(p.relative_to(RESOURCES.parent)) for p in RESOURCES.rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts)


def test_wheel_and_slicer_cmake_ship_the_same_package_data():
    files = _resource_files()
    assert any(f.endswith(".onnx") for f in files) and any(f.endswith(".nrrd") for f in files)
    for globs, where in ((_package_data_globs(), "pyproject package-data"), (_cmake_globs(), "Slicer CMake")):
        assert globs, where
        left_out = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
        assert left_out == [], f"{where} leaves out {left_out}"


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone would have (tracked, plus new ones not ignored), without build leftovers."""
    dest.mkdir()
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                  and not {".git", ".venv", "build", "__pycache__", ".pytest_cache"} & set(p.relative_to(REPO).parts)
                  and not any(part.endswith(".egg-info") for part in p.parts)]
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_without_torch_and_runs_demo_and_fuse(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LIGHTFUSION_MODELS", "LIGHTFUSION_SAMPLE_DATA", "VIRTUAL_ENV")}
    src = _source_copy(tmp_path / "src")

    # 1. the wheel, built as `pip install .` builds it
    wheels = tmp_path / "wheels"
    # the [test] extra brings setuptools>=77: build with it, without downloading the build backend again
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", wheels, src], tmp_path, env)
    (wheel,) = wheels.glob("lightfusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for task in ("pet-mri", "spect-mri", "ct-mri"):
        assert f"LightFusionLib/Resources/Models/{task}.onnx" in names
        assert f"LightFusionLib/Resources/Models/{task}.pt" in names
    assert "LightFusionLib/Resources/SampleData/mni152-t1.nrrd" in names
    assert "LightFusionLib/Resources/Models/README.md" in names  # the model card
    assert not [n for n in names if n.startswith(("Testing/", "LightFusion/", "scripts/"))]

    # 2. a fresh virtual environment with only the wheel and its (light) dependencies
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, lightfusion = venv / "bin" / "python", venv / "bin" / "lightfusion"
    _run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env, timeout=900)
    found = _run([python, "-c", "import importlib.util as u, json; "
                  f"print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)]))"], tmp_path, env).stdout
    assert json.loads(found) == [], f"heavy packages in the light install: {found}"
    size = _size_mb(venv)
    print(f"\nlight venv (wheel + dependencies): {size:.0f} MB")
    assert size < LIGHT_VENV_LIMIT_MB

    # 3. the installed command, run away from the checkout: models and sample from the installed package
    work = tmp_path / "work"
    work.mkdir()
    version = _run([lightfusion, "--version"], work, env).stdout.strip()
    assert re.fullmatch(r"lightfusion \d+\.\d+\.\d+\S*", version)
    info = json.loads(_run([lightfusion, "info", "--json"], work, env).stdout)
    assert Path(info["package"]).is_relative_to(venv) and Path(info["models_dir"]).is_relative_to(venv)
    assert {m["task"] for m in info["models"] if m["format"] == "onnx"} == {"pet-mri", "spect-mri", "ct-mri"}
    assert not info["backends"]["torch"]["installed"] and info["default_backend"] == "onnx on cpu"

    demo = _run([lightfusion, "demo", "--out", "demo", "--quiet"], work, env)
    assert "onnx on cpu" in demo.stdout
    for name in ("fused.nrrd", "montage.png", "metrics.json"):
        assert (work / "demo" / name).stat().st_size > 0
    mri, pet = json.loads(_run([python, "-c", "import json; from LightFusionLib.demo import sample_paths; "
                                "print(json.dumps([str(p) for p in sample_paths()]))"], work, env).stdout)
    assert Path(mri).is_relative_to(venv)
    _run([lightfusion, "fuse", mri, pet, "-o", "fused.nii.gz", "--quiet"], work, env)
    header = _run([python, "-c", "import nibabel as nib; im = nib.load('fused.nii.gz'); "
                   "print(int(im.header['datatype']), len(im.shape))"], work, env).stdout.split()
    assert header == ["128", "3"]  # colour NIfTI: RGB24, 3-D
