"""`lightfusion --version`, `lightfusion info`, a help line for every option, and the one place the shipped
models and the sample pair live (package data, with the LIGHTFUSION_MODELS override)."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import LightFusionLib
from LightFusionLib.cli import build_parser, main
from LightFusionLib.demo import sample_data_dir, sample_paths
from LightFusionLib.info import read_onnx_summary
from LightFusionLib.models import models_dir
from LightFusionLib.tasks import TASK_NAMES

PACKAGE = Path(LightFusionLib.__file__).resolve().parent


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lightfusion {LightFusionLib.__version__}"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_a_help_line():
    parser = build_parser()
    missing = [f"lightfusion {' '.join(a.option_strings) or a.dest}" for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    for name, command in _commands(parser).items():
        missing += [f"lightfusion {name} {'/'.join(a.option_strings) or a.dest}" for a in command._actions
                    if a.help is not argparse.SUPPRESS and not (a.help and a.help.strip())]
    assert missing == []
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in sub._choices_actions)  # every command is described in `lightfusion -h`


def test_info_lists_version_models_backends_and_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lightfusion {LightFusionLib.__version__}\n")
    for task in TASK_NAMES:
        assert f"{task}.onnx" in out
    assert "4,265 parameters" in out
    assert "onnx" in out and "devices: cpu" in out and "default (--backend auto --device auto):" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == LightFusionLib.__version__
    assert Path(info["models_dir"]) == PACKAGE / "Resources" / "Models"
    onnx = {m["task"]: m for m in info["models"] if m["format"] == "onnx"}
    assert set(onnx) == set(TASK_NAMES) and {m["parameters"] for m in onnx.values()} == {4265}
    assert info["backends"]["onnx"]["installed"] and "cpu" in info["backends"]["onnx"]["devices"]


def test_onnx_parameters_counted_without_onnx_match_the_network():
    """The protobuf reading in `info` against PyTorch's count of the same model's parameters."""
    torch = pytest.importorskip("torch")
    from LightFusionLib.models import load_model

    for task in TASK_NAMES:
        net, _ = load_model(None, task)
        summary = read_onnx_summary(models_dir() / f"{task}.onnx")
        assert summary["parameters"] == sum(p.numel() for p in net.parameters()) == 4265
        assert summary["metadata"]["lightfusion_task"] == task
    del torch


def test_models_and_sample_live_in_the_package():
    """One place: LightFusionLib/Resources (package data in the wheel, installed the same by the Slicer CMake)."""
    assert models_dir() == PACKAGE / "Resources" / "Models"
    assert sample_data_dir() == PACKAGE / "Resources" / "SampleData"
    for task in TASK_NAMES:
        assert (models_dir() / f"{task}.onnx").is_file() and (models_dir() / f"{task}.pt").is_file()
    assert all(p.is_file() for p in sample_paths())
    assert not (PACKAGE.parent / "Resources").exists()  # the old top-level copy is gone


def test_models_override(tmp_path):
    shutil.copy(models_dir() / "ct-mri.onnx", tmp_path / "ct-mri.onnx")
    env = {"LIGHTFUSION_MODELS": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-m", "LightFusionLib", "info", "--json"], capture_output=True, text=True,
                         env=env, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["models_dir"] == str(tmp_path) and info["models_dir_from"] == "LIGHTFUSION_MODELS"
    assert [m["file"] for m in info["models"]] == ["ct-mri.onnx"]
