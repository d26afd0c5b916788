"""`lightfusion fuse ... -o DIR --format dicom` and LightFusionLib.dicom_write: a DICOM series that a PACS
viewer files beside the MRI. Source: the real MRI series ``shared/data/realdata/porcine-head/mr-t2-dicom``
(skipped when absent). Checked: SimpleITK reads the series back on the MRI series' grid; pydicom finds the
MRI's patient, study and frame of reference, a new series, DERIVED\\SECONDARY, per-slice position and
orientation of the MRI slice, RGB or MONOCHROME2; dciodvfy (dicom3tools) reports no error."""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LightFusionLib import dicom_write
from LightFusionLib.cli import main
from LightFusionLib.demo import sample_paths
from LightFusionLib.dicom import dicom_series_files
from LightFusionLib.dicom_write import SECONDARY_CAPTURE_IMAGE_STORAGE, write_dicom_series
from LightFusionLib.errors import VolumeError
from LightFusionLib.fileio import OutputError
from LightFusionLib.geometry import same_grid
from LightFusionLib.volumeio import read_volume

MRI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdata" / "porcine-head" / "mr-t2-dicom"
needs_mri = pytest.mark.skipif(not MRI_DIR.is_dir(), reason=f"real MRI DICOM series not present ({MRI_DIR})")


@pytest.fixture(scope="module")
def mri() -> sitk.Image:
    return read_volume(MRI_DIR, "MRI")


@pytest.fixture(scope="module")
def mri_headers() -> dict[str, pydicom.Dataset]:
    """The MRI's headers by SOP Instance UID."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(MRI_DIR)]
    return {str(ds.SOPInstanceUID): ds for ds in headers}


@pytest.fixture(scope="module")
def fused_rgb_series(mri, tmp_path_factory) -> Path:
    """The CLI's DICOM output for the real MRI and a synthetic PET (a warm blob on a coarser, larger grid)."""
    tmp = tmp_path_factory.mktemp("rgb")
    pet = sitk.Image([64, 64, 48], sitk.sitkFloat32)
    pet.SetSpacing((4.0, 4.0, 5.0))
    lo = np.array(mri.TransformIndexToPhysicalPoint((0, 0, 0)))
    hi = np.array(mri.TransformIndexToPhysicalPoint([s - 1 for s in mri.GetSize()]))
    centre = (lo + hi) / 2
    pet.SetOrigin(tuple(centre - np.array([32 * 4.0, 32 * 4.0, 24 * 5.0])))
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (48, 64, 64)], indexing="ij")
    suv = 1.0 + 8.0 * np.exp(-((x - 30) ** 2 + (y - 34) ** 2 + (z - 24) ** 2) / (2 * 8.0 ** 2))
    blob = sitk.GetImageFromArray(suv.astype(np.float32))
    blob.CopyInformation(pet)
    sitk.WriteImage(blob, str(tmp / "pet.nrrd"))
    out = tmp / "fused-dicom"
    # --plane-size 0: the network at the MRI's 512x512 (quicker here than resampling 94 planes to 256)
    rc = main(["fuse", str(MRI_DIR), str(tmp / "pet.nrrd"), "-o", str(out), "--format", "dicom", "--quiet",
               "--plane-size", "0", "--backend", "onnx"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def scalar_series(mri, tmp_path_factory) -> tuple[Path, sitk.Image]:
    """A scalar 8-bit volume on the MRI grid written through the library (the Slicer export path)."""
    arr = sitk.GetArrayFromImage(mri).astype(np.float32)
    image = sitk.GetImageFromArray(np.clip(arr / np.percentile(arr, 99.5) * 255, 0, 255).astype(np.uint8))
    image.CopyInformation(mri)
    out = tmp_path_factory.mktemp("mono") / "series"
    write_dicom_series(image, MRI_DIR, out, task="ct-mri", other_modality="CT")
    return out, image


def read_series(folder: Path) -> sitk.Image:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def check_tags(folder: Path, mri_headers: dict, photometric: str, samples: int) -> list[pydicom.Dataset]:
    files = sorted(folder.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    first_mri = next(iter(mri_headers.values()))
    assert len(datasets) == len(mri_headers)  # one instance per slice
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    assert len(series_uids) == 1 and str(first_mri.SeriesInstanceUID) not in series_uids  # a new series
    sop_uids = {str(ds.SOPInstanceUID) for ds in datasets}
    assert len(sop_uids) == len(datasets) and not sop_uids & set(mri_headers)  # new instances
    for ds in datasets:
        assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber",
                        "StudyDescription", "FrameOfReferenceUID"):
            assert ds.get(keyword) == first_mri.get(keyword), keyword
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "LightFusion" in ds.SeriesDescription and "NOT FOR PRIMARY DIAGNOSIS" in ds.SeriesDescription
        assert len(ds.SeriesDescription) <= 64
        assert ds.PhotometricInterpretation == photometric and ds.SamplesPerPixel == samples
        assert ds.BitsAllocated == 8 and ds.Rows == first_mri.Rows and ds.Columns == first_mri.Columns
        source = mri_headers[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.ImageOrientationPatient == source.ImageOrientationPatient
        assert ds.PixelSpacing == source.PixelSpacing
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) + ((3,) if samples == 3 else ())
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, len(datasets) + 1))
    return datasets


