"""Write a fused volume as a DICOM series derived from the MRI's series, for a PACS viewer.

:func:`write_dicom_series` takes the fused volume (a SimpleITK image on the MRI's grid, as
:func:`LightFusionLib.fusion.fuse_volumes` returns it, or as the Slicer module holds it) and the MRI's
DICOM series (its folder, or its files), and writes one instance per slice:

- the MRI's patient and study (Patient, General Study and Patient Study modules copied), so a PACS
  files the result beside the MRI; a **new series** (new Series and SOP Instance UIDs);
- Secondary Capture Image Storage, ImageType ``DERIVED\\SECONDARY``, a SeriesDescription and
  ImageComments that say it is a LightFusion fusion, **not for primary diagnosis**; each instance
  references its MRI slice (Source Image Sequence) and says how it was derived;
- the MRI's Frame of Reference UID and, per slice, the MRI slice's own Image Position and Image
  Orientation (Patient), Pixel Spacing and Slice Thickness, so viewers place and link it with the MRI
  (Secondary Capture does not list the Image Plane module; these are standard attributes added to it,
  which viewers and SimpleITK/GDCM read: a "Standard Extended" SOP class);
- RGB (PhotometricInterpretation RGB, 3 x 8 bits, pixel-interleaved) for a colour result,
  MONOCHROME2 (8 bits, window 0-255) for a scalar one; uncompressed, Explicit VR Little Endian.

The datasets are made with pydicom (no hand-made bytes). The series goes to a new folder, written
atomically: into a temporary folder beside it, read back with SimpleITK (same grid and voxels as the
volume) and only then renamed into place.
"""
from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from . import __version__
from .dicom import DicomError, _itk_warnings_off, dicom_series_files, read_header
from .errors import VolumeError
from .fileio import OutputError, atomic_output_folder, check_new_output_folder
from .geometry import same_grid

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
SERIES_NUMBER_OFFSET = 1000  # the new series' number: the MRI's + 1000 (a common convention for derived series)

# Copied from the MRI's first file when present: Patient, General Study, Patient Study, Frame of
# Reference modules, the character set their text is in, and the de-identification record (a derived
# series of de-identified data must say so too).
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    # Patient Study
    "PatientAge", "PatientSize", "PatientWeight",
    # Frame of Reference
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    # General Series, kept from the MRI
    "BodyPartExamined", "Laterality",
)
# Per slice, from the MRI slice the fused slice lies on.
PLANE_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation")


def series_description(task: str | None = None) -> str:
    """'LightFusion PET-MRI fusion, NOT FOR PRIMARY DIAGNOSIS' (fits the 64 characters of a LO)."""
    what = f"LightFusion {task.upper()} fusion" if task else "LightFusion fusion"
    return f"{what}, {NOT_FOR_DIAGNOSIS}"


