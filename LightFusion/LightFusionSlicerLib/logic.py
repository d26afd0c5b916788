"""LightFusionLogic: fuse two MRML volume nodes with LightFusionLib, without Qt.

Console use (inside Slicer)::

    import LightFusion
    fused = LightFusion.LightFusionLogic().process(getNode("MRI"), getNode("PET"))
    fused = LightFusion.LightFusionLogic().process(getNode("MRI"), getNode("PET"), registration="rigid")

Rules (see also :mod:`LightFusionSlicerLib.mrml`):

- the inputs are only read; the result is a new volume node (or the given ``outputNode``) on the MRI
  grid: ``vtkMRMLVectorVolumeNode`` for an RGB result (PET/SPECT), ``vtkMRMLScalarVolumeNode``
  for a scalar one (CT, or colour map ``"none"``);
- a new node is named ``<MRI>_<other>_fused`` (made unique); a given output node keeps its name,
  unless it is still empty (as made by a "Create new volume" selector entry);
- ``registration="rigid"|"affine"`` registers the other volume to the MRI first
  (:mod:`LightFusionLib.registration`) and fuses through the transform found; the transform is added
  to the scene as a ``vtkMRMLLinearTransformNode`` named ``<other>_to_<MRI>`` (Slicer's convention:
  put the other volume under it to see it on the MRI). The other volume is put under it only when
  asked (``applyTransformToOther=True``);
- nothing is added to or changed in the scene until the fusion has succeeded: a cancelled or failed
  run (also one whose scene is closed meanwhile) leaves no half-made node, no transform node, and a
  given output node untouched;
- linear parent transforms of the inputs are applied (geometry only); the output is put under the
  MRI's parent transform with the MRI's own (local) geometry, so it overlays the MRI exactly;
  non-linear parent transforms are refused with a message that says how to harden them;
- the slow steps that are not batches (loading the model, registering, resampling) run on a worker
  thread that touches no MRML node, while the calling thread calls ``idleCallback`` about every
  50 ms (the panel passes ``slicer.app.processEvents``: the panel stays responsive and Cancel is seen
  at once, also while the model loads).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from LightFusionLib.backends import BACKEND_PACKAGES, BACKENDS, DEVICES  # the library's lists of choices, never copies
from LightFusionLib.colour import COLOUR_MODES, DEFAULT_COLOUR_MODE, check_colour_mode  # also the panel's
from LightFusionLib.errors import FusionCancelled
from LightFusionLib.geometry import AXES
from LightFusionLib.registration import KINDS as REGISTRATION_KINDS
from LightFusionLib.tasks import TASK_NAMES as TASKS
from LightFusionLib.tasks import get_task

from . import display, mrml

try:  # inside Slicer: the usual base class (gives getParameterNode(), moduleName...)
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:  # slicer-core wheel / plain Python: the base class needs Qt, which is absent
    class _LogicBase:  # type: ignore[no-redef]
        """Qt-free stand-in for ScriptedLoadableModuleLogic: the same module name and the same
        singleton parameter node (a vtkMRMLScriptedModuleNode tagged with the module name)."""

        def __init__(self, parent=None) -> None:
            self.parent = parent
            self.moduleName = "LightFusion"
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            import slicer

            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)  # CreateNodeByClass returns a new reference
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node = slicer.mrmlScene.AddNode(node)
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node


class LightFusionInputError(ValueError):
    """Unusable inputs or parameters; the message says what to change."""


def sampleDataDir() -> Path:
    """Folder of the bundled sample volumes (LightFusionLib's own lookup, so the demo and the module
    agree): $LIGHTFUSION_SAMPLE_DATA, else Resources/SampleData beside the LightFusionLib package."""
    from LightFusionLib.demo import sample_data_dir

    return sample_data_dir()


def modelsDir() -> Path:
    """Folder of the shipped models (LightFusionLib's own lookup, so both always agree)."""
    from LightFusionLib.models import models_dir

    return models_dir()


def isInstalled(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    from LightFusionLib.backends import is_installed

    return is_installed(package)


def requirementsPath() -> Path:
    """The module's ``Resources/requirements.txt``: what "install on first use" installs (the template's
    place for a scripted module's Python dependencies)."""
    from . import MODULE_DIR

    return Path(MODULE_DIR) / "Resources" / "requirements.txt"


def loadRequirements(path: str | os.PathLike | None = None) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options skipped, as
    ``slicer.packaging.load_requirements`` reads it)."""
    lines = Path(path or requirementsPath()).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "-"))]


def requirementFor(package: str) -> str:
    """The requirements.txt line for ``package`` ('onnxruntime>=1.17'), else the bare name (torch: it
    is not in requirements.txt; the PyTorch extension picks the build)."""
    for line in loadRequirements():
        if re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower() == package.lower():
            return line
    return package


def missingPackage(backend: str = "auto") -> str | None:
    """The package to install before fusing with ``backend``, or None.

    'auto' needs torch, onnxruntime or openvino; when none is there it offers onnxruntime, the
    module's requirements.txt (small, CPU). 'torch' needs torch (offered through the PyTorch
    extension); 'onnx' needs onnxruntime; 'openvino' needs openvino (optional: faster than ONNX
    Runtime on some CPUs, see LightFusionLib.backends.faster_cpu_runtime).
    """
    if backend in BACKEND_PACKAGES:
        return None if isInstalled(BACKEND_PACKAGES[backend]) else BACKEND_PACKAGES[backend]
    return None if any(isInstalled(p) for p in BACKEND_PACKAGES.values()) else BACKEND_PACKAGES["onnx"]


def gpuName() -> str | None:
    """Name of the CUDA GPU torch sees, or None (also when torch is not installed)."""
    from LightFusionLib.backends import gpu_name

    try:
        return gpu_name()
    except Exception:  # a broken CUDA install must not break the panel
        logging.exception("LightFusion: CUDA detection failed")
        return None


VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")
# (name word prefix, task) from the tasks' modalities ('spect', 'pet', 'ct'); longest prefix first
_TASK_OF_NAME = tuple(sorted(((get_task(t).modality.lower(), t) for t in TASKS), key=lambda kv: -len(kv[0])))
_MRI_WORDS = ("mr", "t1", "t2")  # 'mri', 'mr', 'mprage'... and T1/T2-weighted names


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _tokens(path: Path) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", _stem(path).lower()) if t]


def findSamplePair(folder: Path) -> tuple[Path, Path, str]:
    """(MRI file, PET/SPECT/CT file, task) among the volume files of ``folder``.

    Names are split into words at non-alphanumerics: the MRI file has a word starting with 'mr', 't1'
    or 't2' (``mni152-t1.nrrd``), the other a word starting with 'pet', 'spect' or 'ct'
    (``mni152-fdg-pet-sim.nrrd``; PET preferred, then SPECT, then CT). Raises
    LightFusionInputError naming the folder when no such pair is there.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)) \
        if folder.is_dir() else []
    mris, others = [], {}
    for path in files:
        words = _tokens(path)
        task = next((t for key, t in _TASK_OF_NAME for w in words if w.startswith(key)), None)
        if task is not None:
            others.setdefault(task, path)
        elif any(w.startswith(k) for w in words for k in _MRI_WORDS):
            mris.append(path)
    if not mris or not others:
        raise LightFusionInputError(
            f"no sample MRI + PET/SPECT/CT volumes in {folder} (expected files such as mni152-t1.nrrd and "
            "mni152-fdg-pet-sim.nrrd)")
    task = next(t for t in TASKS if t in others)  # in the library's order: PET, SPECT, CT
    return mris[0], others[task], task


