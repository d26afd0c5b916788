"""How every ``lightfusion`` subcommand fails: a user error is ONE line on stderr and exit code 2
(argparse errors too, without the usage block); a bug keeps a short traceback and exits with 1;
outputs are refused before any work; library warnings are one line each; no native (ITK/GDCM)
noise and no internal temporary file names reach the terminal."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.cli import BUG_FRAMES, build_parser, main
from LightFusionLib.demo import SAMPLE_MRI, SAMPLE_PET
from LightFusionLib.models import models_dir
from tiny_pairs import make_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMANDS = ["train", "evaluate", "fuse", "demo", "benchmark", "export-onnx"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line of ``err`` (fails if there are more or none)."""
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    return err.rstrip("\n")


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def write(path: Path, arr: np.ndarray, origin=(0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def head(shape=(8, 16, 16)) -> np.ndarray:
    """A smooth ellipsoid with texture: something an MRI and a PET could both show."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = k**2 / 1.2 + j**2 + i**2 < 0.8
    return np.where(inside, 100 + 40 * np.sin(3 * j) * np.cos(2 * i), 0).astype(np.float32)


@pytest.fixture
def volumes(tmp_path) -> tuple[Path, Path]:
    return write(tmp_path / "mri.nrrd", head()), write(tmp_path / "pet.nrrd", head() / 10)


@pytest.fixture
def locked(tmp_path) -> Iterator[Path]:
    """A folder no one may write to: read-only for a user; /sys for root (root ignores permissions)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("running as root without /sys: no unwritable folder to try")
        yield Path("/sys")
        return
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def must_not_run(*args, **kwargs):
    raise AssertionError("the work started although the output was unusable")


# ----------------------------------------------------------------------------------------------
# 1. argparse errors: one line, no usage block, exit 2; --help complete
# ----------------------------------------------------------------------------------------------
ARGPARSE_ERRORS = [
    (["train", "--data", "d", "--task", "pet-mri"], "lightfusion train: error: the following arguments are required: --out"),
    (["train", "--data", "d", "--task", "pet-mri", "--out", "m.pt", "--epochs", "0"],
     "lightfusion train: error: argument --epochs: a whole number >= 1 is needed, got '0'"),
    (["evaluate", "--data", "d", "--task", "pet-mir"], "lightfusion evaluate: error: argument --task: invalid choice: 'pet-mir'"),
    (["fuse", "a.nrrd", "b.nrrd", "-o", "x.nrrd", "--task", "pet-mir"],
     "lightfusion fuse: error: argument --task: invalid choice: 'pet-mir' (choose from"),
    (["fuse", "a.nrrd", "b.nrrd"], "lightfusion fuse: error: the following arguments are required: -o/--output"),
    (["fuse", "a.nrrd", "b.nrrd", "-o", "x.nrrd", "--mri-window", "5"],
     "lightfusion fuse: error: argument --mri-window: a window is two numbers LO,HI"),
    (["fuse", "a.nrrd", "b.nrrd", "-o", "x.nrrd", "--colormap", "viridis"],
     "lightfusion fuse: error: argument --colormap: unknown colour map 'viridis'"),
    (["demo", "--backend", "tensorflow"], "lightfusion demo: error: argument --backend: invalid choice: 'tensorflow'"),
    (["benchmark", "--batch-sizes", "1,x"], "lightfusion benchmark: error: argument --batch-sizes: comma-separated whole numbers"),
    (["benchmark", "--volume-size", "64,64"], "lightfusion benchmark: error: argument --volume-size: three whole numbers X,Y,Z"),
    (["export-onnx", "--task", "pet-mri"], "lightfusion export-onnx: error: the following arguments are required: -o/--output"),
    (["export-onnx", "--task", "pet-mri", "--model", "m.pt", "-o", "m.onnx"],
     "lightfusion export-onnx: error: argument --model: not allowed with argument --task"),
    (["fusion"], "lightfusion: error: argument command: invalid choice: 'fusion'"),
    # no abbreviations: '--mri' was taken for '--mri-window' and failed on the MRI's path as a window
    (["fuse", "--mri", "a.nrrd", "b.nrrd", "-o", "x.nrrd"], "lightfusion: error: unrecognized arguments: --mri"),
    (["fuse", "a.nrrd", "b.nrrd", "-o", "x.nrrd", "--col", "saturated"],
     "lightfusion: error: unrecognized arguments: --col"),
]


@pytest.mark.parametrize("args, start", ARGPARSE_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in ARGPARSE_ERRORS])
def test_argparse_errors_are_one_line_without_usage(tmp_path, capsys, monkeypatch, args, start):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith(start) and "usage" not in line
    assert list(tmp_path.iterdir()) == []


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_stays_complete(capsys, command):
    code, out, err = run([command, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: lightfusion {command}")
    options = [s for a in _subparser(command)._actions for s in a.option_strings]
    assert options and all(o in out for o in options)


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "LightFusionLib", "fuse", "a.nrrd", "b.nrrd", "-o", "x.nrrd",
                           "--task", "pet-mir"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr).startswith("lightfusion fuse: error: argument --task: invalid choice: 'pet-mir'")


# ----------------------------------------------------------------------------------------------
# 2. only errors raised on purpose (and OS errors) are one-line exit-2 errors; a bug exits 1
# ----------------------------------------------------------------------------------------------
def _data(tmp: Path) -> Path:
    return make_pairs(tmp / "data")


USER_ERRORS = [
    # '--out' as in train/batch/demo is fuse's output too (it was only an abbreviation of '--output')
    ("fuse: --out is --output", lambda t: ["fuse", t / "a.nrrd", t / "b.nrrd", "--out", t / "x.nrrd"],
     "lightfusion fuse: error: MRI", "a.nrrd does not exist"),
    ("fuse: .onnx model on torch", lambda t: ["fuse", t / "a.nrrd", t / "b.nrrd", "-o", t / "x.nrrd",
                                              "--model", t / "m.onnx", "--backend", "torch"],
     "lightfusion fuse: error: model", "runs on the onnx or openvino backend, not torch"),
    ("evaluate: .pt model on onnx", lambda t: ["evaluate", "--data", _data(t), "--task", "pet-mri",
                                               "--model", models_dir() / "pet-mri.pt", "--backend", "onnx"],
     "lightfusion evaluate: error: backend 'onnx' needs an .onnx model", "export-onnx"),
    ("evaluate: unknown method", lambda t: ["evaluate", "--data", _data(t), "--task", "pet-mri", "--methods", "max,magic"],
     "lightfusion evaluate: error: unknown method(s) magic", "choose from"),
    ("evaluate: unknown case", lambda t: ["evaluate", "--data", _data(t), "--task", "pet-mri", "--methods", "max",
                                          "--cases", "9", "--quiet"],
     "lightfusion evaluate: error: no pairs of case(s) 9", ""),
    ("train: width and reduction", lambda t: ["train", "--data", _data(t), "--task", "pet-mri", "--out", t / "m.pt",
                                              "--width", "10", "--reduction", "4"],
     "lightfusion train: error: --width/--reduction:", "multiple of reduction 4"),
    ("train: crop under the SSIM window", lambda t: ["train", "--data", _data(t), "--task", "pet-mri",
                                                     "--out", t / "m.pt", "--crop", "8"],
     "lightfusion train: error: crop must be >= 11", ""),
    ("train: resume from a model", lambda t: ["train", "--data", _data(t), "--task", "pet-mri", "--out", t / "m.pt",
                                              "--resume", models_dir() / "pet-mri.pt", "--crop", "16", "--width", "8"],
     "lightfusion train: error:", "without training state"),
    ("export-onnx: not .onnx", lambda t: ["export-onnx", "--task", "pet-mri", "-o", t / "m.txt"],
     "lightfusion export-onnx: error: output", "must end in .onnx"),
]


@pytest.mark.parametrize("what, args, start, words", USER_ERRORS, ids=[u[0] for u in USER_ERRORS])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, what, args, start, words):
    args = args(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(args, capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(start) and words in line
    assert snapshot(tmp_path) == before


def test_training_on_a_missing_gpu_is_a_user_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, _, err = run(["train", "--data", _data(tmp_path), "--task", "pet-mri", "--out", tmp_path / "m.pt",
                        "--device", "cuda"], capsys)
    assert code == 2 and one_line(err) == ("lightfusion train: error: device 'cuda' requested but no CUDA GPU "
                                           "is available to torch")


def test_an_os_error_names_the_path_and_the_cause(capsys, monkeypatch, volumes):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/pet.nrrd")

    monkeypatch.setattr("LightFusionLib.fusion.fuse_files", denied)
    code, _, err = run(["fuse", *volumes, "-o", "x.nrrd"], capsys)
    assert code == 2 and one_line(err) == "lightfusion fuse: error: /data/pet.nrrd: permission denied"


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("a plain ValueError"),
                                 KeyError("spacing")], ids=lambda e: type(e).__name__)
def test_a_bug_keeps_a_short_traceback_and_exits_1(capsys, monkeypatch, volumes, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr("LightFusionLib.fusion.fuse_files", broken)
    code, _, err = run(["fuse", *volumes, "-o", "x.nrrd"], capsys)
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("Traceback") and "in broken" in err
    assert 1 <= sum(ln.lstrip().startswith("File ") for ln in lines) <= BUG_FRAMES
    assert lines[-1] == (f"lightfusion fuse: internal error (a bug, please report it): "
                         f"{type(bug).__name__}: {str(bug)}")


# ----------------------------------------------------------------------------------------------
# 3. every output is checked before the work starts
# ----------------------------------------------------------------------------------------------
def _sample(tmp: Path, monkeypatch) -> None:
    """Stand-in sample files: the demo only needs them to exist before it checks its output."""
    folder = tmp / "sample"
    folder.mkdir()
    for name in (SAMPLE_MRI, SAMPLE_PET):
        (folder / name).write_bytes(b"")
    monkeypatch.setenv("LIGHTFUSION_SAMPLE_DATA", str(folder))


# (id, args with the output OUT, file name of the output, what must not run)
FILE_OUTPUTS = [
    ("train --out", lambda t, out: ["train", "--data", _data(t), "--task", "pet-mri", "--out", out], "m.pt",
     "LightFusionLib.training.find_pairs"),
    ("evaluate --json", lambda t, out: ["evaluate", "--data", _data(t), "--task", "pet-mri", "--json", out],
     "report.json", "LightFusionLib.evaluation.evaluate"),
    ("fuse -o", lambda t, out: ["fuse", t / "mri.nrrd", t / "pet.nrrd", "-o", out], "fused.nrrd",
     "LightFusionLib.fusion.read_volume"),
    ("benchmark --json", lambda t, out: ["benchmark", "--json", out], "bench.json",
     "LightFusionLib.benchmark.run_benchmark"),
    ("export-onnx -o", lambda t, out: ["export-onnx", "--task", "pet-mri", "-o", out], "m.onnx",
     "LightFusionLib.onnx_export.load_model"),
]
def _folder(path: Path) -> Path:
    path.mkdir()
    return path


TARGETS = [
    ("missing folder", lambda t, locked, name: t / "no" / "such" / name, "folder {parent} does not exist"),
    ("unwritable folder", lambda t, locked, name: locked / name, "folder {parent} is not writable (permission denied)"),
    ("a folder", lambda t, locked, name: _folder(t / name), "{out} is a folder; give a file name"),
]


@pytest.mark.parametrize("target, where, words", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("what, args, name, work", FILE_OUTPUTS, ids=[f[0] for f in FILE_OUTPUTS])
def test_unusable_output_files_fail_before_the_work(tmp_path, capsys, monkeypatch, locked, volumes,
                                                    what, args, name, work, target, where, words):
    monkeypatch.setattr(work, must_not_run)
    args = args(tmp_path, "OUT")
    out = where(tmp_path, locked, name)
    args[args.index("OUT")] = out
    before, locked_before = snapshot(tmp_path), sorted(os.listdir(locked))
    code, stdout, err = run(args, capsys)
    line = one_line(err)
    assert code == 2 and stdout == ""
    assert line.startswith(f"lightfusion {what.split()[0]}: error: ")
    assert words.format(parent=out.parent, out=out) in line
    assert snapshot(tmp_path) == before and sorted(os.listdir(locked)) == locked_before


def test_train_refuses_a_checkpoint_path_that_is_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("LightFusionLib.training.find_pairs", must_not_run)
    (tmp_path / "m.checkpoint.pt").mkdir()
    code, _, err = run(["train", "--data", _data(tmp_path), "--task", "pet-mri", "--out", tmp_path / "m.pt"], capsys)
    assert code == 2 and one_line(err) == f"lightfusion train: error: checkpoint {tmp_path / 'm.checkpoint.pt'} is a folder; give a file name"
    assert not (tmp_path / "m.pt").exists()


FOLDER_OUTPUTS = [
    ("evaluate --save-images", lambda t, out: ["evaluate", "--data", _data(t), "--task", "pet-mri", "--quiet",
                                               "--save-images", out], "image folder", "LightFusionLib.evaluation._fuse_method"),
    ("demo --out", lambda t, out: ["demo", "--out", out, "--quiet"], "demo output folder", "LightFusionLib.demo.prepare_pair"),
]


@pytest.mark.parametrize("what, args, label, work", FOLDER_OUTPUTS, ids=[f[0] for f in FOLDER_OUTPUTS])
def test_unusable_output_folders_fail_before_the_work(tmp_path, capsys, monkeypatch, locked, what, args, label, work):
    _sample(tmp_path, monkeypatch)
    monkeypatch.setattr(work, must_not_run)
    command = what.split()[0]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    runs = [(args(tmp_path, locked / "images"), f"cannot create {label} {locked / 'images'}: permission denied"),
            (args(tmp_path, a_file), f"{label} {a_file} is a file, not a folder")]
    before, locked_before = snapshot(tmp_path), sorted(os.listdir(locked))
    for argv, words in runs:
        code, _, err = run(argv, capsys)
        assert code == 2 and one_line(err) == f"lightfusion {command}: error: {words}"
    assert snapshot(tmp_path) == before and sorted(os.listdir(locked)) == locked_before
    assert a_file.read_text() == "x"


def test_demo_refuses_an_output_file_that_is_a_folder(tmp_path, capsys, monkeypatch):
    _sample(tmp_path, monkeypatch)
    monkeypatch.setattr("LightFusionLib.demo.prepare_pair", must_not_run)
    (tmp_path / "demo" / "montage.png").mkdir(parents=True)
    code, _, err = run(["demo", "--out", tmp_path / "demo", "--quiet"], capsys)
    assert code == 2 and one_line(err).endswith("montage.png is a folder; give a file name")


# ----------------------------------------------------------------------------------------------
# 4. no internal temporary or probe file names in messages
# ----------------------------------------------------------------------------------------------
def test_no_temporary_file_names_in_messages(tmp_path, capsys, monkeypatch, locked, volumes):
    mri, pet = volumes
    failing = [
        ["fuse", mri, pet, "-o", locked / "fused.nrrd", "--quiet"],
        ["fuse", mri, pet, "-o", tmp_path / "fused.jpg", "--quiet", "--device", "cpu"],
        ["export-onnx", "--task", "pet-mri", "-o", locked / "m.onnx"],
        ["benchmark", "--json", locked / "bench.json"],
        ["evaluate", "--data", _data(tmp_path), "--task", "pet-mri", "--methods", "max", "--quiet",
         "--save-images", locked / "images"],
    ]
    for args in failing:
        code, _, err = run(args, capsys)
        assert code == 2 and ".lightfusion-" not in one_line(err)

    def full_disk(mri, other, output, **kwargs):  # an OSError on our temporary, not caught on the way
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output).parent / f".lightfusion-tmp-"
                                                                    f"0123ab-{os.getpid()}-89abcdef-{Path(output).name}"))

    monkeypatch.setattr("LightFusionLib.fusion.fuse_files", full_disk)
    code, _, err = run(["fuse", mri, pet, "-o", tmp_path / "fused.nrrd"], capsys)
    assert code == 2 and one_line(err) == f"lightfusion fuse: error: {tmp_path / 'fused.nrrd'}: the disk is full"


