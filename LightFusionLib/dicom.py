"""Read DICOM volumes with their real-world values (the DICOM Modality LUT) exact.

Two readers, :func:`read_dicom_series` (a folder holding one series) and :func:`read_dicom_file`
(one file), both returning a SimpleITK image, plus :func:`dicom_modality` to read the DICOM
Modality back from a returned image and :func:`dicom_series_files` (a series folder's files in
slice order; the DICOM writer, :mod:`LightFusionLib.dicom_write`, derives its series from them).

Why not SimpleITK alone
-----------------------
1. ``sitk.ImageSeriesReader`` picks the pixel type of the whole volume from the first file. PET
   scanners write a RescaleSlope/Intercept per slice; when the first slice's slope is an integer
   (1.0) the volume becomes an integer image and the rescaled values of the later slices wrap
   around (off by multiples of 65,536).
2. For PhotometricInterpretation MONOCHROME1 GDCM returns ``slope * (max_stored - stored)``, i.e.
   the volume inverted. MONOCHROME1 is a display convention (the VOI/presentation stage); the
   real-world value is the Modality LUT ``slope * stored + intercept`` for every photometric
   interpretation.

So the geometry (origin, spacing, direction, slice order) comes from SimpleITK (GDCM sorts the
files of a series along the slice normal) and, unless SimpleITK's values are already exact, the
voxel values are replaced with pydicom's ``apply_modality_lut`` of each file, one file per slice in
SimpleITK's file order (file k is index k along the third axis, checked against its
ImagePositionPatient).

Pixel type returned
-------------------
* every file slope 1, intercept 0 (or absent), no Modality LUT Sequence, MONOCHROME2, one pixel
  format across the files: SimpleITK's own read, in the stored integer type (e.g. int16 for the
  porcine MR). Here the stored value *is* the real value, so SimpleITK is exact, and keeping the
  integer type halves the memory of a float32 copy and skips a second read of every file.
  Colour (RGB) DICOM also comes back as SimpleITK reads it (no Modality LUT applies to colour).
* anything else (any non-trivial or varying slope/intercept, a Modality LUT Sequence,
  MONOCHROME1): float32. float32 holds integers exactly up to 2**24, so 16-bit data times a slope
  loses nothing that matters; its relative precision is 6e-8.

When pydicom cannot give the values (pixel data in a transfer syntax pydicom has no decoder for,
multi-frame files in a series, files that do not match the slices one to one) SimpleITK's own
float32 read is returned only where it is known to be exact: one slope/intercept for all slices, no
Modality LUT Sequence, not MONOCHROME1. Otherwise :class:`DicomError` is raised.

Memory: the float32 path holds one float32 volume, SimpleITK's read, whose slices are overwritten in
place with pydicom's values (512x512x400: 420 MB; SimpleITK's reader itself peaks higher).

Metadata: the returned image carries only the tags in :data:`KEPT_TAGS` (e.g. ``"0008|0060"`` ->
``"PT"``), no patient identifiers: image metadata is written into the headers of NRRD/NIfTI/DICOM
outputs by ``sitk.WriteImage``. No rescale tags are kept either: the values already have them
applied, and a writer that saw them would apply them again.

ITK/GDCM warnings (e.g. "No Series were found") are switched off during the reads
(``sitk.ProcessObject.SetGlobalWarningDisplay``, restored afterwards). With them off, GDCM printed
nothing to the native stderr (fd 2) for an empty folder, two series, truncated, garbled or
preamble-only files, or non-DICOM files, so fd 2 is not redirected (that would also swallow other
threads' output in a GUI such as Slicer).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from .errors import VolumeError
from .volumeio import sitk_message

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut

MODALITY_KEY = "0008|0060"
# DICOM tag (SimpleITK metadata key) -> pydicom keyword, copied into the returned image's metadata.
KEPT_TAGS: dict[str, str] = {
    MODALITY_KEY: "Modality",
    "0008|103e": "SeriesDescription",
    "0020|000e": "SeriesInstanceUID",
    "0008|0070": "Manufacturer",
    "0054|1001": "Units",  # PET: BQML, CNTS, ...
}


class DicomError(VolumeError):
    """A DICOM file or folder that cannot be read exactly; the message is one line naming it."""


def dicom_modality(image: sitk.Image) -> str | None:
    """The DICOM Modality ("PT", "MR", "CT", ...) stored by the readers here, or None."""
    if not image.HasMetaDataKey(MODALITY_KEY):
        return None
    return image.GetMetaData(MODALITY_KEY).strip() or None


def read_dicom_series(folder: str | Path, role: str = "volume") -> sitk.Image:
    """Read the one DICOM series in ``folder`` (not recursive; non-DICOM files are ignored).

    Returns a 3-D image of size (columns, rows, slices) with real-world values (see the module
    docstring for the pixel type). ``role`` ("MRI", "PET", ...) names the input in error messages.
    Raises DicomError for a missing folder, no series, several series, or unreadable files.
    """
    folder = Path(folder)
    where = f"{role} folder {folder}"
    files = dicom_series_files(folder, role)
    headers = [read_header(Path(f), role) for f in files]

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    return _read_real_values(reader, headers, where)


def dicom_series_files(folder: str | Path, role: str = "volume") -> list[str]:
    """The files of the one DICOM series in ``folder``, in the order SimpleITK (GDCM) stacks them:
    file k is slice k of :func:`read_dicom_series`'s image. Raises DicomError for a missing folder,
    no series or several series."""
    folder = Path(folder)
    where = f"{role} folder {folder}"
    if not folder.is_dir():
        raise DicomError(f"{where} does not exist or is not a folder")
    with _itk_warnings_off():
        try:
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            if len(ids) == 1:
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
        except RuntimeError as exc:
            raise DicomError(f"cannot read {where}: {sitk_message(exc)}") from None
    if not ids:
        raise DicomError(f"{where} holds no DICOM series")
    if len(ids) > 1:
        raise DicomError(f"{where} holds {len(ids)} DICOM series; one folder must hold one series")
    return list(files)


def read_dicom_file(path: str | Path, role: str = "volume") -> sitk.Image:
    """Read one DICOM file: a single slice gives a (columns, rows, 1) image, a multi-frame file
    (columns, rows, frames). Values and pixel type as for :func:`read_dicom_series`.
    Raises DicomError for a missing, non-DICOM or unreadable file."""
    path = Path(path)
    where = f"{role} file {path}"
    if not path.is_file():
        raise DicomError(f"{where} does not exist or is not a file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")  # DICOM only: a NRRD given here is an error, not a volume
    with _itk_warnings_off():
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise DicomError(f"cannot read {where} as DICOM: {sitk_message(exc)}") from None
    return _read_real_values(reader, [read_header(path, role)], where)


def _read_real_values(reader: sitk.ImageSeriesReader | sitk.ImageFileReader, headers: Sequence[Dataset],
                      where: str) -> sitk.Image:
    """SimpleITK's read where it is exact, else float32 with pydicom's modality-LUT values pasted in."""
    exact = _sitk_is_exact(headers)
    if not exact:
        # float32 output: also what is returned by the fallback, and ITK converts each slice on its
        # own, so the first slice's integer type does not clip the others.
        reader.SetOutputPixelType(sitk.sitkFloat32)
    image = _execute(reader, where)
    if not exact:
        image = _with_modality_values(image, headers, where)
    _set_metadata(image, headers[0])
    return image


# --- internals -------------------------------------------------------------------------------

@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Keep ITK/GDCM warnings off the terminal; the errors that matter are raised as DicomError."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _execute(reader: sitk.ImageSeriesReader | sitk.ImageFileReader, where: str) -> sitk.Image:
    with _itk_warnings_off():
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise DicomError(f"cannot read {where}: {sitk_message(exc)}") from None


def read_header(path: Path, role: str) -> Dataset:
    """The file's data set without pixel data (DicomError, one line, when it does not read). force=True: GDCM already took it for DICOM, and
    files without the 128-byte preamble exist."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types for a broken file
        raise DicomError(f"cannot read {role} file {path}: {_first_line(exc)}") from None
    ds.filename = str(path)
    return ds


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _lut_sources(ds: Dataset) -> list[Dataset]:
    """Per frame, the data set holding its Modality LUT: the file itself (Rescale Slope/Intercept or
    a Modality LUT Sequence at the top level), else the frame's Pixel Value Transformation of an
    enhanced multi-frame file (per-frame, else shared functional group)."""
    if any(k in ds for k in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept")):
        return [ds] * _frames(ds)

    def transformation(groups: Dataset | None) -> Dataset | None:
        seq = groups.get("PixelValueTransformationSequence") if groups is not None else None
        return seq[0] if seq else None

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = transformation(shared_seq[0]) if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    sources = []
    for i in range(_frames(ds)):
        own = transformation(per_frame[i]) if i < len(per_frame) else None
        sources.append(own or shared or ds)
    return sources


def _rescale(source: Dataset) -> tuple[float, float]:
    """(slope, intercept); an absent one has its identity value, as GDCM reads it."""
    slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope),
            0.0 if intercept in (None, "") else float(intercept))


