"""LightFusionLib.dicom: DICOM volumes come back with their real-world values (Modality LUT) exact.

Synthetic series are written with pydicom the way scanners write them (per-slice Rescale Slope /
Intercept, first slice slope 1.0); the real ones are the NEMA PET phantom (MONOCHROME1, non-integer
slope) and the porcine T2 MRI from ../shared/data/realdata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from LightFusionLib.dicom import (KEPT_TAGS, DicomError, dicom_modality, read_dicom_file,
                                  read_dicom_series)

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "realdata"
NEMA_PET = REALDATA / "nema-pet-dicom"
PORCINE_MR = REALDATA / "porcine-head" / "mr-t2-dicom"
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason=f"real data not found at {REALDATA}")

# Coronal slices: rows run towards patient left (+x), columns towards inferior (-z), so the slice
# normal (row x column) is +y. SimpleITK's direction has these three as its columns.
ROW_DIR, COL_DIR, NORMAL = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)
DIRECTION = tuple(np.array([ROW_DIR, COL_DIR, NORMAL]).T.ravel())
SPACING = (2.0, 3.0, 4.0)  # x (between columns), y (between rows), between slices
ORIGIN = (-100.0, -80.0, 30.0)
SLOPES = [1.0, 0.37, 2.5, 1.0, 0.37, 2.5]  # first one an integer: SimpleITK then reads integers
INTERCEPTS = [0.0, -3.5, 10.0, 0.0, 1.25, -100.0]


def write_series(folder: Path, stored: np.ndarray, slopes, intercepts, *, signed: bool = False,
                 photometric: str = "MONOCHROME2", modality: str = "PT", prefix: str = "img",
                 compress: bool = False) -> list[Path]:
    """Write ``stored`` (slices, rows, columns) as one DICOM series, one file per slice with its own
    slope/intercept, geometry from ORIGIN / SPACING / coronal orientation. File names run against
    the slice order, so a reader has to sort by position. ``compress``: JPEG Lossless pixel data
    (encoded by SimpleITK/GDCM; pydicom has no decoder for it without plugins)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k, plane in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesDescription = modality, "synthetic per-slice slope"
        ds.PatientID, ds.PatientName = "SECRET-ID", "Doe^Jane"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = list(np.add(ORIGIN, np.multiply(NORMAL, k * SPACING[2])))
        ds.ImageOrientationPatient = [*ROW_DIR, *COL_DIR]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # DICOM: between rows, then between columns
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], intercepts[k]
        plane = plane.astype(np.int16 if signed else np.uint16)
        if compress:
            jpeg = folder.parent / f"{folder.name}-jpeg-scratch.dcm"  # outside the series folder
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(jpeg))
            writer.SetUseCompression(True)
            writer.SetCompressor("JPEG")  # GDCM: JPEG Lossless, process 14
            writer.Execute(sitk.GetImageFromArray(plane[None]))
            encoded = pydicom.dcmread(jpeg)
            jpeg.unlink()
            meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
            ds.PixelData = encoded.PixelData
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = plane.tobytes()
        path = folder / f"{prefix}{len(stored) - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_values(stored: np.ndarray, slopes, intercepts) -> np.ndarray:
    n = len(stored)
    return stored * np.asarray(slopes[:n])[:, None, None] + np.asarray(intercepts[:n])[:, None, None]


def plain_sitk_series(folder: Path, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetOutputPixelType(pixel_type)
    return reader.Execute()


def assert_same_geometry(image: sitk.Image, origin, spacing, direction) -> None:
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)


@pytest.fixture
def stored_pet() -> np.ndarray:
    """(6, 7, 9) stored values over most of the unsigned 16-bit range."""
    return np.random.default_rng(0).integers(0, 60000, (len(SLOPES), 7, 9))


# --- synthetic series ------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True], ids=["uint16", "int16"])
def test_per_slice_slopes_read_exactly(tmp_path, stored_pet, signed):
    stored = stored_pet - 30000 if signed else stored_pet
    write_series(tmp_path, stored, SLOPES, INTERCEPTS, signed=signed)

    image = read_dicom_series(tmp_path, "PET")

    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (9, 7, len(SLOPES))
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected_values(stored, SLOPES, INTERCEPTS),
                               rtol=2 ** -24, atol=0)
    assert_same_geometry(image, ORIGIN, SPACING, DIRECTION)
    assert dicom_modality(image) == "PT"