def check_dicom_source(source: str | Path | Sequence[str | Path], role: str = "MRI") -> list[Path]:
    """The files of the MRI's DICOM series, in slice order, from a series folder or a list of its
    files. Refuses, with one line, an MRI that is not a DICOM series (a NIfTI/NRRD file, a single
    DICOM file, a folder without DICOM): a DICOM output needs the MRI's patient and study."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_dir():
            raise VolumeError(f"a DICOM output needs the {role} as a DICOM series folder (its patient, study and "
                              f"slice positions are copied), but {path} is not a folder; write .nrrd or .nii.gz instead")
        try:
            return [Path(f) for f in dicom_series_files(path, role)]
        except DicomError as exc:
            raise VolumeError(f"a DICOM output needs the {role} as one DICOM series: {exc}") from None
    files = [Path(f) for f in source]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise VolumeError(f"the {role}'s DICOM files are missing: {', '.join(missing[:3]) or 'none given'}")
    return files


def write_dicom_series(image: sitk.Image, source: str | Path | Sequence[str | Path], output: str | Path,
                       task: str | None = None, description: str | None = None,
                       series_number: int | None = None, other_modality: str | None = None) -> Path:
    """Write ``image`` (a fused volume on the MRI's grid: 8-bit RGB or 8-bit scalar) as a DICOM series
    derived from the MRI's series ``source`` (its folder, or its files) into the new folder ``output``.

    ``task`` ('pet-mri', ...) goes into the series description and the derivation text; ``description``
    replaces the series description; ``series_number`` defaults to the MRI's + 1000;
    ``other_modality`` ('PT', 'NM', 'CT') names the other volume in the derivation text.
    Refuses an existing non-empty ``output``, a volume that is not 8-bit or not on the MRI series'
    grid. Returns ``output``. Raises VolumeError / OutputError.
    """
    output = Path(output)
    files = check_dicom_source(source)
    check_new_output_folder(output, "DICOM output folder", tuple({f.parent for f in files}))
    rgb = _check_pixels(image)
    headers = [read_header(f, "the MRI's DICOM") for f in files]
    slices = _match_slices(image, headers)

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    series_uid = generate_uid()
    first = headers[slices[0]]
    number = series_number if series_number is not None else _int(first.get("SeriesNumber")) + SERIES_NUMBER_OFFSET
    description = description or series_description(task)
    source_text = f"MR series {first.get('SeriesInstanceUID', '')}"
    other_text = f"a {other_modality} volume" if other_modality else "a PET/SPECT/CT volume"
    derivation = (f"LightFusionNet fusion ({task or 'fusion'}) of the {source_text} with {other_text}; "
                  f"LightFusion {__version__}")
    comments = (f"Fused by LightFusion {__version__} ({task or 'fusion'}): MR with {other_text}. A research tool for "
                f"visual review: {NOT_FOR_DIAGNOSIS.lower()}.")
    pixels = sitk.GetArrayViewFromImage(image)  # (K, rows, columns[, 3])

    def verify(folder: Path) -> None:
        problem = _read_back_problem(folder, image, len(headers))
        if problem is not None:
            raise OutputError(f"cannot write {output}: {problem}; nothing was written")

    with atomic_output_folder(output, verify=verify) as tmp:
        for k, index in enumerate(slices):
            src = headers[index]
            ds = _instance(src, rgb, np.ascontiguousarray(pixels[k]))
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = number
            ds.SeriesDescription = description
            ds.SeriesDate, ds.SeriesTime = date, time
            ds.ContentDate, ds.ContentTime = date, time
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
            ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
            ds.InstanceNumber = k + 1
            ds.DerivationDescription = derivation
            ds.ImageComments = comments
            _save(ds, tmp / f"IM{k + 1:05d}.dcm")
    return output


# --- internals -------------------------------------------------------------------------------

def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _check_pixels(image: sitk.Image) -> bool:
    """True for 8-bit RGB, False for 8-bit scalar; VolumeError otherwise."""
    if image.GetDimension() != 3:
        raise VolumeError(f"a DICOM series is written from a 3-D volume, not {image.GetDimension()}-D")
    if image.GetPixelID() == sitk.sitkVectorUInt8 and image.GetNumberOfComponentsPerPixel() == 3:
        return True
    if image.GetPixelID() == sitk.sitkUInt8:
        return False
    raise VolumeError(f"a DICOM series is written from 8-bit RGB or 8-bit scalar volumes (what fusion makes), "
                      f"not {image.GetPixelIDTypeAsString()} with {image.GetNumberOfComponentsPerPixel()} component(s)")


def _match_slices(image: sitk.Image, headers: Sequence[Dataset]) -> list[int]:
    """For each slice k of ``image``, the index of the MRI file that lies on it (same rows, columns,
    pixel spacing, orientation and position). VolumeError when the volume is not on the series' grid."""
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    where = "the fused volume is not on the grid of the MRI's DICOM series"
    if len(headers) != size[2]:
        raise VolumeError(f"{where}: {size[2]} slices against {len(headers)} DICOM files")
    normal = direction[:, 2]
    tol = 1e-3 * min(spacing)  # mm
    positions = []
    for ds in headers:
        name = Path(ds.filename).name
        ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
        if ipp is None or iop is None or ps is None or len(ipp) != 3 or len(iop) != 6 or len(ps) != 2:
            raise VolumeError(f"{where}: {name} has no image position, orientation or pixel spacing")
        if (_int(ds.get("Rows")), _int(ds.get("Columns"))) != (size[1], size[0]):
            raise VolumeError(f"{where}: {name} is {ds.get('Rows')}x{ds.get('Columns')}, the volume {size[1]}x{size[0]}")
        if not (np.allclose([float(v) for v in iop], np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-4)
                and np.allclose([float(ps[1]), float(ps[0])], spacing[:2], rtol=1e-4)):
            raise VolumeError(f"{where}: {name} has another orientation or pixel spacing")
        positions.append(np.array([float(v) for v in ipp]))
    order: list[int] = []
    for k in range(size[2]):
        point = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        along = [abs(float(np.dot(p - point, normal))) for p in positions]
        best = int(np.argmin(along))
        off_plane = positions[best] - point - np.dot(positions[best] - point, normal) * normal
        # GDCM spaces the slices evenly (the mean spacing): the file nearest along the normal, within
        # half a slice, in-plane on the first voxel.
        if along[best] >= 0.5 * spacing[2] or np.linalg.norm(off_plane) > max(tol, 1e-3):
            raise VolumeError(f"{where}: no MRI slice lies on slice {k}")
        order.append(best)
    if len(set(order)) != len(order):
        raise VolumeError(f"{where}: two slices map to one MRI file")
    return order


def _instance(src: Dataset, rgb: bool, plane: np.ndarray) -> Dataset:
    """One Secondary Capture instance for the fused ``plane`` lying on the MRI slice ``src``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in src:
            ds[keyword] = copy.deepcopy(src[keyword])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber",  # type 2: present, maybe empty
                    "Laterality"):  # type 2C, empty = unknown (whether the body part is a paired one)
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "StudyInstanceUID" not in ds:
        raise VolumeError(f"the MRI's DICOM file {Path(src.filename).name} has no Study Instance UID")
    # General Series (the new series' own UIDs and texts are set by the caller)
    ds.Modality = "OT"  # other: a derived secondary capture, not an MR acquisition
    # General and SC Equipment: this software made the images
    ds.Manufacturer = "LightFusion"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = "LightFusion"
    ds.SecondaryCaptureDeviceManufacturerModelName = "LightFusion"
    ds.SecondaryCaptureDeviceSoftwareVersions = __version__
    # General Image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = _patient_orientation(src)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([ref])
    # Image Plane attributes of the MRI slice (and its Frame of Reference, copied above)
    for keyword in PLANE_KEYWORDS:
        if keyword in src:
            ds[keyword] = copy.deepcopy(src[keyword])
    # Image Pixel
    rows, columns = plane.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0  # R, G, B of each pixel together
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.WindowCenter, ds.WindowWidth = 127.5, 256  # the full 8-bit range (VOI LUT)
    ds.PixelData = plane.astype(np.uint8, copy=False).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def _patient_orientation(src: Dataset) -> list[str]:
    """Patient Orientation (row direction, column direction) from the slice's Image Orientation, as
    letters (L/R, P/A, H/F; up to three, largest component first), e.g. ['L', 'P'] for an axial
    LPS slice."""
    iop = [float(v) for v in src.ImageOrientationPatient]
    letters = []
    for vector in (iop[:3], iop[3:]):
        ranked = sorted(range(3), key=lambda i: -abs(vector[i]))
        text = "".join(("L", "P", "H")[i] if vector[i] > 0 else ("R", "A", "F")[i]
                       for i in ranked if abs(vector[i]) > 1e-3)
        letters.append(text[:3])
    return letters


def _save(ds: Dataset, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3: preamble + file meta, as written
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def _read_back_problem(folder: Path, image: sitk.Image, count: int) -> str | None:
    """Why the written series is not ``image`` (None: it is): one series of ``count`` files that
    SimpleITK reads back on the same grid with the same voxels."""
    with _itk_warnings_off():
        try:
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            if len(ids) != 1:
                return f"the folder holds {len(ids)} series once written, not 1"
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
            if len(files) != count:
                return f"{len(files)} of {count} files read back"
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(files))
            back = reader.Execute()
        except RuntimeError as exc:
            return f"the series does not read back ({str(exc).strip().splitlines()[-1]})"
    if (back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel()
            or not same_grid(back, image, 1e-4)
            or not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))):
        return "the series read back differs from the volume written"
    return None