def guessInputs(scene, exclude=()) -> tuple[object | None, object | None]:
    """(MRI, PET/SPECT/CT) volume nodes of ``scene`` guessed from their names, for preselection:
    a scalar volume with a word starting with 'mr', 't1' or 't2', and a scalar or RGB volume with a
    word starting with 'pet', 'spect' or 'ct'. Nodes whose ID is in ``exclude`` are passed over.
    Either may be None."""
    mri = other = None
    for className in (mrml.SCALAR_CLASS, mrml.VECTOR_CLASS):
        for index in range(scene.GetNumberOfNodesByClass(className)):
            node = scene.GetNthNodeByClass(index, className)
            if node.GetClassName() != className or node.GetID() in exclude:  # label maps and other subclasses
                continue
            words = [w for w in re.split(r"[^a-z0-9]+", (node.GetName() or "").lower()) if w]
            if other is None and any(w.startswith(k) for w in words for k, _ in _TASK_OF_NAME):
                other = node
            elif (mri is None and className == mrml.SCALAR_CLASS
                  and any(w.startswith(k) for w in words for k in _MRI_WORDS)):
                mri = node
    return mri, other


# Node IDs already offered by :func:`inputsToPreselect` (or selected by the user) for this parameter
# node, saved with the scene as an attribute of the parameter node.
PRESELECTED_ATTRIBUTE = "LightFusion.OfferedInputIDs"


def _offeredIDs(parameterNode) -> set[str]:
    return set((parameterNode.GetAttribute(PRESELECTED_ATTRIBUTE) or "").split())