# ----------------------------------------------------------------------------------------------
# 5. library warnings: one line each, exit code unchanged
# ----------------------------------------------------------------------------------------------
def test_a_library_warning_is_one_line_and_the_run_succeeds(tmp_path, capsys):
    mri = head((8, 16, 24))
    write(tmp_path / "mri.nrrd", mri)
    write(tmp_path / "pet.nrrd", np.ascontiguousarray(mri[:, :, :8]) / 10)  # the MRI's left third only
    library_log = logging.getLogger("LightFusionLib")
    handlers = list(library_log.handlers)
    out = tmp_path / "fused.nrrd"
    code, stdout, err = run(["fuse", tmp_path / "mri.nrrd", tmp_path / "pet.nrrd", "-o", out, "--quiet",
                             "--device", "cpu", "--plane-size", "32"], capsys)
    assert code == 0 and stdout.startswith(f"wrote {out}") and out.is_file()
    line = one_line(err)
    assert line.startswith("lightfusion fuse: warning: the PET volume covers only ")
    assert line.endswith("% of the MRI grid; the rest is fused with 0")
    assert library_log.handlers == handlers  # main() removed its handler


# ----------------------------------------------------------------------------------------------
# 6. ITK/GDCM messages never reach the terminal (they write to file descriptor 2 directly)
# ----------------------------------------------------------------------------------------------
def _no_dicom(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _not_dicom_files(tmp: Path) -> Path:
    folder = tmp / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "slice.dcm").write_bytes(np.random.default_rng(0).bytes(2000))
    return folder