@pytest.mark.parametrize("signed", [False, True], ids=["uint16", "int16"])
def test_plain_simpleitk_series_reader_wraps_per_slice_slopes(tmp_path, stored_pet, signed):
    """The premise: SimpleITK takes an integer pixel type from the first slice (slope 1.0)."""
    stored = stored_pet - 30000 if signed else stored_pet
    write_series(tmp_path, stored, SLOPES, INTERCEPTS, signed=signed)

    plain = plain_sitk_series(tmp_path)

    assert "integer" in plain.GetPixelIDTypeAsString()
    error = np.abs(sitk.GetArrayFromImage(plain) - expected_values(stored, SLOPES, INTERCEPTS))
    assert error.max() > 60000  # wrapped around the 16-bit range


def test_monochrome1_is_not_inverted(tmp_path, stored_pet):
    slopes, intercepts = [0.5] * len(SLOPES), [0.0] * len(SLOPES)
    write_series(tmp_path, stored_pet, slopes, intercepts, photometric="MONOCHROME1")
    expected = expected_values(stored_pet, slopes, intercepts)

    image = read_dicom_series(tmp_path, "PET")

    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, rtol=2 ** -24, atol=0)
    # The premise: GDCM returns slope * (65535 - stored) here.
    plain = sitk.GetArrayFromImage(plain_sitk_series(tmp_path))
    np.testing.assert_allclose(plain, 0.5 * (65535 - stored_pet))


def test_undecodable_pixel_data_falls_back_to_simpleitk_when_exact(tmp_path, stored_pet):
    stored = stored_pet[:3] // 4
    slopes, intercepts = [0.25] * 3, [-7.0] * 3
    write_series(tmp_path, stored, slopes, intercepts, compress=True)
    try:
        pydicom.dcmread(next(tmp_path.glob("*.dcm"))).pixel_array
        pytest.skip("this pydicom has a JPEG Lossless decoder; nothing to fall back from")
    except Exception:
        pass

    image = read_dicom_series(tmp_path, "PET")

    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected_values(stored, slopes, intercepts),
                               rtol=2 ** -24, atol=0)
    assert_same_geometry(image, ORIGIN, SPACING, DIRECTION)


def test_undecodable_pixel_data_with_per_slice_slopes_is_refused(tmp_path, stored_pet, capfd):
    write_series(tmp_path, stored_pet[:3] // 4, SLOPES, INTERCEPTS, compress=True)
    if "JPEG" not in str(pydicom.dcmread(next(tmp_path.glob("*.dcm"))).file_meta.TransferSyntaxUID.name):
        pytest.fail("test setup: pixel data not JPEG-compressed")
    try:
        pydicom.dcmread(next(tmp_path.glob("*.dcm"))).pixel_array
        pytest.skip("this pydicom has a JPEG Lossless decoder")
    except Exception:
        pass

    with pytest.raises(DicomError) as info:
        read_dicom_series(tmp_path, "PET")

    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "pydicom cannot decode" in message and "3 different rescale" in message
    assert capfd.readouterr().err == ""


def test_metadata_holds_only_kept_tags(tmp_path, stored_pet):
    write_series(tmp_path, stored_pet, SLOPES, INTERCEPTS)

    image = read_dicom_series(tmp_path, "PET")

    assert set(image.GetMetaDataKeys()) <= set(KEPT_TAGS)
    assert image.GetMetaData("0008|103e") == "synthetic per-slice slope"
    assert "0010|0020" not in image.GetMetaDataKeys()  # no patient identifiers in written outputs


def test_dicom_modality_of_a_plain_image_is_none():
    assert dicom_modality(sitk.Image(2, 2, 2, sitk.sitkFloat32)) is None


def test_single_file(tmp_path, stored_pet):
    paths = write_series(tmp_path, stored_pet, SLOPES, INTERCEPTS)

    image = read_dicom_file(paths[2], "PET")  # slope 2.5, intercept 10

    assert image.GetSize() == (9, 7, 1) and image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(image)[0], stored_pet[2] * 2.5 + 10.0, rtol=2 ** -24)
    np.testing.assert_allclose(image.GetOrigin(), np.add(ORIGIN, np.multiply(NORMAL, 2 * SPACING[2])))
    assert dicom_modality(image) == "PT"
    assert set(image.GetMetaDataKeys()) <= set(KEPT_TAGS)  # not the file's rescale / patient tags


