"""``lightfusion batch``: fuse a cohort (a CSV manifest or a BIDS dataset), resumable, on local worker
processes or a Dask distributed cluster, with ``summary.csv``, ``summary.json`` and ``report.html``.

Each case goes through the library's own pipeline: :func:`~LightFusionLib.volumeio.read_volume`,
:func:`~LightFusionLib.fusion.prepare_pair` (checks, input warnings, optional registration),
:func:`~LightFusionLib.fusion.fuse_prepared`, :func:`~LightFusionLib.volumeio.write_volume`
(atomic, verified), the montage of :func:`~LightFusionLib.demo.make_montage`, then a JSON sidecar
written last (atomically) that says what was fused with which model and settings. The sidecar is what
makes a batch resumable: a case whose sidecar matches the current inputs and settings and whose
fused volume still has the SHA-256 the sidecar recorded (and a readable header) is *kept*, not
redone; ``force=True`` redoes everything. A case that fails (bad file, no overlap, ...) is recorded
with its one-line message and the batch goes on; a rerun retries it.

Where cases run
---------------
- ``workers=1`` (default): in this process, the model loaded once.
- ``workers=N``: N worker processes (``concurrent.futures.ProcessPoolExecutor``, spawned), each
  loading the model once (its initializer) and fusing many cases; the network and SimpleITK threads
  of each are set to cores / N, so N workers do not oversubscribe the machine.
- ``scheduler='tcp://HOST:PORT'`` (or a ``distributed.Client``): one Dask task per case on an
  existing Dask distributed cluster; each worker process loads the model once (a per-process cache)
  and runs cores / (threads of all workers on its host) network threads per case. The cluster's
  workers need LightFusion installed and see the same paths (a shared file system).

Inputs
------
CSV manifest: columns ``id,mri,other`` and optionally ``task,axis,colormap,model,register``
(unknown columns are refused); paths relative to the CSV's folder; an empty cell takes the batch's
default. Outputs ``OUT/<id>/fused<ext>``, ``OUT/<id>/montage.png``, ``OUT/<id>/fused.json``.
BIDS dataset root: see :mod:`LightFusionLib.bids` (what is matched, what is skipped, the
BIDS-Derivatives names).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .colormaps import COLORMAPS, NONE
from .colour import DEFAULT_COLOUR_MODE, check_colour_mode
from .errors import FusionCancelled, LightFusionError
from .fileio import (_pid_alive, atomic_output, captured_native_stderr, check_output_folder, os_error_reason,
                     remove_stale_temp_files, same_path)
from .geometry import NET_SIZE, check_axis
from .tasks import get_task

__all__ = ["FuseOptions", "Case", "Plan", "BatchResult", "plan_batch", "run_plan", "fuse_batch", "fuse_case",
           "read_manifest", "MANIFEST_COLUMNS", "SUMMARY_COLUMNS"]

MANIFEST_REQUIRED = ("id", "mri", "other")
MANIFEST_OPTIONAL = ("task", "axis", "colormap", "model", "register")
MANIFEST_COLUMNS = MANIFEST_REQUIRED + MANIFEST_OPTIONAL
REGISTER_KINDS = ("none", "rigid", "affine")
AXES = ("axial", "coronal", "sagittal")
SUMMARY_COLUMNS = ("id", "task", "status", "message", "seconds", "planes", "warnings", "mri", "other", "output",
                   "montage", "sidecar", "backend", "worker", "rss_mb")
SIDECAR_KEY = "LightFusion"
LOCK_NAME = ".lightfusion-batch.lock"
SUMMARY_EVERY_S = 30.0  # summary.csv/json are rewritten this often while a batch runs (and at the end)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VOLUME_EXTS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".vtk", ".hdr", ".img")


# ----------------------------------------------------------------------------------------------
# what is fused: options of the run, one case
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FuseOptions:
    """Options of a whole batch (per-case ones live in :class:`Case`). ``threads``: network (and
    SimpleITK) threads per case; None: all cores in-process, cores / workers with worker processes,
    cores / threads on the host with Dask."""

    backend: str = "auto"
    device: str = "auto"
    half: bool = False
    batch_size: int | None = None
    plane_size: int | None = NET_SIZE
    mri_window: tuple[float, float] | None = None
    other_window: tuple[float, float] | None = None
    threads: int | None = None
    colour_mode: str | None = None  # PET/SPECT colour restoration (colour.restore_colour; None: yuv)
    compress: bool = False  # zlib for .nrrd/.mha outputs (volumeio.write_volume)


@dataclass(frozen=True)
class Case:
    """One pair to fuse and where its outputs go (absolute paths)."""

    id: str
    task: str
    mri: str
    other: str
    output: str
    sidecar: str
    montage: str | None = None
    axis: str = "axial"
    colormap: str | None = None
    model: str | None = None
    register: str = "none"
    sources: tuple[str, ...] = ()  # how the sidecar names the inputs (BIDS URIs), default their paths
    space: str | None = None  # BIDS: the MRI's suffix the fused image lies in (T1w, T2w)
    match: str = ""  # how the pair was found (BIDS), in words


@dataclass
class Plan:
    """The cases of a batch and what was not fused. ``kind``: 'csv', 'bids' or 'list'."""

    kind: str
    source: str
    out: Path
    cases: list[Case]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    ext: str = ".nrrd"

    def describe(self) -> str:
        what = {"csv": "CSV manifest", "bids": "BIDS dataset", "list": "case list"}[self.kind]
        tasks = Counter(c.task for c in self.cases)
        by_task = ", ".join(f"{n} {t}" for t, n in sorted(tasks.items()))
        text = f"{len(self.cases)} case{'s' if len(self.cases) != 1 else ''} from the {what} {self.source}"
        text += f" ({by_task})" if by_task else ""
        if self.skipped:
            text += f"; {len(self.skipped)} not fused (listed below)"
        return text


@dataclass
class BatchResult:
    """What a batch did: one row per case (plan order), what was not fused, totals, files written."""

    out: Path
    rows: list[dict]
    skipped: list[dict]
    totals: dict
    summary_csv: Path
    summary_json: Path
    report: Path | None

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]

    def describe(self) -> str:
        t = self.totals
        text = f"{t['fused']} fused, {t['kept']} kept (verified outputs of an earlier run), {t['failed']} failed"
        if t.get("pending"):
            text += f", {t['pending']} not run"
        return text + f" in {t['wall_seconds']:.1f} s"


# ----------------------------------------------------------------------------------------------
# planning: CSV manifest, BIDS dataset, list of dicts
# ----------------------------------------------------------------------------------------------
def _norm_ext(ext: str | None, default: str) -> str:
    ext = (ext or default).strip()
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext.lower() not in _VOLUME_EXTS:
        raise LightFusionError(f"unknown output extension {ext!r}; use .nrrd, .nii.gz or .mha")
    return ext


def _cell(row: dict, key: str) -> str:
    return (row.get(key) or "").strip()


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV manifest as dicts (header names lower-cased, blank rows dropped), each with its
    line number under ``"_line"``. Refuses unknown and missing columns."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LightFusionError(f"cannot read the manifest {path}: {os_error_reason(exc)}") from None
    except UnicodeDecodeError:
        raise LightFusionError(f"the manifest {path} is not UTF-8 text (a CSV file is needed)") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    if not header:
        raise LightFusionError(f"the manifest {path} is empty; it needs a header id,mri,other[,"
                               f"{','.join(MANIFEST_OPTIONAL)}]")
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    if unknown:
        raise LightFusionError(f"the manifest {path} has unknown column(s) {', '.join(repr(u) for u in unknown)}; "
                               f"the columns are {','.join(MANIFEST_COLUMNS)}")
    duplicated = [h for h, n in Counter(header).items() if n > 1]
    if duplicated:
        raise LightFusionError(f"the manifest {path} repeats the column(s) {', '.join(duplicated)}")
    missing = [h for h in MANIFEST_REQUIRED if h not in header]
    if missing:
        raise LightFusionError(f"the manifest {path} has no {', '.join(missing)} column; it needs id,mri,other")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:
            raise LightFusionError(f"{path}, line {reader.line_num}: more cells than columns")
        if not any((v or "").strip() for v in row.values()):
            continue
        row["_line"] = reader.line_num
        rows.append(row)
    if not rows:
        raise LightFusionError(f"the manifest {path} lists no cases")
    return rows


def _cases_from_rows(rows: list[dict], base: Path, out: Path, where: str, ext: str, montage: bool, task: str | None,
                     axis: str, colormap: str | None, model: str | None, register: str) -> list[Case]:
    cases, seen = [], {}
    for row in rows:
        at = f"{where}, line {row['_line']}" if "_line" in row else f"{where}, case {len(cases) + 1}"
        unknown = [k for k in row if k != "_line" and k not in MANIFEST_COLUMNS]
        if unknown:
            raise LightFusionError(f"{at}: unknown field(s) {', '.join(unknown)}; the fields are {','.join(MANIFEST_COLUMNS)}")
        case_id = _cell(row, "id")
        if not _ID.match(case_id) or ".." in case_id:
            raise LightFusionError(f"{at}: id {case_id!r} must be letters, digits, '.', '_' or '-' (it names the case's "
                                   "output folder)")
        if case_id.lower() in seen:
            raise LightFusionError(f"{at}: id {case_id!r} repeats the case of {seen[case_id.lower()]} "
                                   "(ids must differ, also in case)")
        seen[case_id.lower()] = at
        paths = {}
        for key in ("mri", "other"):
            value = _cell(row, key)
            if not value:
                raise LightFusionError(f"{at}: no {key} path")
            paths[key] = str((base / value).resolve()) if not Path(value).is_absolute() else value
        try:
            case_task = get_task(_cell(row, "task") or task or "pet-mri")
        except LightFusionError as exc:
            raise LightFusionError(f"{at}: {exc}") from None
        case_axis = _cell(row, "axis").lower() or axis
        if case_axis not in AXES:
            raise LightFusionError(f"{at}: unknown axis {case_axis!r}; choose one of {', '.join(AXES)}")
        cmap = _cell(row, "colormap").lower() or None
        if cmap is not None and cmap not in COLORMAPS + (NONE,):
            raise LightFusionError(f"{at}: unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS + (NONE,))}")
        if cmap not in (None, NONE) and not case_task.functional:
            raise LightFusionError(f"{at}: colour maps apply to PET/SPECT, not to {case_task.label}")
        if cmap is None and case_task.functional:
            cmap = colormap  # the batch's colour map applies to PET/SPECT cases only
        reg = _cell(row, "register").lower() or register
        if reg not in REGISTER_KINDS:
            raise LightFusionError(f"{at}: unknown register {reg!r}; choose one of {', '.join(REGISTER_KINDS)}")
        case_model = _cell(row, "model")
        case_model = str((base / case_model).resolve()) if case_model and not Path(case_model).is_absolute() else (
            case_model or model)
        folder = out / case_id
        case = Case(id=case_id, task=case_task.name, mri=paths["mri"], other=paths["other"],
                    output=str(folder / f"fused{ext}"), sidecar=str(folder / "fused.json"),
                    montage=str(folder / "montage.png") if montage else None, axis=case_axis, colormap=cmap,
                    model=str(Path(case_model).resolve()) if case_model else None, register=reg)
        for produced in (case.output, case.sidecar, case.montage):
            for given in (case.mri, case.other):
                if produced and same_path(Path(produced), Path(given)):
                    raise LightFusionError(f"{at}: the output {produced} would replace the input {given}")
        cases.append(case)
    return cases


def plan_batch(source: str | Path | list[dict], out: str | Path, *, task: str | None = None, ext: str | None = None,
               montage: bool = True, axis: str = "axial", colormap: str | None = None, model: str | Path | None = None,
               register: str = "none") -> Plan:
    """The cases of a batch, without running anything.

    ``source``: a CSV manifest, a BIDS dataset folder, or a list of dicts with the manifest's fields
    (paths relative to the current folder). ``task``: for a CSV/list, the task of cases that do not
    name one (default pet-mri); for BIDS, only pairs of this task (default: PET and CT).
    ``axis``/``colormap``/``model``/``register``: defaults for every case (a CSV cell overrides them;
    ``colormap`` applies to PET/SPECT cases only). ``ext``: the fused volumes' format (CSV default
    .nrrd; BIDS: .nii.gz, the only one BIDS allows). ``montage``: write each case's 3x3 montage PNG.
    """
    out = Path(out).resolve()
    check_axis(axis)
    if task is not None:
        task = get_task(task).name
    if register not in REGISTER_KINDS:
        raise LightFusionError(f"unknown register {register!r}; choose one of {', '.join(REGISTER_KINDS)}")
    if colormap is not None:
        colormap = colormap.strip().lower()
        if colormap not in COLORMAPS + (NONE,):
            raise LightFusionError(f"unknown colour map {colormap!r}; choose one of {', '.join(COLORMAPS + (NONE,))}")
    if model is not None:
        model = str(Path(model).resolve())
        if not Path(model).is_file():
            raise LightFusionError(f"model file {model} does not exist")
    if isinstance(source, (list, tuple)):
        rows = [dict(r) for r in source]
        if not rows:
            raise LightFusionError("the case list is empty")
        ext = _norm_ext(ext, ".nrrd")
        cases = _cases_from_rows(rows, Path.cwd(), out, "case list", ext, montage, task, axis, colormap, model, register)
        return Plan("list", f"({len(rows)} cases)", out, cases, [], ext)
    src = Path(source)
    if src.is_dir():
        from . import bids

        if task is None and model is not None:
            raise LightFusionError("--model is the model of one task: give --task pet-mri or ct-mri with it")
        ext = _norm_ext(ext, ".nii.gz")
        if ext.lower() != ".nii.gz":
            raise LightFusionError(f"a BIDS derivative holds NIfTI images; --ext {ext} does not apply (use .nii.gz)")
        bids.check_derivative_folder(src, out)
        pairs, skips = bids.find_pairs(src, out, task)
        cases = []
        for p in pairs:
            functional = get_task(p.task).functional
            cases.append(Case(id=p.id, task=p.task, mri=str(p.mri), other=str(p.other), output=str(p.output),
                              sidecar=str(p.sidecar), montage=str(p.montage) if montage else None, axis=axis,
                              colormap=colormap if functional else None, model=model, register=register,
                              sources=p.sources, space=p.space, match=p.match))
        return Plan("bids", str(src.resolve()), out, cases, [{"path": s.path, "reason": s.reason} for s in skips], ext)
    if not src.exists():
        raise LightFusionError(f"{src} does not exist; give a CSV manifest or a BIDS dataset folder")
    ext = _norm_ext(ext, ".nrrd")
    rows = read_manifest(src)
    cases = _cases_from_rows(rows, src.resolve().parent, out, str(src), ext, montage, task, axis, colormap, model,
                             register)
    return Plan("csv", str(src.resolve()), out, cases, [], ext)


# ----------------------------------------------------------------------------------------------
# resume: what a finished case looks like
# ----------------------------------------------------------------------------------------------
def _stamp(path: str) -> dict:
    """Path, size and modification time of an input (a DICOM folder: of its files)."""
    p = Path(path)
    try:
        if p.is_dir():
            files = [f.stat() for f in p.iterdir() if f.is_file()]
            return {"path": str(p), "files": len(files), "bytes": sum(s.st_size for s in files),
                    "mtime_ns": max((s.st_mtime_ns for s in files), default=0)}
        st = p.stat()
        return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(p), "missing": True}


def case_key(case: Case, options: FuseOptions) -> dict:
    """Everything that decides a case's output: its inputs (path, size, time), the model and the
    settings. A sidecar recording the same key (and an intact output) means the case is done. Where
    the network ran (backend, device, fp16) is recorded but does not count: the same model gives the
    same fusion within a grey level, so moving a half-done batch to another machine redoes nothing."""
    key = {"task": case.task, "axis": case.axis, "colormap": case.colormap, "register": case.register,
           "model": _stamp(case.model) if case.model else "shipped", "plane_size": options.plane_size,
           "mri_window": options.mri_window, "other_window": options.other_window,
           "mri": _stamp(case.mri), "other": _stamp(case.other)}
    if check_colour_mode(options.colour_mode) != DEFAULT_COLOUR_MODE:  # keys of earlier batches stay valid
        key["colour"] = check_colour_mode(options.colour_mode)
    return json.loads(json.dumps(key))  # as it reads back from JSON (tuples as lists)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finished_record(case: Case, key: dict, montage: bool = True) -> dict | None:
    """The sidecar's record when ``case`` is done with these inputs and settings and its output is
    intact (same SHA-256 as written, header readable, size as recorded); else None."""
    import SimpleITK as sitk

    try:
        record = json.loads(Path(case.sidecar).read_text())[SIDECAR_KEY]
        if record.get("key") != key:
            return None
        output = Path(case.output)
        if not output.is_file() or _sha256(output) != record.get("output_sha256"):
            return None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(output))
        with captured_native_stderr():
            reader.ReadImageInformation()
        if list(reader.GetSize()) != record.get("size"):
            return None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    if montage and case.montage and not Path(case.montage).is_file():
        return None
    return record


# ----------------------------------------------------------------------------------------------
# one case (runs in this process, a worker process or on a Dask worker)
# ----------------------------------------------------------------------------------------------
_ENGINES: dict = {}
_ENGINE_LOCK = threading.Lock()
_MODEL_SHA: dict = {}


def _engine(task: str, model: str | None, options: FuseOptions, threads: int | None):
    """The backend for (task, model), loaded once per process and kept."""
    from .backends import load_backend

    key = (task, model, options.backend, options.device, options.half, threads)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            extra = {"threads": threads} if threads else {}
            _ENGINES[key] = load_backend(model, task, options.backend, options.device, half=options.half, **extra)
        return _ENGINES[key]


def _model_sha(path) -> str | None:
    path = str(path)
    if path not in _MODEL_SHA:
        try:
            _MODEL_SHA[path] = _sha256(path)
        except OSError:
            return None
    return _MODEL_SHA[path]


class _DropInputWarnings(logging.Filter):
    """Input warnings go to the summary and the report; not one stderr line per case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _DropInputWarnings()