def _broken_dicom_file(tmp: Path) -> Path:
    (tmp / "broken.dcm").write_bytes(bytes(128) + b"DICM" + np.random.default_rng(1).bytes(300))
    return tmp / "broken.dcm"


def _garbage_volume(tmp: Path) -> Path:
    (tmp / "garbage.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 9 9 9\n" + bytes(50))
    return tmp / "garbage.nrrd"


NATIVE = [
    ("empty folder", _no_dicom, "lightfusion fuse: error: MRI folder {path} holds no DICOM series"),
    ("folder without DICOM", _not_dicom_files, "lightfusion fuse: error: MRI folder {path} holds no DICOM series"),
    ("broken DICOM file", _broken_dicom_file, "lightfusion fuse: error: cannot read MRI file {path} as DICOM"),
    ("broken NRRD", _garbage_volume, "lightfusion fuse: error: cannot read MRI {path}"),
]


@pytest.mark.parametrize("what, make, start", NATIVE, ids=[n[0] for n in NATIVE])
def test_native_messages_never_reach_the_terminal(tmp_path, capfd, volumes, what, make, start):
    path = make(tmp_path)
    code = main(["fuse", str(path), str(volumes[1]), "-o", str(tmp_path / "x.nrrd"), "--quiet"])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert one_line(err).startswith(start.format(path=path))