def test_single_file_without_rescale_stays_integer(tmp_path, stored_pet):
    paths = write_series(tmp_path, stored_pet[:1], [1.0], [0.0], modality="MR")

    image = read_dicom_file(paths[0], "MRI")

    assert image.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], stored_pet[0])
    assert dicom_modality(image) == "MR"


# --- errors ----------------------------------------------------------------------------------

def test_folder_without_dicom(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("no DICOM here")

    with pytest.raises(DicomError, match="holds no DICOM series") as info:
        read_dicom_series(tmp_path, "PET")

    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert capfd.readouterr().err == ""


def test_itk_prints_a_warning_there_by_default(tmp_path, capfd):
    """The premise of the silencing: GDCM's "No Series were found" goes to the native stderr."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    try:
        sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(tmp_path))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)
    assert "No Series were found" in capfd.readouterr().err


def test_folder_with_two_series(tmp_path, stored_pet, capfd):
    write_series(tmp_path, stored_pet[:2], SLOPES, INTERCEPTS, prefix="a")
    write_series(tmp_path, stored_pet[:3], SLOPES, INTERCEPTS, prefix="b")

    with pytest.raises(DicomError, match="holds 2 DICOM series; one folder must hold one") as info:
        read_dicom_series(tmp_path, "PET")

    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert capfd.readouterr().err == ""


def test_missing_folder_and_non_dicom_file(tmp_path, capfd):
    with pytest.raises(DicomError, match="does not exist"):
        read_dicom_series(tmp_path / "nowhere", "MRI")
    text = tmp_path / "a.dcm"
    text.write_text("not DICOM")
    with pytest.raises(DicomError, match="as DICOM") as info:
        read_dicom_file(text, "MRI")
    assert "\n" not in str(info.value) and "0x" not in str(info.value)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("display", [True, False])
def test_warning_display_is_restored(tmp_path, display):
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(display)
    try:
        with pytest.raises(DicomError):
            read_dicom_series(tmp_path, "PET")
        assert sitk.ProcessObject.GetGlobalWarningDisplay() is display
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


# --- real data -------------------------------------------------------------------------------

def pydicom_values(folder: Path) -> np.ndarray:
    """Modality LUT values of each file, in SimpleITK's file (= slice) order: (slices, rows, columns)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    return np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in map(pydicom.dcmread, files)])


@needs_realdata
def test_real_nema_pet_monochrome1():
    image = read_dicom_series(NEMA_PET, "PET")
    values = sitk.GetArrayFromImage(image)
    expected = pydicom_values(NEMA_PET)

    assert image.GetPixelID() == sitk.sitkFloat32 and values.shape == (89, 192, 192)
    assert np.abs(values - expected).max() <= 1e-6 * np.abs(expected).max()  # float32 rounding only
    assert np.median(values) < values.max()  # SimpleITK alone: inverted, median == max
    assert dicom_modality(image) == "PT"
    plain = plain_sitk_series(NEMA_PET)
    assert np.median(sitk.GetArrayViewFromImage(plain)) == sitk.GetArrayViewFromImage(plain).max()
    assert_same_geometry(image, plain.GetOrigin(), plain.GetSpacing(), plain.GetDirection())


@pytest.fixture(scope="module")
def porcine_mr() -> sitk.Image:
    """The 512x512x94 porcine T2 series as read here (about 1 s; shared by the tests below)."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA}")
    return read_dicom_series(PORCINE_MR, "MRI")


@needs_realdata
def test_real_porcine_mr_values(porcine_mr):
    assert porcine_mr.GetSize() == (512, 512, 94)
    assert porcine_mr.GetPixelID() == sitk.sitkInt16  # no rescale: stays in its stored integer type
    assert np.array_equal(sitk.GetArrayViewFromImage(porcine_mr), pydicom_values(PORCINE_MR))
    assert dicom_modality(porcine_mr) == "MR"


@needs_realdata
def test_real_porcine_mr_geometry_is_simpleitks(porcine_mr):
    plain = plain_sitk_series(PORCINE_MR)
    assert porcine_mr.GetOrigin() == plain.GetOrigin()
    assert porcine_mr.GetSpacing() == plain.GetSpacing()
    assert porcine_mr.GetDirection() == plain.GetDirection()


@needs_realdata
def test_real_single_file():
    path = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(NEMA_PET))[40]
    ds = pydicom.dcmread(path)

    image = read_dicom_file(path, "PET")

    assert image.GetSize() == (192, 192, 1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image)[0], apply_modality_lut(ds.pixel_array, ds),
                               rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    assert dicom_modality(image) == "PT"