_QUIET_USERS = 0
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_input_warnings():
    global _QUIET_USERS
    logger = logging.getLogger(__package__ + ".fusion")
    with _QUIET_LOCK:
        _QUIET_USERS += 1
        logger.addFilter(_QUIET)
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_USERS -= 1
            if _QUIET_USERS == 0:
                logger.removeFilter(_QUIET)


def _rss_mb() -> float | None:
    """This process's resident memory now (MB; Linux), for the summary's flat-memory check."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _row(case: Case, status: str, message: str = "", **extra) -> dict:
    row = {"id": case.id, "task": case.task, "status": status, "message": message, "seconds": None, "planes": None,
           "warnings": [], "mri": case.mri, "other": case.other, "output": None, "montage": None,
           "sidecar": None, "backend": None, "worker": None, "rss_mb": None, "match": case.match}
    row.update(extra)
    return row


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, (LightFusionError, FusionCancelled)):
        return _one_line(exc)
    if isinstance(exc, MemoryError):
        return "out of memory while fusing this case"
    if isinstance(exc, OSError):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        return _one_line(f"{paths}: {os_error_reason(exc)}" if paths else os_error_reason(exc))
    first = (str(exc).strip().splitlines() or [""])[0]
    return _one_line(f"internal error (a bug, please report it): {type(exc).__name__}: {first}")


def fuse_case(case: Case, options: FuseOptions, key: dict, threads: int | None = None,
              host_threads: dict | None = None) -> dict:
    """Fuse one case and write its outputs (volume, montage, sidecar last); never raises for a case
    that fails: the returned summary row says ``failed`` and why, in one line. ``host_threads``
    (Dask): threads of all workers per host, to share the cores (see :func:`_dask_threads`)."""
    t0 = time.perf_counter()
    if host_threads is not None and threads is None:
        threads = _dask_threads(host_threads)
    try:
        with _quiet_input_warnings():
            row = _fuse_case(case, options, key, threads, t0)
    except Exception as exc:  # noqa: BLE001 - one case failing never stops the others
        row = _row(case, "failed", _failure_message(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    row["rss_mb"] = _rss_mb()
    return row


def _fuse_case(case: Case, options: FuseOptions, key: dict, threads: int | None, t0: float) -> dict:
    import SimpleITK as sitk

    from . import __version__
    from .demo import make_montage, write_png
    from .fusion import fuse_prepared, prepare_pair
    from .geometry import slicing_axis
    from .volumeio import read_volume, write_volume

    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    task = get_task(case.task)
    engine = _engine(task.name, case.model, options, threads)
    pair = prepare_pair(read_volume(case.mri, "MRI"), read_volume(case.other, task.modality), task.name,
                        case.colormap, options.mri_window, options.other_window, register=case.register)
    planes = pair.reference.GetSize()[slicing_axis(pair.reference, case.axis)]
    batch_size = options.batch_size
    if batch_size is None and threads == 1 and engine.name == "onnx" and engine.device == "cpu":
        batch_size = 1  # one thread: a plane per run keeps its activations in cache (1.2-1.4x the planes/s of 2)
    fused = fuse_prepared(pair, engine, case.axis, batch_size, plane_size=options.plane_size,
                          colour_mode=options.colour_mode)
    output = Path(case.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_volume(fused, output, compress=options.compress)
    montage = None
    if case.montage:
        Path(case.montage).parent.mkdir(parents=True, exist_ok=True)
        montage = str(write_png(make_montage(pair, fused), case.montage))
    seconds = round(time.perf_counter() - t0, 3)
    model_path = getattr(engine, "model_path", case.model)
    record = {
        "version": __version__, "task": task.name, "model": str(model_path), "model_sha256": _model_sha(model_path),
        "backend": engine.describe(), "axis": case.axis, "colormap": pair.colormap,
        "colour": check_colour_mode(options.colour_mode) if pair.rgb_output else None, "register": case.register,
        "registration": pair.registration.describe() if pair.registration is not None
        and hasattr(pair.registration, "describe") else None,
        "plane_size": options.plane_size, "mri_window": [float(v) for v in pair.mri_window],
        "other_window": [float(v) for v in pair.other_window] if pair.other_window else None,
        "coverage": round(float(pair.coverage), 4), "warnings": list(pair.warnings), "planes": int(planes),
        "seconds": seconds, "output": output.name, "output_sha256": _sha256(output),
        "size": list(fused.GetSize()), "components": fused.GetNumberOfComponentsPerPixel(),
        "montage": Path(montage).name if montage else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "key": key,
    }
    label = f"MRI fused with {task.modality}"
    sidecar = {"Description": f"{label} by LightFusionNet ({task.name} model), on the MRI's grid",
               "Sources": list(case.sources) or [case.mri, case.other]}
    if case.space:
        sidecar["SpatialReference"] = case.sources[0] if case.sources else case.mri
    sidecar[SIDECAR_KEY] = record
    with atomic_output(case.sidecar) as tmp:  # written last: it marks the case done
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return _row(case, "fused", seconds=seconds, planes=int(planes), warnings=list(pair.warnings),
                output=str(output), montage=montage, sidecar=case.sidecar, backend=engine.describe())


def _kept_row(case: Case, record: dict) -> dict:
    montage = case.montage if case.montage and Path(case.montage).is_file() else None
    if montage is None and record.get("montage"):
        earlier = Path(case.output).parent / record["montage"]
        montage = str(earlier) if earlier.is_file() else None
    return _row(case, "kept", "verified output of an earlier run; not redone", seconds=record.get("seconds"),
                planes=record.get("planes"), warnings=list(record.get("warnings") or []), output=case.output,
                montage=montage, sidecar=case.sidecar, backend=record.get("backend"))


# ----------------------------------------------------------------------------------------------
# runners: in process, worker processes, Dask
# ----------------------------------------------------------------------------------------------
Deliver = Callable[[dict], None]


def _run_here(todo: Iterable[Case], keys: dict, options: FuseOptions, deliver: Deliver) -> None:
    for case in todo:
        deliver(fuse_case(case, options, keys[case.id], options.threads))


def _init_worker(options: FuseOptions, threads: int, preload: list[tuple[str, str | None]]) -> None:
    """Worker process start: its thread count, the model(s) loaded once."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    for task, model in preload:
        with contextlib.suppress(Exception):  # a model that does not load fails its cases, with its message
            _engine(task, model, options, threads)