def rememberSelection(parameterNode, *nodes) -> None:
    """Record ``nodes`` (the current selections) as seen, so that clearing one of them later is final:
    :func:`inputsToPreselect` never puts it back."""
    offered = _offeredIDs(parameterNode)
    added = {n.GetID() for n in nodes if n is not None and n.GetID()} - offered
    if added:
        parameterNode.SetAttribute(PRESELECTED_ATTRIBUTE, " ".join(sorted(offered | added)))


def inputsToPreselect(scene, parameterNode, mriSelected, otherSelected) -> tuple[object | None, object | None]:
    """(MRI, other) volume to preselect on entering the module, None for "leave as is".

    A selector that is empty gets :func:`guessInputs`' guess, but only a node not offered (or
    selected) before for this parameter node: a selection the user cleared stays cleared when the
    module is entered again, while a newly loaded volume is still preselected."""
    rememberSelection(parameterNode, mriSelected, otherSelected)
    guesses = guessInputs(scene, exclude=_offeredIDs(parameterNode))
    chosen = [guess if selected is None else None for selected, guess in zip((mriSelected, otherSelected), guesses)]
    if chosen[0] is not None and chosen[0] is otherSelected:
        chosen[0] = None
    if chosen[1] is not None and chosen[1] is (chosen[0] or mriSelected):
        chosen[1] = None
    rememberSelection(parameterNode, *chosen)
    return chosen[0], chosen[1]


