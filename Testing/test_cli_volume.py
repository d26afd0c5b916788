"""``lightfusion fuse`` and ``lightfusion demo`` end to end, and every bad input: one line on stderr,
exit code 2, no output (not even a temporary) left behind, inputs unchanged."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LightFusionLib.cli import main
from LightFusionLib.demo import SAMPLE_MRI, SAMPLE_PET, sample_data_dir
from LightFusionLib.metrics import METRIC_NAMES
from LightFusionLib.models import models_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLE = sample_data_dir()
needs_sample = pytest.mark.skipif(not (SAMPLE / SAMPLE_MRI).is_file(), reason="sample data not made")


def write(path: Path, arr: np.ndarray, spacing=(1.0, 1.2, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    sitk.WriteImage(img, str(path))
    return path


def blob(shape=(6, 12, 10), seed=0) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    return np.where(j**2 + i**2 < 0.8, 80 + 40 * np.sin(4 * j) + rng.normal(0, 5, shape), 0).astype(np.float32)


def write_dicom_series(image: sitk.Image, folder: Path) -> Path:
    """Write a 3-D int16 image as a DICOM series (one file per slice, geometry in the tags)."""
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position)), ("0020|0013", str(k + 1)),
                           ("0018|0050", f"{image.GetSpacing()[2]:.6f}")):
            plane.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # else every file gets its own series UID
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(plane)
    return folder


@pytest.fixture
def inputs(tmp_path):
    mri = write(tmp_path / "mri.nrrd", blob())
    pet = write(tmp_path / "pet.nii.gz", blob(seed=1) / 10, spacing=(2.0, 2.0, 3.0), origin=(-2.0, -1.0, -3.0))
    return mri, pet


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: relative path -> (sha256, mtime_ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# working runs
# ----------------------------------------------------------------------------------------------
@needs_sample
def test_fuse_the_sample_pair_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "fused.nii.gz"
    before = snapshot(SAMPLE)
    code, stdout, _ = run(["fuse", str(SAMPLE / SAMPLE_MRI), str(SAMPLE / SAMPLE_PET), "-o", str(out),
                           "--device", "cpu", "--plane-size", "48", "--axis", "coronal", "--quiet"], capsys)
    assert code == 0
    assert stdout.startswith(f"wrote {out}: 134 coronal planes")
    mri, fused = sitk.ReadImage(str(SAMPLE / SAMPLE_MRI)), sitk.ReadImage(str(out))
    assert fused.GetSize() == mri.GetSize() and fused.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(fused.GetSpacing(), mri.GetSpacing())
    np.testing.assert_allclose(fused.GetOrigin(), mri.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(fused.GetDirection(), mri.GetDirection(), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["fused.nii.gz"]
    assert snapshot(SAMPLE) == before


def test_fuse_reads_a_dicom_series_folder_and_writes_by_extension(tmp_path, capsys, inputs):
    mri_file, pet = inputs
    folder = write_dicom_series(sitk.ReadImage(str(mri_file)), tmp_path / "mri_dicom")
    for name in ("fused.nrrd", "fused.mha", "fused.nii"):
        out = tmp_path / name
        code, _, err = run(["fuse", str(folder), str(pet), "-o", str(out), "--device", "cpu", "--quiet",
                            "--plane-size", "0", "--colormap", "jet", "--mri-window", "0,150"], capsys)
        assert code == 0, err
        fused, mri = sitk.ReadImage(str(out)), sitk.ReadImage(str(mri_file))
        assert fused.GetSize() == mri.GetSize()
        np.testing.assert_allclose(fused.GetSpacing(), mri.GetSpacing(), atol=1e-5)


@needs_sample
def test_demo_writes_volume_montage_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run(["demo", "--out", str(out), "--device", "cpu", "--quiet"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["fused.nrrd", "metrics.json", "montage.png"]
    assert "planes/s" in stdout and "montage.png" in stdout
    montage = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "montage.png")))
    assert montage.shape == (768, 768, 3) and montage.max() > 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["colour"] == "yuv"  # the default colour restoration, recorded
    assert set(report["metrics"]) == set(METRIC_NAMES)
    assert report["planes"] == 110 and report["metrics_planes"] > 50
    fused, mri = sitk.ReadImage(str(out / "fused.nrrd")), sitk.ReadImage(str(SAMPLE / SAMPLE_MRI))
    assert fused.GetSize() == mri.GetSize() and fused.GetDirection() == mri.GetDirection()


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written, inputs unchanged
# ----------------------------------------------------------------------------------------------
def _garbage(tmp: Path) -> Path:
    (tmp / "garbage.nrrd").write_bytes(os.urandom(300))
    return tmp / "garbage.nrrd"


def _text(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("not an image\n")
    return tmp / "notes.txt"


def _two_d(tmp: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(blob()[3].astype(np.uint8)), str(tmp / "slice.png"))
    return tmp / "slice.png"


def _four_d(tmp: Path) -> Path:
    frames = [sitk.GetImageFromArray(blob() + t) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp / "dynamic.nii.gz"))
    return tmp / "dynamic.nii.gz"


def _with(value: float, count: int = 1):
    def make(tmp: Path) -> Path:
        arr = blob()
        arr.reshape(-1)[:count] = value
        return write(tmp / f"bad{value}.nrrd", arr)
    return make


def _filled(value: float):
    return lambda tmp: write(tmp / f"filled{value}.nrrd", np.full((6, 12, 10), value, np.float32))


def _far(tmp: Path) -> Path:
    return write(tmp / "far.nrrd", blob(seed=1), origin=(400.0, 0.0, 0.0))


def _empty_folder(tmp: Path) -> Path:
    (tmp / "nodicom").mkdir()
    return tmp / "nodicom"


def _bad_model(tmp: Path) -> str:
    (tmp / "model.pt").write_bytes(b"not a model")
    return str(tmp / "model.pt")


# (what, MRI or None for the good one, other or None, extra args, expected words in the message)
BAD = [
    ("missing file", lambda t: t / "missing.nrrd", None, [], "does not exist"),
    ("unreadable file", _garbage, None, [], "cannot read MRI"),
    ("not an image", None, _text, [], "cannot read PET"),
    ("2-D image", _two_d, None, [], "2-D"),
    ("4-D volume", None, _four_d, [], "4-D"),
    ("empty volume", _filled(0.0), None, [], "empty"),
    ("constant volume", None, _filled(3.0), [], "constant"),
    ("NaN voxels", _with(np.nan, 3), None, [], "3 NaN/Inf"),
    ("Inf voxels", None, _with(np.inf), [], "1 NaN/Inf"),
    ("non-overlapping grids", None, _far, [], "do not overlap"),
    ("same file twice", None, "MRI", [], "same file"),
    ("empty DICOM folder", _empty_folder, None, [], "no DICOM series"),
    ("model that does not load", None, None, ["--model", _bad_model], "does not load"),
    ("model of another task", None, None, ["--model", lambda t: str(models_dir() / "ct-mri.pt")],
     "trained for ct-mri, not pet-mri"),
    ("colour map for CT", None, None, ["--task", "ct-mri", "--colormap", "hot"], "not to CT-MRI"),
    ("unknown colour map", None, None, ["--colormap", "viridis"], "unknown colour map"),
    ("bad window", None, None, ["--other-window", "5"], "LO,HI"),
    ("reversed window", None, None, ["--mri-window", "9,1"], "lo < hi"),
    ("half precision without a GPU", None, None, ["--half"], "half precision runs on the torch backend on a CUDA GPU"),
]


@pytest.mark.parametrize("what, mri, other, extra, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, inputs, what, mri, other, extra, words):
    good_mri, good_pet = inputs
    mri_path = mri(tmp_path) if mri else good_mri
    other_path = good_mri if other == "MRI" else other(tmp_path) if other else good_pet
    extra = [a(tmp_path) if callable(a) else a for a in extra]
    out = tmp_path / "out" / "fused.nrrd"
    out.parent.mkdir()
    before = snapshot(tmp_path)
    code, stdout, stderr = run(["fuse", str(mri_path), str(other_path), "-o", str(out), "--quiet",
                                "--device", "cpu", *extra], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("lightfusion fuse: error: ")
    assert words in stderr
    assert list(out.parent.iterdir()) == []  # no output, no temporary
    assert snapshot(tmp_path) == before  # inputs unchanged, nothing else written


@pytest.mark.parametrize("target, words", [
    (lambda t, mri: mri, "is an input"),
    (lambda t, mri: t / "no" / "such" / "folder" / "fused.nrrd", "does not exist"),
    (lambda t, mri: t / "fused.png", "cannot hold an RGB 3-D volume"),
    (lambda t, mri: t / "fused.jpg", "cannot write fused.jpg"),
    (lambda t, mri: t / "fused.xyz", "unknown output extension '.xyz'"),
    (lambda t, mri: t / "fused", "has no extension"),
    (lambda t, mri: t / "fused.mhd", "header + data"),
    (lambda t, mri: t, "is a folder"),
], ids=["onto an input", "missing folder", "2-D format", "JPEG", "unknown extension", "no extension", "two-file format",
        "a folder"])
def test_unusable_outputs_are_refused_before_any_work(tmp_path, capsys, inputs, target, words):
    mri, pet = inputs
    before = snapshot(tmp_path)
    code, _, stderr = run(["fuse", str(mri), str(pet), "-o", str(target(tmp_path, mri)), "--quiet"], capsys)
    assert code == 2 and words in stderr and stderr.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_a_read_only_output_folder_is_refused(tmp_path, capsys, inputs):
    mri, pet = inputs
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anywhere chmod allows ...
        locked = Path("/sys")  # ... but not into sysfs
        if not locked.is_dir():
            pytest.skip("running as root without /sys: no unwritable folder to try")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    before = sorted(p.name for p in locked.iterdir())
    try:
        code, _, stderr = run(["fuse", str(mri), str(pet), "-o", str(locked / "f.nrrd"), "--quiet"], capsys)
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o755)
    assert code == 2 and "is not writable" in stderr and stderr.count("\n") == 1
    assert sorted(p.name for p in locked.iterdir()) == before


def test_the_same_file_under_two_names_is_refused(tmp_path, capsys, inputs):
    mri, _ = inputs
    link = tmp_path / "link.nrrd"
    os.link(mri, link)
    code, _, stderr = run(["fuse", str(mri), str(link), "-o", str(tmp_path / "f.nrrd"), "--quiet"], capsys)
    assert code == 2 and "same file" in stderr


def test_output_into_the_input_dicom_folder_is_refused(tmp_path, capsys, inputs):
    mri, pet = inputs
    folder = write_dicom_series(sitk.ReadImage(str(mri)), tmp_path / "dicom")
    before = snapshot(folder)
    code, _, stderr = run(["fuse", str(folder), str(pet), "-o", str(folder / "fused.nrrd"), "--quiet"], capsys)
    assert code == 2 and "input DICOM folder" in stderr
    assert snapshot(folder) == before


def test_demo_without_sample_data_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIGHTFUSION_SAMPLE_DATA", str(tmp_path / "nowhere"))
    code, _, stderr = run(["demo", "--out", str(tmp_path / "demo"), "--quiet"], capsys)
    assert code == 2 and "make_sample_data.py" in stderr
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_file_as_output_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, stderr = run(["demo", "--out", str(target), "--quiet"], capsys)
    assert code == 2 and "not a folder" in stderr
    assert target.read_text() == "x"


def test_fuse_colour_option_changes_the_colours_not_the_fused_luma(tmp_path, capsys):
    from LightFusionLib.colour import luma

    fused = {}
    for mode in ("yuv", "saturated"):
        out = tmp_path / f"{mode}.nrrd"
        code, _, _ = run(["fuse", str(SAMPLE / SAMPLE_MRI), str(SAMPLE / SAMPLE_PET), "-o", str(out), "--device",
                          "cpu", "--plane-size", "48", "--colour", mode, "--quiet"], capsys)
        assert code == 0
        fused[mode] = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.float32)
    assert not np.array_equal(fused["yuv"], fused["saturated"])
    # 'saturated' shows the fused luma (up to rounding); 'yuv' clips saturated colours, so where the
    # two differ most it is 'yuv' whose luma moved, never by more than clipping can explain
    gap = np.abs(luma(fused["yuv"]) - luma(fused["saturated"]))
    unclipped = (fused["yuv"] > 0).all(-1) & (fused["yuv"] < 255).all(-1)
    assert np.percentile(gap[unclipped], 99) <= 1.5
    code, _, err = run(["fuse", str(SAMPLE / SAMPLE_MRI), str(SAMPLE / SAMPLE_PET), "-o", str(tmp_path / "x.nrrd"),
                        "--colour", "vivid"], capsys)
    assert code == 2 and "--colour" in err and not (tmp_path / "x.nrrd").exists()


def _nrrd_encoding(path: Path) -> str:
    header = path.read_bytes()[:2000].split(b"\n\n")[0].decode()
    return next(line.split(":", 1)[1].strip() for line in header.splitlines() if line.startswith("encoding:"))


def test_outputs_are_raw_unless_compression_is_asked_for(tmp_path, capsys):
    """zlib took 2.4 s of the 512x512x400 write (0.3 s raw): outputs are raw unless --compress."""
    voxels = {}
    for flag, encoding in (([], "raw"), (["--compress"], "gzip")):
        out = tmp_path / f"{encoding}.nrrd"
        code, _, _ = run(["fuse", str(SAMPLE / SAMPLE_MRI), str(SAMPLE / SAMPLE_PET), "-o", str(out), "--device",
                          "cpu", "--plane-size", "48", "--quiet"] + flag, capsys)
        assert code == 0 and _nrrd_encoding(out) == encoding
        voxels[encoding] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    np.testing.assert_array_equal(voxels["raw"], voxels["gzip"])