def _run_pool(todo: list[Case], keys: dict, options: FuseOptions, workers: int, deliver: Deliver) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = options.threads or max(1, (os.cpu_count() or 1) // workers)
    preload = sorted({(c.task, c.model) for c in todo}, key=str)[:4]
    remaining = deque(todo)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    while remaining:
        pool = ProcessPoolExecutor(min(workers, len(remaining)), mp_context=context, initializer=_init_worker,
                                   initargs=(options, threads, preload))
        in_flight: dict = {}
        broken = False
        try:
            while remaining or in_flight:
                while remaining and not broken and len(in_flight) < 2 * workers:  # a short queue: a crash loses little
                    case = remaining.popleft()
                    in_flight[pool.submit(fuse_case, case, options, keys[case.id], threads)] = case
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    case = in_flight.pop(future)
                    try:
                        row = future.result()
                    except BrokenProcessPool:
                        broken = True
                        row = _row(case, "failed", "a worker process died while this case was in progress (killed, or "
                                                   "out of memory?); rerun the batch to retry it")
                    except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle: that case fails
                        row = _row(case, "failed", _failure_message(exc))
                    deliver(row)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def _dask_threads(host_threads: dict) -> int:
    """Network threads per case on this Dask worker: the host's cores over the threads of all the
    workers the scheduler knew on this host."""
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        worker = get_worker()
        on_host = host_threads.get(get_address_host(worker.address)) or worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        on_host = 1
    return max(1, (os.cpu_count() or 1) // max(1, on_host))


def _run_dask(todo: list[Case], keys: dict, options: FuseOptions, scheduler, deliver: Deliver) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise LightFusionError("--scheduler needs Dask distributed: pip install 'lightfusion[cluster]'") from None
    own = not hasattr(scheduler, "submit")
    if own:
        try:
            client = Client(scheduler, timeout="30s", set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise LightFusionError(f"cannot reach the Dask scheduler at {scheduler}: {_one_line(exc) or type(exc).__name__}") from None
    else:
        client = scheduler
    try:
        if not client.scheduler_info()["workers"]:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise LightFusionError(f"the Dask scheduler at {client.scheduler.address} has no workers; start some "
                                       f"(dask worker {client.scheduler.address})") from None
        host_threads: Counter = Counter()
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]  # all of them (newer distributed lists 5 by default)
        except TypeError:
            workers = client.scheduler_info()["workers"]
        for worker in workers.values():
            host_threads[worker["host"]] += worker["nthreads"]
        token = os.urandom(4).hex()
        futures = {client.submit(fuse_case, case, options, keys[case.id], options.threads, dict(host_threads),
                                 key=f"lightfusion-{case.id}-{token}", pure=False): case for case in todo}
        for future in as_completed(futures, loop=client.loop):
            case = futures.pop(future)
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died, a cancelled task: that case fails
                row = _row(case, "failed", _one_line(f"the Dask task failed: {type(exc).__name__}: {exc}"))
            deliver(row)
            future.release()
    finally:
        if own:
            client.close()


# ----------------------------------------------------------------------------------------------
# the batch
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _batch_lock(out: Path):
    """One batch at a time writes ``out``: a lock file naming host and process; a lock left by a
    killed batch on this host is taken over."""
    path = out / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
                stale = host == socket.gethostname() and not _pid_alive(int(pid))
            except (OSError, ValueError):
                host, pid = "?", "?"
                stale = time.time() - path.stat().st_mtime > 60 if path.exists() else True
            if stale:
                path.unlink(missing_ok=True)
                continue
            raise LightFusionError(f"another lightfusion batch (process {pid} on {host}) is writing {out}; if it no "
                                   f"longer runs, delete {path}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    else:
        raise LightFusionError(f"cannot take the lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()


def _summary(plan: Plan, rows: dict, options: FuseOptions, started: float, started_at: str, complete: bool,
             workers: int, scheduler) -> dict:
    from . import __version__

    ordered = [rows[c.id] for c in plan.cases if c.id in rows]
    counts = Counter(r["status"] for r in ordered)
    wall = time.perf_counter() - started
    fused_seconds = sum(r["seconds"] or 0 for r in ordered if r["status"] == "fused")
    totals = {"cases": len(plan.cases), "fused": counts["fused"], "kept": counts["kept"], "failed": counts["failed"],
              "pending": len(plan.cases) - len(ordered), "not_fused": len(plan.skipped),
              "with_warnings": sum(1 for r in ordered if r["warnings"]), "wall_seconds": round(wall, 2),
              "case_seconds": round(fused_seconds, 2),
              "cases_per_minute": round(60 * counts["fused"] / wall, 2) if wall > 0 else None}
    settings = {k: v for k, v in asdict(options).items()}
    settings.update(workers=workers, scheduler=str(scheduler) if scheduler is not None else None, ext=plan.ext)
    return {"version": __version__, "input": plan.source, "kind": plan.kind, "out": str(plan.out),
            "started": started_at, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": complete, "settings": settings, "totals": totals, "cases": ordered, "skipped": plan.skipped}


def _write_summaries(out: Path, summary: dict) -> tuple[Path, Path]:
    csv_path, json_path = out / "summary.csv", out / "summary.json"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary["cases"]:
        writer.writerow({**row, "warnings": " | ".join(row["warnings"])})
    with atomic_output(csv_path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    with atomic_output(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def _check_formats(plan: Plan) -> None:
    """The output extension must hold the volumes the cases make (RGB for coloured PET/SPECT)."""
    from .volumeio import check_output_format, check_output_path

    probe = plan.out / f"probe{plan.ext}"
    check_output_path(probe, [])
    kinds = {get_task(c.task).functional and c.colormap != NONE for c in plan.cases}
    for rgb in sorted(kinds):
        check_output_format(probe, rgb)


def run_plan(plan: Plan, *, workers: int = 1, scheduler=None, force: bool = False, options: FuseOptions | None = None,
             report: bool = True, progress: bool = False) -> BatchResult:
    """Run a :func:`plan_batch` plan: keep the verified outputs of earlier runs (unless ``force``),
    fuse the rest (in this process, ``workers`` processes, or on the Dask ``scheduler``), and write
    ``summary.csv``, ``summary.json`` and (``report``) ``report.html`` into ``plan.out``. ``progress``:
    a tqdm bar over cases."""
    options = options or FuseOptions()
    if workers < 1:
        raise LightFusionError(f"workers must be at least 1, got {workers}")
    if scheduler is not None and workers != 1:
        raise LightFusionError("give either --workers (processes on this machine) or --scheduler (a Dask cluster)")
    if options.threads is not None and options.threads < 1:
        raise LightFusionError(f"threads must be at least 1, got {options.threads}")
    out = check_output_folder(plan.out, "batch output folder")
    started, started_at = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    with _batch_lock(out):
        if plan.kind == "bids":
            from .bids import write_dataset_description

            write_dataset_description(plan.source, out)
        if plan.cases:
            _check_formats(plan)
        keys = {c.id: case_key(c, options) for c in plan.cases}
        rows: dict = {}
        todo = []
        for case in plan.cases:
            record = None if force else finished_record(case, keys[case.id], montage=case.montage is not None)
            if record is not None:
                rows[case.id] = _kept_row(case, record)
                for folder in {Path(case.output).parent, Path(case.montage).parent if case.montage else None} - {None}:
                    remove_stale_temp_files(folder)  # left by a killed --force rerun
            else:
                todo.append(case)
        from tqdm import tqdm

        bar = tqdm(total=len(plan.cases), initial=len(rows), unit="case", desc="batch", disable=not progress,
                   dynamic_ncols=True)
        last_write = [time.monotonic()]

        def deliver(row: dict) -> None:
            rows[row["id"]] = row
            bar.update(1)
            failed = sum(1 for r in rows.values() if r["status"] == "failed")
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
            if time.monotonic() - last_write[0] > SUMMARY_EVERY_S:
                last_write[0] = time.monotonic()
                _write_summaries(out, _summary(plan, rows, options, started, started_at, False, workers, scheduler))

        complete = False
        try:
            if todo:
                with _quiet_input_warnings():
                    if scheduler is not None:
                        _run_dask(todo, keys, options, scheduler, deliver)
                    elif workers > 1 and len(todo) > 1:
                        _run_pool(todo, keys, options, workers, deliver)
                    else:
                        _run_here(todo, keys, options, deliver)
            complete = True
        finally:
            bar.close()
            summary = _summary(plan, rows, options, started, started_at, complete, workers, scheduler)
            csv_path, json_path = _write_summaries(out, summary)
            report_path = None
            if report:
                from .report import write_report

                report_path = write_report(summary, out / "report.html")
    return BatchResult(out, summary["cases"], plan.skipped, summary["totals"], csv_path, json_path, report_path)


def fuse_batch(source: str | Path | list[dict], out: str | Path, *, task: str | None = None, workers: int = 1,
               scheduler=None, force: bool = False, ext: str | None = None, montage: bool = True, report: bool = True,
               progress: bool = False, axis: str = "axial", colormap: str | None = None,
               model: str | Path | None = None, register: str = "none", backend: str = "auto", device: str = "auto",
               half: bool = False, batch_size: int | None = None, plane_size: int | None = NET_SIZE,
               mri_window: tuple[float, float] | None = None, other_window: tuple[float, float] | None = None,
               threads: int | None = None, colour_mode: str | None = None, compress: bool = False) -> BatchResult:
    """Fuse a cohort: ``source`` is a CSV manifest, a BIDS dataset folder or a list of dicts with
    the manifest's fields; outputs, summaries and the review report go to ``out``. See
    :func:`plan_batch` (which cases, where their outputs go) and :func:`run_plan` (resume, where the
    cases run). Returns a :class:`BatchResult`; failed cases are in its rows, never raised.

    Example::

        from LightFusionLib.batch import fuse_batch
        result = fuse_batch("cohort.csv", "fused/", workers=2)
        result.failed          # [{'id': ..., 'message': ...}, ...]
        fuse_batch("bids/", "bids/derivatives/lightfusion", scheduler="tcp://head:8786")
    """
    plan = plan_batch(source, out, task=task, ext=ext, montage=montage, axis=axis, colormap=colormap, model=model,
                      register=register)
    options = FuseOptions(backend=backend, device=device, half=half, batch_size=batch_size, plane_size=plane_size,
                          mri_window=tuple(mri_window) if mri_window else None,
                          other_window=tuple(other_window) if other_window else None, threads=threads,
                          colour_mode=check_colour_mode(colour_mode), compress=compress)
    return run_plan(plan, workers=workers, scheduler=scheduler, force=force, options=options, report=report,
                    progress=progress)


def describe_case(case: Case, plan: Plan) -> str:
    """One line for ``--dry-run``: id, task, the two inputs, the output (relative where it helps)."""
    def short(p: str | None, root: str) -> str:
        if p is None:
            return "-"
        try:
            return Path(p).relative_to(root).as_posix()
        except ValueError:
            return p

    root = plan.source if plan.kind == "bids" else str(Path(plan.source).parent) if plan.kind == "csv" else str(Path.cwd())
    extra = [f"axis {case.axis}"] if case.axis != "axial" else []
    extra += [f"colormap {case.colormap}"] if case.colormap else []
    extra += [f"register {case.register}"] if case.register != "none" else []
    extra += [f"model {case.model}"] if case.model else []
    return (f"{case.id}: {case.task}: {short(case.mri, root)} + {short(case.other, root)} -> "
            f"{short(case.output, str(plan.out))}" + (f" ({', '.join(extra)})" if extra else ""))