@needs_mri
def test_cli_writes_an_rgb_series_on_the_mri_series_grid(fused_rgb_series, mri, mri_headers):
    back = read_series(fused_rgb_series)
    assert same_grid(back, mri, 1e-6)  # size, spacing, origin, direction of the MRI series
    assert back.GetPixelID() == sitk.sitkVectorUInt8
    arr = sitk.GetArrayViewFromImage(back)
    assert arr[..., 0].max() > 150 and not np.array_equal(arr[..., 0], arr[..., 2])  # colour
    datasets = check_tags(fused_rgb_series, mri_headers, "RGB", 3)
    assert all(ds.PlanarConfiguration == 0 for ds in datasets)
    assert "PET-MRI" in datasets[0].SeriesDescription
    assert [p.name for p in fused_rgb_series.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries


@needs_mri
def test_library_writes_a_monochrome2_series_voxel_for_voxel(scalar_series, mri, mri_headers):
    folder, image = scalar_series
    back = read_series(folder)
    assert same_grid(back, mri, 1e-6) and back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    datasets = check_tags(folder, mri_headers, "MONOCHROME2", 1)
    assert "CT-MRI" in datasets[0].SeriesDescription
    # LightFusion's own reader takes it as a volume again (a PACS export read back)
    assert same_grid(read_volume(folder, "fused"), mri, 1e-6)


@needs_mri
def test_source_given_as_files_in_any_order(mri, tmp_path):
    """Slicer knows a DICOM volume by its files (the DICOM database), not a folder."""
    files = dicom_series_files(MRI_DIR)
    random.Random(0).shuffle(files)
    image = sitk.Image(mri.GetSize(), sitk.sitkUInt8)
    image.CopyInformation(mri)
    image[:, :, 3] = sitk.Image(mri.GetSize()[:2], sitk.sitkUInt8) + 200  # one bright slice
    write_dicom_series(image, files, tmp_path / "series")
    back = read_series(tmp_path / "series")
    assert same_grid(back, mri, 1e-6)
    assert sitk.GetArrayViewFromImage(back)[3].min() == 200 and sitk.GetArrayViewFromImage(back)[4].max() == 0


@needs_mri
def test_dciodvfy_finds_no_error(fused_rgb_series, scalar_series):
    """David Clunie's validator (Debian's dicom3tools) on the first, a middle and the last instance of both
    series: no errors. Its warnings (Image Plane attributes in a Secondary Capture, i.e. a Standard
    Extended SOP Class; empty Laterality and Study ID copied from the MRI) are allowed."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    for folder in (fused_rgb_series, scalar_series[0]):
        files = sorted(folder.iterdir())
        for path in (files[0], files[len(files) // 2], files[-1]):
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            report = result.stdout + result.stderr
            assert "SCImage" in report  # validated against the Secondary Capture Image IOD
            errors = [line for line in report.splitlines() if line.startswith("Error")]
            assert errors == [], report


# --- refusals: one line, nothing written ---------------------------------------------------------

def test_non_dicom_mri_is_refused_in_one_line(tmp_path, capsys):
    mri, pet = sample_paths()
    rc = main(["fuse", str(mri), str(pet), "-o", str(tmp_path / "out"), "--format", "dicom", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "DICOM series folder" in err
    assert list(tmp_path.iterdir()) == []


@needs_mri
def test_existing_non_empty_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    mri, pet = sample_paths()
    rc = main(["fuse", str(MRI_DIR), str(pet), "-o", str(out), "--format", "dicom", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


@needs_mri
def test_an_empty_output_folder_is_used(mri, tmp_path):
    out = tmp_path / "made-for-it"
    out.mkdir()
    image = sitk.Image(mri.GetSize(), sitk.sitkUInt8)
    image.CopyInformation(mri)
    write_dicom_series(image, MRI_DIR, out)
    assert len(list(out.iterdir())) == mri.GetSize()[2]


@needs_mri
def test_a_volume_off_the_mri_grid_or_not_8_bit_is_refused(mri, tmp_path):
    shifted = sitk.Image(mri.GetSize(), sitk.sitkUInt8)
    shifted.CopyInformation(mri)
    shifted.SetOrigin(tuple(np.array(mri.GetOrigin()) + [0, 0, 1.3]))
    with pytest.raises(VolumeError, match="not on the grid"):
        write_dicom_series(shifted, MRI_DIR, tmp_path / "a")
    cropped = sitk.Image([512, 512, 10], sitk.sitkUInt8)
    with pytest.raises(VolumeError, match="not on the grid"):
        write_dicom_series(cropped, MRI_DIR, tmp_path / "b")
    floats = sitk.Cast(shifted, sitk.sitkFloat32)
    floats.CopyInformation(mri)
    with pytest.raises(VolumeError, match="8-bit"):
        write_dicom_series(floats, MRI_DIR, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@needs_mri
def test_a_write_that_does_not_read_back_leaves_nothing(mri, tmp_path, monkeypatch):
    monkeypatch.setattr(dicom_write, "_read_back_problem", lambda *a: "the series read back differs")
    image = sitk.Image(mri.GetSize(), sitk.sitkUInt8)
    image.CopyInformation(mri)
    with pytest.raises(OutputError, match="nothing was written"):
        write_dicom_series(image, MRI_DIR, tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_series_description_fits_a_long_string():
    for task in ("pet-mri", "spect-mri", "ct-mri", None):
        text = dicom_write.series_description(task)
        assert len(text) <= 64 and "NOT FOR PRIMARY DIAGNOSIS" in text and text.startswith("LightFusion")


def test_a_killed_writes_temporary_folder_is_removed_by_the_next_write(tmp_path):
    from LightFusionLib.fileio import _HOST, TEMP_PREFIX, remove_stale_temp_files, temp_path_for

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    stale = tmp_path / f"{TEMP_PREFIX}{_HOST}-{gone.pid}-0123abcd-series"
    (stale / "sub").mkdir(parents=True)
    (stale / "IM00001.dcm").write_bytes(b"half a series")
    live = temp_path_for(tmp_path / "series")  # this process: still writing
    live.mkdir()
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.is_dir()


def test_output_folder_checks(tmp_path):
    from LightFusionLib.fileio import check_new_output_folder

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_new_output_folder(tmp_path / "a-file")
    with pytest.raises(OutputError, match="does not exist"):
        check_new_output_folder(tmp_path / "missing" / "series")
    source = tmp_path / "mri-dicom"
    source.mkdir()
    with pytest.raises(OutputError, match="input"):
        check_new_output_folder(source / "fused", inputs=(source,))
    assert check_new_output_folder(tmp_path / "new") == tmp_path / "new"
