"""LightFusionLogic: fuse two MRML volume nodes with LightFusionLib, without Qt.

Console use (inside Slicer)::

    import LightFusion
    fused = LightFusion.LightFusionLogic().process(getNode("MRI"), getNode("PET"))

Rules (see also :mod:`LightFusionSlicerLib.mrml`):

- the inputs are only read; the result is a new volume node (or the given ``outputNode``) on the MRI
  grid: ``vtkMRMLVectorVolumeNode`` for an RGB result (PET/SPECT), ``vtkMRMLScalarVolumeNode``
  for a scalar one (CT, or colour map ``"none"``);
- a new node is named ``<MRI>_<other>_fused`` (made unique); a given output node keeps its name,
  unless it is still empty (as made by a "Create new volume" selector entry);
- nothing is added to or changed in the scene until the fusion has succeeded: a cancelled or failed
  run leaves no half-made node behind and a given output node untouched;
- linear parent transforms of the inputs are applied (geometry only); the output is put under the
  MRI's parent transform with the MRI's own (local) geometry, so it overlays the MRI exactly;
  non-linear parent transforms are refused with a message that says how to harden them.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from LightFusionLib.backends import BACKENDS, DEVICES  # the library's lists of choices, never copies
from LightFusionLib.geometry import AXES
from LightFusionLib.tasks import TASK_NAMES as TASKS
from LightFusionLib.tasks import get_task

from . import mrml

try:  # inside Slicer: the usual base class (gives getParameterNode(), moduleName...)
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic as _LogicBase
except ImportError:  # slicer-core wheel / plain Python: the base class needs Qt, which is absent
    class _LogicBase:  # type: ignore[no-redef]
        def __init__(self, parent=None) -> None:
            self.parent = parent
            self.moduleName = "LightFusion"



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


def missingPackage(backend: str = "auto") -> str | None:
    """The package to install before fusing with ``backend``, or None.

    'auto' needs torch or onnxruntime (torch is suggested: it also runs the .pt models and CUDA);
    'torch' needs torch; 'onnx' needs onnxruntime.
    """
    if backend == "torch":
        return None if isInstalled("torch") else "torch"
    if backend == "onnx":
        return None if isInstalled("onnxruntime") else "onnxruntime"
    return None if (isInstalled("torch") or isInstalled("onnxruntime")) else "torch"


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


def guessInputs(scene) -> tuple[object | None, object | None]:
    """(MRI, PET/SPECT/CT) volume nodes of ``scene`` guessed from their names, for preselection:
    a scalar volume with a word starting with 'mr', 't1' or 't2', and a scalar or RGB volume with a
    word starting with 'pet', 'spect' or 'ct'. Either may be None."""
    mri = other = None
    for className in (mrml.SCALAR_CLASS, mrml.VECTOR_CLASS):
        for index in range(scene.GetNumberOfNodesByClass(className)):
            node = scene.GetNthNodeByClass(index, className)
            if node.GetClassName() != className:  # label maps and other subclasses
                continue
            words = [w for w in re.split(r"[^a-z0-9]+", (node.GetName() or "").lower()) if w]
            if other is None and any(w.startswith(k) for w in words for k, _ in _TASK_OF_NAME):
                other = node
            elif (mri is None and className == mrml.SCALAR_CLASS
                  and any(w.startswith(k) for w in words for k in _MRI_WORDS)):
                mri = node
    return mri, other


def fusedVolumeName(mriNode, otherNode) -> str:
    return f"{mriNode.GetName()}_{otherNode.GetName()}_fused"


def expectedOutputClass(task: str, colormap: str | None) -> str:
    """Node class the fusion will produce (LightFusionLib.fusion's rule): scalar for CT-MRI and for
    colour map 'none' (grayscale fusion, also of an RGB input's luma), RGB vector otherwise."""
    if not get_task(task).functional or (colormap or "").strip().lower() == "none":
        return mrml.SCALAR_CLASS
    return mrml.VECTOR_CLASS


class LightFusionLogic(_LogicBase):
    """Computation of the LightFusion module; usable without the widget (console, tests, scripts).

    Attributes after a successful :meth:`process`: ``lastRun`` = dict(seconds, device, backend,
    outputNodeID, warnings); ``lastWarnings``: the input warnings of the last run (also logged), one
    line each, e.g. a pair that looks misaligned or swapped.
    """

    def __init__(self, parent=None) -> None:
        _LogicBase.__init__(self, parent)
        self._backends: dict[tuple, object] = {}
        self._cancelRequested = False
        self.lastRun: dict | None = None
        self.lastWarnings: list[str] = []  # input warnings of the last process() (suspicious but usable input)

    # -- cancellation ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask a running :meth:`process` to stop at the next batch (it raises FusionCancelled)."""
        self._cancelRequested = True

    # -- backends -------------------------------------------------------------------------------
    def getBackend(self, task: str, model: str | os.PathLike | None = None, backend: str = "auto",
                   device: str = "auto"):
        """A LightFusionLib backend for ``task`` (shipped model) or the model file ``model``, cached
        per (model, task, backend, device, model file time) so repeated runs do not reload it."""
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

    # -- main entry point -----------------------------------------------------------------------
    def process(self, mriNode, otherNode, outputNode=None, task: str = "pet-mri", axis: str = "axial",
                device: str = "auto", colormap: str | None = None, progressCallback=None, *,
                model: str | os.PathLike | None = None, backend="auto", batchSize: int | None = None,
                cancelCallback=None):
        """Fuse ``otherNode`` (PET/SPECT/CT, scalar or RGB) into ``mriNode`` (scalar MRI).

        :param mriNode, otherNode: volume nodes, or node names/IDs.
        :param outputNode: volume node to overwrite, or None to create one (see the module docstring).
        :param task: 'pet-mri', 'spect-mri' or 'ct-mri' (the model used, and the kind of ``otherNode``).
        :param axis: slicing axis of the 2-D network: 'axial', 'coronal' or 'sagittal'.
        :param device: 'auto', 'cpu' or 'cuda'.
        :param colormap: colour map for a scalar PET/SPECT; None = the task's default; 'none' = grayscale.
        :param progressCallback: called as ``progressCallback(done, total)`` between batches.
        :param model: a model file (.pt or .onnx) trained for ``task`` instead of the shipped one.
        :param backend: 'auto', 'torch', 'onnx', or a backend object from LightFusionLib.load_backend.
        :param batchSize: planes per batch (None: the backend's preferred size).
        :param cancelCallback: returns True to stop; :meth:`cancel` does the same.
        :returns: the output volume node.
        :raises LightFusionInputError / VolumeNodeError / LightFusionLib errors (ValueError) for
            unusable input; FusionCancelled when cancelled.
        """
        from LightFusionLib.fusion import fuse_prepared, prepare_pair, resolve_backend

        started = time.perf_counter()
        self.lastWarnings = []
        self._cancelRequested = False  # a Cancel pressed while the model loads still counts
        mriNode = self._resolveNode(mriNode, "MRI")
        otherNode = self._resolveNode(otherNode, "PET/SPECT/CT")
        task = self._checkChoice("task", task.strip().lower() if isinstance(task, str) else task, TASKS)
        axis = self._checkChoice("axis", axis.strip().lower() if isinstance(axis, str) else axis, AXES)
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

        backendObject = (resolve_backend(backend, None, task, device) if not isinstance(backend, str)
                         else self.getBackend(task, model, backend, device))

        def cancelled() -> bool:
            return self._cancelRequested or bool(cancelCallback and cancelCallback())

        def progress(done, total) -> None:
            if progressCallback is not None:
                progressCallback(done, total)

        logging.info(f"LightFusion: {task} fusion of {otherNode.GetName()} into {mriNode.GetName()} "
                     f"({axis}, {self.describeBackend(backendObject)})")
        pair = prepare_pair(mriImage, otherImage, task, colormap)
        self.lastWarnings = list(pair.warnings)  # the library logged each one (Python log); the panel shows them
        fused = fuse_prepared(pair, backendObject, axis, batchSize, progress, cancelled)

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
        scene = mriNode.GetScene()
        created = outputNode is None
        node = outputNode
        try:
            if created:
                name = scene.GenerateUniqueName(fusedVolumeName(mriNode, otherNode))
                node = scene.AddNewNodeByClass(resultClass, name)
            elif node.GetImageData() is None:
                node.SetName(scene.GenerateUniqueName(fusedVolumeName(mriNode, otherNode)))
            mrml.updateVolumeNodeFromImage(node, fused, ijkToRAS)
            node.SetAndObserveTransformNodeID(mriNode.GetTransformNodeID())
            self._setupDisplay(node)
        except Exception:
            if created and node is not None:
                scene.RemoveNode(node)
            raise

        seconds = time.perf_counter() - started
        self.lastRun = {"seconds": seconds, "device": self.describeBackend(backendObject),
                        "backend": getattr(backendObject, "name", str(backendObject)),
                        "outputNodeID": node.GetID(), "warnings": list(self.lastWarnings)}
        logging.info(f"LightFusion: {node.GetName()} done in {seconds:.1f} s on {self.lastRun['device']}")
        return node

    # -- sample data ----------------------------------------------------------------------------
    def loadSampleData(self, scene=None, folder: str | os.PathLike | None = None):
        """Load the bundled sample MRI and PET/SPECT/CT volumes -> (mriNode, otherNode, task).

        Files are read with SimpleITK (so this also works without the Slicer application) from
        :func:`sampleDataDir` (see :func:`findSamplePair` for how the two files are recognised).
        Nodes already in the scene under the same names are reused.
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
        """Read a volume file with SimpleITK into a new scalar (or RGB vector) volume node."""
        import SimpleITK as sitk
        import slicer

        scene = scene or slicer.mrmlScene
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise LightFusionInputError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        node = scene.AddNewNodeByClass(mrml.outputClassForImage(image), name or _stem(Path(path)))
        mrml.updateVolumeNodeFromImage(node, image)
        node.CreateDefaultDisplayNodes()
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

    @staticmethod
    def _setupDisplay(node) -> None:
        """Display nodes; for a scalar result a window/level spanning its 0.5-99.5 percentiles."""
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is None or node.GetClassName() != mrml.SCALAR_CLASS:
            return
        voxels = mrml.voxelArray(node).ravel()
        voxels = voxels[:: max(1, voxels.size // 2_000_000)]  # percentiles of a subsample: fast on big volumes
        low, high = (float(v) for v in np.percentile(voxels, [0.5, 99.5]))
        if high <= low:
            low, high = float(voxels.min()), float(voxels.max())
        if high > low:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(low, high)