SAMPLE_CATEGORY = "LightFusion"  # the Sample Data module's section for LightFusion's data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampleDataSource(folder: str | os.PathLike | None = None) -> dict:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for the
    bundled sample pair (the template's ``registerSampleData``): category "LightFusion", the two
    files as ``file://`` URIs with their SHA256 checksums, and their node names. The caller adds a
    ``customDownloader`` that loads them where they are (:meth:`LightFusionLogic.loadSampleData`).
    Raises LightFusionInputError when the folder holds no sample pair."""
    mriPath, otherPath, task = findSamplePair(Path(folder) if folder else sampleDataDir())
    paths = (mriPath.resolve(), otherPath.resolve())
    return {
        "category": SAMPLE_CATEGORY,
        "sampleName": f"LightFusion {get_task(task).label}",
        "uris": [path.as_uri() for path in paths],
        "fileNames": [path.name for path in paths],
        "nodeNames": [_stem(path) for path in paths],
        "checksums": [f"SHA256:{_sha256(path)}" for path in paths],
        "loadFileType": ["VolumeFile", "VolumeFile"],
    }


def sampleFolderFromSource(source) -> Path:
    """The folder of a registered sample source's first file (its ``file://`` URI)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(urlparse(source.uris[0]).path)).parent


def fusedVolumeName(mriNode, otherNode) -> str:
    return f"{mriNode.GetName()}_{otherNode.GetName()}_fused"


def expectedOutputClass(task: str, colormap: str | None) -> str:
    """Node class the fusion will produce (LightFusionLib.fusion's rule): scalar for CT-MRI and for
    colour map 'none' (grayscale fusion, also of an RGB input's luma), RGB vector otherwise."""
    if not get_task(task).functional or (colormap or "").strip().lower() == "none":
        return mrml.SCALAR_CLASS
    return mrml.VECTOR_CLASS


REGISTRATIONS = ("none", *REGISTRATION_KINDS)  # 'none' = the volumes are already aligned


def transformName(otherNode, mriNode) -> str:
    return f"{otherNode.GetName()}_to_{mriNode.GetName()}"


def _oneLine(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class _LogOnCallingThread(logging.Handler):
    """While a worker thread runs library code, the ``LightFusionLib`` loggers' records are collected
    here and handed to the application's handlers (the root logger's) by the calling thread in
    :meth:`flush`: in Slicer those handlers write to Qt objects (the error log, the Python console),
    which belong to the main thread."""

    def __init__(self) -> None:
        super().__init__()
        self._records: list = []
        self._lock_records = threading.Lock()
        self._logger = logging.getLogger("LightFusionLib")
        self._propagate = True

    def emit(self, record) -> None:
        with self._lock_records:
            self._records.append(record)

    def flush(self) -> None:
        with self._lock_records:
            records, self._records = self._records, []
        root = logging.getLogger()
        for record in records:
            if record.levelno >= root.getEffectiveLevel():
                root.handle(record)

    def __enter__(self):
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate
        self.flush()


class LightFusionLogic(_LogicBase):
    """Computation of the LightFusion module; usable without the widget (console, tests, scripts).

    Attributes after a successful :meth:`process`: ``lastRun`` = dict(seconds, device, backend,
    outputNodeID, mriNodeID, otherNodeID, task, colormap, colourMode, otherWindow, warnings, registration,
    transformNodeID, measureBefore, measureAfter, registrationSeconds); ``colourMode`` is the PET/SPECT
    colour restoration used ('yuv' or 'saturated'), None for a grayscale result (CT, colour map 'none'),
    where it has no effect. ``lastWarnings``: the input warnings of the last run (also logged), one
    line each, e.g. a pair that looks misaligned.
    """

    POLL_SECONDS = 0.05  # how often idleCallback runs while a worker thread works

    def __init__(self, parent=None) -> None:
        _LogicBase.__init__(self, parent)
        self._backends: dict[tuple, object] = {}
        self._backendLock = threading.Lock()
        self._cancelRequested = False
        self.lastRun: dict | None = None
        self.lastWarnings: list[str] = []  # input warnings of the last process() (suspicious but usable input)

    # -- cancellation ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask a running :meth:`process` to stop (it raises FusionCancelled): while the model loads or
        the volumes are registered (at once), between batches, and after the last batch."""
        self._cancelRequested = True

    # -- backends -------------------------------------------------------------------------------
    def getBackend(self, task: str, model: str | os.PathLike | None = None, backend: str = "auto",
                   device: str = "auto"):
        """A LightFusionLib backend for ``task`` (shipped model) or the model file ``model``, cached
        per (model, task, backend, device, model file time) so repeated runs do not reload it.
        Thread-safe: a load started by a cancelled run is finished and kept for the next one."""
        from LightFusionLib.backends import load_backend

        if backend not in BACKENDS:
            raise LightFusionInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if device not in DEVICES:
            raise LightFusionInputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        modelKey = None
        if model:
            path = Path(model)
            modelKey = (str(path.resolve()), path.stat().st_mtime if path.is_file() else None)
        key = (modelKey, task, backend, device)
        with self._backendLock:
            if key not in self._backends:
                self._backends.clear()  # one model in memory at a time
                self._backends[key] = load_backend(Path(model) if model else None, task=task, backend=backend,
                                                   device=device)
            return self._backends[key]

    @staticmethod
    def describeBackend(backendObject) -> str:
        """'torch on cuda (NVIDIA H100 80GB HBM3)' / 'onnx on cpu'."""
        text = backendObject.describe() if hasattr(backendObject, "describe") else str(backendObject)
        device = str(getattr(backendObject, "device", ""))
        if device.startswith("cuda") and getattr(backendObject, "name", "") == "torch":
            name = gpuName()
            if name:
                text += f" ({name})"
        return text

    # -- a slow step on a worker thread ------------------------------------------------------------
    def _runInBackground(self, what: str, function, cancelled, idleCallback=None, onPoll=None):
        """Run ``function()`` on a worker thread and wait for it here, calling ``idleCallback()`` and
        ``onPoll()`` about every :attr:`POLL_SECONDS`. Raises FusionCancelled as soon as
        ``cancelled()`` is true (the worker finishes on its own and its result is dropped; it must not
        touch MRML). The worker's exception is re-raised here."""
        outcome: dict = {}
        finished = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = function()
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                outcome["error"] = exc
            finally:
                finished.set()

        with _LogOnCallingThread() as libraryLog:
            worker = threading.Thread(target=work, name=f"LightFusion {what}", daemon=True)
            worker.start()
            while True:
                libraryLog.flush()
                if cancelled():
                    raise FusionCancelled(f"cancelled while {what}")
                if finished.wait(self.POLL_SECONDS if idleCallback is None else 0.0):
                    break
                if onPoll is not None:
                    onPoll()
                if idleCallback is not None:
                    idleCallback()
                    finished.wait(self.POLL_SECONDS)  # sleeps without the GIL: the worker runs meanwhile
        if cancelled():
            raise FusionCancelled(f"cancelled while {what}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    # -- main entry point -----------------------------------------------------------------------
    def process(self, mriNode, otherNode, outputNode=None, task: str = "pet-mri", axis: str = "axial",
                device: str = "auto", colormap: str | None = None, progressCallback=None, *,
                model: str | os.PathLike | None = None, backend="auto", batchSize: int | None = None,
                cancelCallback=None, registration: str = "none", applyTransformToOther: bool = False,
                statusCallback=None, idleCallback=None, colourMode: str | None = None):
        """Fuse ``otherNode`` (PET/SPECT/CT, scalar or RGB) into ``mriNode`` (scalar MRI).

        :param mriNode, otherNode: volume nodes, or node names/IDs.
        :param outputNode: volume node to overwrite, or None to create one (see the module docstring).
        :param task: 'pet-mri', 'spect-mri' or 'ct-mri' (the model used, and the kind of ``otherNode``).
        :param axis: slicing axis of the 2-D network: 'axial', 'coronal' or 'sagittal'.
        :param device: 'auto', 'cpu' or 'cuda'.
        :param colormap: colour map for a scalar PET/SPECT; None = the task's default; 'none' = grayscale.
        :param progressCallback: called as ``progressCallback(done, total)`` between batches.
        :param model: a model file (.pt or .onnx) trained for ``task`` instead of the shipped one.
        :param backend: one of BACKENDS ('auto', 'torch', 'onnx', 'openvino'), or a backend object from LightFusionLib.load_backend.
        :param batchSize: planes per batch (None: the backend's preferred size).
        :param cancelCallback: returns True to stop; :meth:`cancel` does the same.
        :param registration: 'none' (the volumes are aligned as they lie), 'rigid' or 'affine':
            register the other volume to the MRI first; the transform becomes a transform node.
        :param applyTransformToOther: also put ``otherNode`` under that transform node (only then is
            an input changed: its parent transform).
        :param statusCallback: called as ``statusCallback(stage, **info)`` when a stage starts: 'loading'
            (the model), 'preparing' (resampling), 'registering' (kind=, level=, levels=; level None
            before the first level is done), 'registered' (before=, after=: the alignment measure),
            'fusing'.
        :param idleCallback: called about every 50 ms while a worker thread works (and between batches
            through ``progressCallback``); the panel passes ``slicer.app.processEvents``.
        :param colourMode: how an RGB (PET/SPECT) result is coloured, one of ``COLOUR_MODES``
            (:func:`LightFusionLib.colour.restore_colour`): 'yuv' (the paper's plain YUV, the default when
            None: the source's chroma under the fused luma) or 'saturated' (the chroma scaled with the
            luma change: keeps the source's saturation). The fused luma is the same; no effect on a
            grayscale result (CT, colour map 'none').
        :returns: the output volume node.
        :raises LightFusionInputError / VolumeNodeError / LightFusionLib errors (ValueError) for
            unusable input; FusionCancelled when cancelled (or when the scene is closed meanwhile).
        """
        from LightFusionLib.fusion import fuse_prepared, prepare_pair, resolve_backend

        started = time.perf_counter()
        self.lastWarnings = []
        self._cancelRequested = False  # a Cancel pressed while the model loads still counts
        mriNode = self._resolveNode(mriNode, "MRI")
        otherNode = self._resolveNode(otherNode, "PET/SPECT/CT")
        task = self._checkChoice("task", task.strip().lower() if isinstance(task, str) else task, TASKS)
        axis = self._checkChoice("axis", axis.strip().lower() if isinstance(axis, str) else axis, AXES)
        registration = self._checkChoice(
            "registration", (registration or "none").strip().lower() if isinstance(registration, str) else registration,
            REGISTRATIONS)
        try:
            colourMode = check_colour_mode(colourMode)
        except ValueError as exc:  # 'unknown colour mode ...; choose one of yuv, saturated'
            raise LightFusionInputError(_oneLine(exc)) from None
        self._checkNodes(mriNode, otherNode, outputNode)
        expectedClass = expectedOutputClass(task, colormap)
        if outputNode is not None and outputNode.GetClassName() != expectedClass:
            raise LightFusionInputError(
                f"output volume {mrml.nodeLabel(outputNode)} is a {outputNode.GetClassName()}, but {task} fusion "
                f"gives a {'RGB' if expectedClass == mrml.VECTOR_CLASS else 'scalar'} volume "
                f"({expectedClass}): choose another output volume or let LightFusion create one")

        # Everything below reads the nodes into images first: the inputs are never written to.
        mriImage = mrml.imageFromVolumeNode(mriNode, "MRI")
        otherImage = mrml.imageFromVolumeNode(otherNode, "PET/SPECT/CT")
        mriToWorld = mrml.parentTransformToWorld(mriNode)
        scene = mriNode.GetScene()

        # This run's own cancel flag: a worker thread of a cancelled run still sees it after the next
        # run has started (self._cancelRequested is reset by every run).
        runCancelled = threading.Event()
        closeObserver = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: runCancelled.set())

        def cancelled() -> bool:
            if self._cancelRequested or bool(cancelCallback and cancelCallback()):
                runCancelled.set()
            return runCancelled.is_set()

        def status(stage: str, **info) -> None:
            logging.debug(f"LightFusion: stage {stage} {info}")
            if statusCallback is not None:
                statusCallback(stage, **info)

        def progress(done, total) -> None:
            if progressCallback is not None:
                progressCallback(done, total)

        try:
            if isinstance(backend, str):
                status("loading")
                backendObject = self._runInBackground(
                    "loading the model", lambda: self.getBackend(task, model, backend, device), cancelled, idleCallback)
            else:
                backendObject = resolve_backend(backend, None, task, device)
            logging.info(f"LightFusion: {task} fusion of {otherNode.GetName()} into {mriNode.GetName()} "
                         f"({axis}, {self.describeBackend(backendObject)}"
                         f"{', ' + registration + ' registration first' if registration != 'none' else ''})")

            levels = {"done": None, "shown": None}

            def registrationProgress(done, total) -> None:  # on the worker thread: no MRML, no Qt
                # Only recorded: the calling thread shows it. (Raising here to stop a cancelled
                # registration would make SimpleITK print a traceback from the worker thread; a
                # cancelled registration instead finishes its few seconds on its own and is dropped.)
                levels["done"] = (done, total)

            def showLevel() -> None:
                if levels["done"] is not None and levels["done"] != levels["shown"]:
                    levels["shown"] = levels["done"]
                    done, total = levels["done"]
                    status("registering", kind=registration, level=min(done + 1, total), levels=total)

            if registration != "none":
                status("registering", kind=registration, level=None, levels=None)
            else:
                status("preparing")
            pair = self._runInBackground(
                f"registering ({registration})" if registration != "none" else "preparing the volumes",
                lambda: prepare_pair(mriImage, otherImage, task, colormap, register=registration,
                                     register_progress=registrationProgress if registration != "none" else None),
                cancelled, idleCallback, onPoll=showLevel)
            self.lastWarnings = list(pair.warnings)  # the library logged each one (Python log); the panel shows them
            result = getattr(pair, "registration", None)
            if result is not None:
                status("registered", before=result.measure_before, after=result.measure_after)

            status("fusing")
            fused = fuse_prepared(pair, backendObject, axis, batchSize, progress, cancelled, colour_mode=colourMode)
            # A Cancel (or a scene close) seen while the last batch was reported still counts.
            if cancelled():
                raise FusionCancelled("cancelled after the last batch; nothing was added to the scene")
            if not scene.IsNodePresent(mriNode) or not scene.IsNodePresent(otherNode):
                raise FusionCancelled("an input volume was removed from the scene during the fusion")

            resultClass = mrml.outputClassForImage(fused)
            if outputNode is not None and outputNode.GetClassName() != resultClass:  # prediction was wrong
                raise LightFusionInputError(
                    f"output volume {mrml.nodeLabel(outputNode)} is a {outputNode.GetClassName()}, but the result "
                    f"needs a {resultClass}: choose another output volume or let LightFusion create one")
            if outputNode is not None and outputNode.GetScene() is None:
                raise LightFusionInputError("the output volume was removed from the scene during the fusion")

            # Output geometry: world grid of the result, expressed in the MRI's parent frame.
            ijkToRAS = mrml.ijkToRASFromImage(fused)
            if mriToWorld is not None:
                ijkToRAS = np.linalg.inv(mriToWorld) @ ijkToRAS
            created = outputNode is None
            node = outputNode
            transformNode = None
            try:
                if result is not None:
                    transformNode = mrml.transformNodeFromRegistration(
                        scene, pair.transform, otherNode, scene.GenerateUniqueName(transformName(otherNode, mriNode)))
                if created:
                    name = scene.GenerateUniqueName(fusedVolumeName(mriNode, otherNode))
                    node = scene.AddNewNodeByClass(resultClass, name)
                elif node.GetImageData() is None:
                    node.SetName(scene.GenerateUniqueName(fusedVolumeName(mriNode, otherNode)))
                mrml.updateVolumeNodeFromImage(node, fused, ijkToRAS)
                node.SetAndObserveTransformNodeID(mriNode.GetTransformNodeID())
                display.setupFusedDisplay(node)
                if transformNode is not None and applyTransformToOther:
                    otherNode.SetAndObserveTransformNodeID(transformNode.GetID())
            except Exception:
                if created and node is not None and scene.IsNodePresent(node):
                    scene.RemoveNode(node)
                if transformNode is not None and scene.IsNodePresent(transformNode):
                    scene.RemoveNode(transformNode)
                raise
        finally:
            scene.RemoveObserver(closeObserver)

        seconds = time.perf_counter() - started
        self.lastRun = {
            "seconds": seconds, "device": self.describeBackend(backendObject),
            "backend": getattr(backendObject, "name", str(backendObject)),
            "outputNodeID": node.GetID(), "mriNodeID": mriNode.GetID(), "otherNodeID": otherNode.GetID(),
            "task": task, "colormap": pair.colormap,
            "colourMode": colourMode if resultClass == mrml.VECTOR_CLASS else None,  # used for RGB results only
            "otherWindow": tuple(pair.other_window) if pair.other_window is not None else None,
            "warnings": list(self.lastWarnings), "registration": registration,
            "transformNodeID": transformNode.GetID() if transformNode is not None else None,
            "measureBefore": result.measure_before if result is not None else None,
            "measureAfter": result.measure_after if result is not None else None,
            "registrationSeconds": getattr(result, "seconds", None) if result is not None else None,
        }
        if result is not None:
            logging.info(f"LightFusion: transform {transformNode.GetName()} added "
                         f"({'the ' + otherNode.GetName() + ' volume put under it' if applyTransformToOther else 'inputs unchanged'})")
        logging.info(f"LightFusion: {node.GetName()} done in {seconds:.1f} s on {self.lastRun['device']}")
        return node

    # -- display ----------------------------------------------------------------------------------
    def _lastRunNodes(self, scene=None):
        import slicer

        scene = scene or slicer.mrmlScene
        run = self.lastRun or {}
        nodes = [scene.GetNodeByID(run[key]) if run.get(key) else None
                 for key in ("mriNodeID", "otherNodeID", "outputNodeID")]
        return scene, nodes

    def showFusion(self, scene=None) -> bool:
        """Show the last result (fused over its MRI, views linked; see :func:`display.showFusion`).
        False when it is no longer in the scene."""
        scene, (mri, _, fused) = self._lastRunNodes(scene)
        if fused is None:
            return False
        display.showFusion(scene, mri, fused)
        return True

    def showClassicOverlay(self, scene=None) -> str | None:
        """Show the last run's PET/SPECT/CT over its MRI the classic way (see
        :func:`display.showClassicOverlay`); returns the colour node ID used. Raises
        LightFusionInputError when there is no run or its volumes are gone."""
        scene, (mri, other, _) = self._lastRunNodes(scene)
        if mri is None or other is None:
            raise LightFusionInputError("run the fusion first: the classic overlay shows the volumes of the last run")
        run = self.lastRun
        return display.showClassicOverlay(scene, mri, other, get_task(run["task"]).functional, run.get("otherWindow"))

    # -- DICOM export -----------------------------------------------------------------------------
    def exportDicomSeries(self, fusedNode, mriNode, outputFolder: str | os.PathLike, sourceFiles=None,
                          task: str | None = None) -> Path:
        """Write ``fusedNode`` as a DICOM series derived from the MRI's series (its patient and study, a
        new series on the MRI's frame of reference; what ``lightfusion fuse --format dicom`` writes, by
        the same writer: :func:`LightFusionLib.dicom_write.write_dicom_series`) into the new folder
        ``outputFolder``, which a PACS viewer accepts.

        ``sourceFiles``: the MRI series' DICOM files (or their folder); default: looked up in Slicer's
        DICOM database from the node's ``DICOM.instanceUIDs`` attribute (set when the MRI was loaded
        through the DICOM module). Raises LightFusionInputError when the MRI did not come from DICOM,
        and the library's one-line errors for an unusable output folder.
        """
        from LightFusionLib.dicom_write import write_dicom_series

        if sourceFiles is None:
            uids = (mriNode.GetAttribute("DICOM.instanceUIDs") or "").split()
            database = getattr(__import__("slicer"), "dicomDatabase", None)
            if not uids or database is None:
                raise LightFusionInputError(
                    f"the MRI {mrml.nodeLabel(mriNode)} was not loaded from DICOM (no DICOM.instanceUIDs): a DICOM "
                    "series needs the MRI's patient and study; save the fused volume as NRRD or NIfTI instead")
            sourceFiles = [database.fileForInstance(uid) for uid in uids]
        # The node's own (local) geometry: the series lies on the MRI series' grid, as the node does
        # when it shares the MRI's parent transform.
        image = mrml.imageFromVolumeNode(fusedNode, "fused volume", world=False)
        return write_dicom_series(image, sourceFiles, outputFolder, task=task)

    # -- sample data ----------------------------------------------------------------------------
    def loadSampleData(self, scene=None, folder: str | os.PathLike | None = None):
        """Load the bundled sample MRI and PET/SPECT/CT volumes -> (mriNode, otherNode, task).

        The files (found in :func:`sampleDataDir` or ``folder``, see :func:`findSamplePair`) are loaded
        as Slicer loads files (:meth:`loadVolumeFile`): each node gets a storage node pointing at its
        file, so the scene can be saved. Nodes already in the scene under the same names are reused.
        """
        import slicer

        scene = scene or slicer.mrmlScene
        mriPath, otherPath, task = findSamplePair(Path(folder) if folder else sampleDataDir())
        nodes = []
        for path in (mriPath, otherPath):
            name = _stem(path)
            node = scene.GetFirstNodeByName(name)
            if node is None or node.GetClassName() not in (mrml.SCALAR_CLASS, mrml.VECTOR_CLASS):
                node = self.loadVolumeFile(path, scene, name)
            nodes.append(node)
        return nodes[0], nodes[1], task

    @staticmethod
    def loadVolumeFile(path: str | os.PathLike, scene=None, name: str | None = None):
        """Load a volume file into a new volume node, as Slicer loads files: with a storage node (the
        file's reader, so saving the scene writes or references it) and a display node.

        In Slicer: ``slicer.util.loadVolume`` (the IO manager, as drag-and-drop does), not shown in the
        views. Without the application (slicer-core): the Volumes module's logic
        (``vtkSlicerVolumesLogic.AddArchetypeVolume``, what Slicer's volume reader calls). Raises
        LightFusionInputError when the file cannot be read.
        """
        import slicer

        scene = scene or slicer.mrmlScene
        path = Path(path)
        name = name or _stem(path)
        if not path.is_file():
            raise LightFusionInputError(f"cannot read {path}: no such file")
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "coreIOManager") and scene is slicer.mrmlScene:
            try:
                return slicer.util.loadVolume(str(path), {"name": name, "show": False, "singleFile": True})
            except RuntimeError as exc:
                raise LightFusionInputError(f"cannot read {path}: {_oneLine(exc)}") from None
        volumesLogic = slicer.vtkSlicerVolumesLogic()
        volumesLogic.SetMRMLScene(scene)
        singleFile, autoWindowLevel = 1 << 2, 1 << 3  # AddArchetypeVolume's loadingOptions bits
        node = volumesLogic.AddArchetypeVolume(str(path), name, singleFile | autoWindowLevel)
        if node is None:
            raise LightFusionInputError(f"cannot read {path} as a volume")
        grey = "vtkMRMLColorTableNodeGrey"
        if node.GetDisplayNode() is not None and scene.GetNodeByID(grey) is not None \
                and node.GetClassName() == mrml.SCALAR_CLASS:
            node.GetDisplayNode().SetAndObserveColorNodeID(grey)
        return node

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _checkChoice(what: str, value, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise LightFusionInputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        return value

    @staticmethod
    def _resolveNode(node, role: str):
        if node is None:
            raise LightFusionInputError(f"no {role} volume given")
        if isinstance(node, str):
            import slicer

            scene = slicer.mrmlScene
            found = scene.GetNodeByID(node) or scene.GetFirstNodeByName(node)
            if found is None:
                raise LightFusionInputError(f"no node named {node!r} (the {role} volume) in the scene")
            return found
        return node

    @staticmethod
    def _checkNodes(mriNode, otherNode, outputNode) -> None:
        mrml.checkInputVolumeNode(mriNode, "MRI")
        mrml.checkInputVolumeNode(otherNode, "PET/SPECT/CT")
        if mriNode.GetClassName() != mrml.SCALAR_CLASS:
            raise LightFusionInputError(
                f"MRI volume {mrml.nodeLabel(mriNode)} must be a scalar volume, not a {mriNode.GetClassName()}")
        if mriNode is otherNode or (mriNode.GetID() and mriNode.GetID() == otherNode.GetID()):
            raise LightFusionInputError(
                f"the MRI and the PET/SPECT/CT volume are the same node {mrml.nodeLabel(mriNode)}; pick two volumes")
        scene = mriNode.GetScene()
        if scene is None:
            raise LightFusionInputError(f"MRI volume {mrml.nodeLabel(mriNode)} is not in a scene")
        if otherNode.GetScene() is not scene:
            raise LightFusionInputError("the MRI and the PET/SPECT/CT volume are in different scenes")
        if outputNode is not None:
            if outputNode is mriNode or outputNode is otherNode or outputNode.GetID() in (mriNode.GetID(), otherNode.GetID()):
                raise LightFusionInputError(
                    f"the output volume {mrml.nodeLabel(outputNode)} is one of the inputs; the inputs are never "
                    "overwritten: choose another output volume or let LightFusion create one")
            if outputNode.GetClassName() not in (mrml.SCALAR_CLASS, mrml.VECTOR_CLASS):
                raise LightFusionInputError(
                    f"output volume {mrml.nodeLabel(outputNode)} is a {outputNode.GetClassName()}; it must be a "
                    f"{mrml.SCALAR_CLASS} or {mrml.VECTOR_CLASS}")
            if outputNode.GetScene() is not scene:
                raise LightFusionInputError("the output volume is not in the inputs' scene")