def _lut_dataset(source: Dataset) -> Dataset:
    """What ``apply_modality_lut`` needs: the source itself for a Modality LUT Sequence (it reads the
    LUT's byte order from the file meta), else both rescale tags (pydicom applies none when one is
    missing)."""
    if "ModalityLUTSequence" in source:
        return source
    lut = Dataset()
    lut.RescaleSlope, lut.RescaleIntercept = _rescale(source)
    return lut


def _rescales(headers: Sequence[Dataset]) -> set[tuple[float, float]]:
    return {_rescale(s) for ds in headers for s in _lut_sources(ds)}


def _has_lut_sequence(headers: Sequence[Dataset]) -> bool:
    return any("ModalityLUTSequence" in ds for ds in headers)


def _monochrome1(headers: Sequence[Dataset]) -> bool:
    return any(str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" for ds in headers)


def _sitk_is_exact(headers: Sequence[Dataset]) -> bool:
    """True where SimpleITK's own read gives the real-world values in the stored integer type."""
    if any(int(ds.get("SamplesPerPixel") or 1) != 1 for ds in headers):
        return True  # colour: no Modality LUT; SimpleITK reads RGB as a vector image
    formats = {(ds.get("BitsAllocated"), ds.get("BitsStored"), ds.get("PixelRepresentation")) for ds in headers}
    return (_rescales(headers) <= {(1.0, 0.0)} and not _has_lut_sequence(headers)
            and not _monochrome1(headers) and len(formats) == 1)


def _fallback_is_exact(headers: Sequence[Dataset]) -> bool:
    """True where SimpleITK's float32 read is exact although pydicom could not be used."""
    return len(_rescales(headers)) == 1 and not _has_lut_sequence(headers) and not _monochrome1(headers)


def _with_modality_values(image: sitk.Image, headers: Sequence[Dataset], where: str) -> sitk.Image:
    """``image`` (SimpleITK's float32 read of ``headers``' files) with each slice overwritten, in
    place, by pydicom's Modality LUT values of its file; SimpleITK's values where pydicom cannot be
    used and they are exact; DicomError otherwise."""
    problem = _slice_mismatch(image, headers) or _paste_modality_values(image, headers)
    if problem is None:
        return image
    if _fallback_is_exact(headers):
        # One slope/intercept, MONOCHROME2: GDCM applies it exactly. Slices pasted before pydicom
        # failed hold the same values (both are stored * slope + intercept rounded to float32).
        return image
    why = ("MONOCHROME1, which SimpleITK inverts" if _monochrome1(headers) else
           "a Modality LUT Sequence, which SimpleITK ignores" if _has_lut_sequence(headers) else
           f"{len(_rescales(headers))} different rescale slope/intercept pairs")
    raise DicomError(f"cannot read {where} exactly: {problem}, and SimpleITK alone would misread "
                     f"its values ({why})")


def _slice_mismatch(image: sitk.Image, headers: Sequence[Dataset]) -> str | None:
    """Why the files' frames are not the image's slices one to one in order, or None."""
    size = image.GetSize()
    frames = [_frames(ds) for ds in headers]
    if image.GetDimension() != 3 or sum(frames) != size[2]:
        return f"{len(headers)} file(s) with {sum(frames)} frame(s) but {size[2]} slices in SimpleITK's read"
    for ds in headers:
        if (ds.get("Rows"), ds.get("Columns")) != (size[1], size[0]):
            return f"file {Path(ds.filename).name} is {ds.get('Rows')}x{ds.get('Columns')}, not {size[1]}x{size[0]}"
    if len(headers) == 1:
        return None  # one file: its frames in file order, as GDCM reads them
    multi = [Path(ds.filename).name for ds, n in zip(headers, frames) if n != 1]
    if multi:
        return f"{len(multi)} multi-frame file(s) in the series (e.g. {multi[0]})"
    for k, ds in enumerate(headers):
        ipp = ds.get("ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            continue
        # Half a slice of slack: ITK averages the spacing of slightly non-uniform series.
        if abs(image.TransformPhysicalPointToContinuousIndex([float(v) for v in ipp])[2] - k) >= 0.5:
            return f"file {Path(ds.filename).name} does not lie on slice {k} of SimpleITK's read"
    return None


def _paste_modality_values(image: sitk.Image, headers: Sequence[Dataset]) -> str | None:
    """Overwrite ``image``'s slices (float32) in place with pydicom's Modality LUT values, one file
    after the other; None, or why pydicom cannot decode a file. Slice by slice, pasted into the
    image SimpleITK already allocated, so the volume is never held twice (a numpy volume plus
    GetImageFromArray would be three float32 copies at the peak, and slower: page faults)."""
    size = image.GetSize()
    k = 0
    for header in headers:
        ds = pydicom.dcmread(header.filename, force=True)
        try:
            stored = ds.pixel_array
        except Exception as exc:  # missing decoder plugin, broken pixel data, ...: many types
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            syntax = f" ({ts.name})" if ts is not None else ""
            return f"pydicom cannot decode {Path(header.filename).name}{syntax}: {_first_line(exc)}"
        stored = stored.reshape(-1, size[1], size[0])  # (frames, rows, columns)
        for frame, source in zip(stored, _lut_sources(ds)):
            values = apply_modality_lut(frame, _lut_dataset(source)).astype(np.float32)
            image[:, :, k] = sitk.GetImageFromArray(values)  # PasteImageFilter, in place
            k += 1
    return None


def _set_metadata(image: sitk.Image, ds: Dataset) -> None:
    """Replace ``image``'s metadata with the KEPT_TAGS of ``ds``. A single-file read carries every tag
    of the file (rescale and patient tags included), a series read ITK's unprintable
    ITK_non_uniform_sampling_deviation; neither belongs on a volume that gets written out."""
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    for key, keyword in KEPT_TAGS.items():
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            image.SetMetaData(key, str(value).strip())
