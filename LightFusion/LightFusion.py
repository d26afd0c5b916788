"""LightFusion: fuse co-registered PET/SPECT/CT volumes with MRI in 3D Slicer (LightFusionNet).

This file holds the Slicer-facing parts that need Qt: the module description, the parameter node,
the panel (``LightFusionWidget``) and the self-test (``LightFusionTest``). The computation lives in
the Qt-free package ``LightFusionSlicerLib`` (``LightFusionLogic``, re-exported here, and the MRML
bridge), so it can also run from the Python console and under pytest with the slicer-core wheel.

Parent transforms: a linear parent transform on an input is applied (as geometry, no resampling);
the fused volume is put under the MRI's parent transform. A non-linear transform is refused with a
message asking to harden it. Requires a Slicer whose Python is 3.10 or newer.
"""
import enum
import pathlib
import time
from typing import Optional, Union

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer without translation support
    def _(text):
        return text

from LightFusionLib.tasks import TASK_NAMES, get_task  # the one definition of the tasks (what is functional...)
from LightFusionSlicerLib import logic as _logic
from LightFusionSlicerLib.logic import LightFusionLogic  # noqa: F401  (Slicer looks it up here)

#
# LightFusion
#


class LightFusion(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LightFusion")
        self.parent.categories = [_("Multimodality")]
        self.parent.dependencies = []
        self.parent.contributors = ["LightFusion developers"]
        self.parent.helpText = _(
            "Fuses a co-registered PET, SPECT or CT volume with an MRI using LightFusionNet, a "
            "lightweight 2-D CNN (about 4,000 parameters) applied plane by plane. PET/SPECT results are "
            "RGB volumes (the functional colour over the MRI detail), CT results are scalar volumes; both "
            "lie on the MRI's voxel grid. Inputs are never modified.<br>"
            "Console: <code>import LightFusion; LightFusion.LightFusionLogic().process(getNode('MRI'), "
            "getNode('PET'))</code>")
        self.parent.acknowledgementText = _(
            "LightFusionNet: a dual-stream depthwise-separable CNN with Predictive Context Attention for "
            "medical image fusion. Trained on the Harvard Whole Brain Atlas image pairs.")


#
# Parameter node
#


def _choiceLabel(value: str) -> str:
    """Translated panel label of a choice value (one table for every choice below)."""
    return {
        "pet-mri": _("PET-MRI"), "spect-mri": _("SPECT-MRI"), "ct-mri": _("CT-MRI"), "custom": _("Custom model file"),
        "default": _("Task default"), "harvard-pet": _("Harvard PET"), "harvard-spect": _("Harvard SPECT"),
        "hot": _("Hot"), "jet": _("Jet"), "none": _("None (grayscale fusion)"),
        "axial": _("Axial"), "coronal": _("Coronal"), "sagittal": _("Sagittal"),
        "auto": _("Auto"), "torch": _("PyTorch"), "onnx": _("ONNX Runtime"), "cpu": _("CPU"), "cuda": _("CUDA GPU"),
    }.get(value) or get_task(value).label  # a task new to the library shows its own label until translated


class _LabelledChoice:
    """Mixin: ``label()`` for an enum member shown in a combo box."""

    def label(self) -> str:
        return _choiceLabel(self.value)


def _taskMembers() -> list[tuple[str, str]]:
    """(member name, value) of every task the library defines: 'pet-mri' -> ('PET_MRI', 'pet-mri')."""
    return [(name.upper().replace("-", "_"), name) for name in TASK_NAMES]


# The panel's task choices are made from the library's task list, never a copy of it.
ModelTask = enum.Enum("ModelTask", _taskMembers(), type=_LabelledChoice)
FusionTask = enum.Enum("FusionTask", _taskMembers() + [("CUSTOM", "custom")], type=_LabelledChoice)


class Colormap(_LabelledChoice, enum.Enum):
    # values are LightFusionLib.colormaps names; DEFAULT = the task's own map
    DEFAULT = "default"
    HARVARD_PET = "harvard-pet"
    HARVARD_SPECT = "harvard-spect"
    HOT = "hot"
    JET = "jet"
    NONE = "none"


class SliceAxis(_LabelledChoice, enum.Enum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


class Backend(_LabelledChoice, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNX = "onnx"


class Device(_LabelledChoice, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@parameterNodeWrapper
class LightFusionParameterNode:
    """Panel state, saved with the scene.

    mriVolume / otherVolume - the inputs; outputVolume - None means "create new volume".
    task - shipped model (or CUSTOM: modelPath, trained for modelTask).
    colormap - for scalar PET/SPECT; axis, backend, device - how the network runs.
    """

    mriVolume: vtkMRMLScalarVolumeNode
    otherVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    task: FusionTask = FusionTask.PET_MRI
    modelPath: pathlib.Path
    modelTask: ModelTask = ModelTask.PET_MRI
    colormap: Colormap = Colormap.DEFAULT
    axis: SliceAxis = SliceAxis.AXIAL
    backend: Backend = Backend.AUTO
    device: Device = Device.AUTO
    outputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]


def _modelPathOrNone(path) -> Optional[str]:
    text = str(path) if path is not None else ""
    return None if text in ("", ".") else text


def _pipEnsure():
    """Slicer's ``pip_ensure`` (``slicer.packaging`` from Slicer 5.10, ``slicer.pydeps`` in some builds),
    or None in a Slicer without it. It shows its own confirmation; it raises RuntimeError when the user
    declines and subprocess.CalledProcessError when pip fails."""
    import importlib

    for name in ("packaging", "pydeps"):
        module = getattr(slicer, name, None)
        if module is None:
            try:
                module = importlib.import_module(f"slicer.{name}")
            except Exception:  # absent (older Slicer, the slicer-core wheel) or broken: use the fallback
                continue
        ensure = getattr(module, "pip_ensure", None)
        if callable(ensure):
            return ensure
    return None


def _requirement(package: str):
    """``packaging`` Requirement for ``package`` (every pip_ensure version takes one), else the name."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return package
    return Requirement(package)


def _isDeclinedInstall(exc: BaseException) -> bool:
    """Whether an exception from an installer means "the user said no" rather than "it failed"."""
    return isinstance(exc, RuntimeError) and "declined" in str(exc).lower()


def _oneLine(exc: BaseException) -> str:
    """First non-empty line of the exception's message (its class name if it has none), at most 200 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


#
# LightFusionWidget
#


class LightFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. All computation is delegated to LightFusionLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._deviceInfo = None
        self._gpuName = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LightFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LightFusionLogic()

        self.ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.advancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdvancedCollapsed)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._running:
            self._cancelRequested = True
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(LightFusionParameterNode(self.logic.getParameterNode()))
        # Preselect inputs by name (MR/T1/T2 and PET/SPECT/CT) to save a few clicks.
        mri, other = _logic.guessInputs(slicer.mrmlScene)
        if not self._parameterNode.mriVolume and mri:
            self._parameterNode.mriVolume = mri
        if not self._parameterNode.otherVolume and other:
            self._parameterNode.otherVolume = other

    def setParameterNode(self, inputParameterNode: Optional[LightFusionParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
            self.labelCudaItem()
            self.updateGUIState()

    # -- GUI state ------------------------------------------------------------------------------
    def effectiveTask(self) -> str:
        p = self._parameterNode
        return p.modelTask.value if p.task == FusionTask.CUSTOM else p.task.value

    def colormapApplies(self) -> bool:
        """A colour map is used for a scalar PET/SPECT only (not CT, not an RGB volume)."""
        other = self._parameterNode.otherVolume
        otherIsRGB = bool(other and other.GetImageData()
                          and other.GetImageData().GetNumberOfScalarComponents() == 3)
        return get_task(self.effectiveTask()).functional and not otherIsRGB

    def updateGUIState(self, caller=None, event=None) -> None:
        """Show the rows that apply, and enable Apply when the inputs are complete."""
        p = self._parameterNode
        if p is None:
            return
        custom = p.task == FusionTask.CUSTOM
        for widget in (self.ui.modelPathLabel, self.ui.modelPathLineEdit, self.ui.modelTaskLabel,
                       self.ui.modelTaskComboBox):
            widget.setVisible(custom)
        showColormap = self.colormapApplies()
        self.ui.colormapLabel.setVisible(showColormap)
        self.ui.colormapComboBox.setVisible(showColormap)

        if self._running:
            return
        problem = None
        if not p.mriVolume:
            problem = _("Select an MRI volume.")
        elif not p.otherVolume:
            problem = _("Select a PET, SPECT or CT volume.")
        elif p.mriVolume == p.otherVolume:
            problem = _("The MRI and the PET/SPECT/CT volume must be two different volumes.")
        elif custom and not _modelPathOrNone(p.modelPath):
            problem = _("Choose a model file.")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Fuse the volumes.")

    def onAdvancedCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.updateDeviceInfo()

    def updateDeviceInfo(self) -> None:
        """Name the GPU (once: the first look imports torch, which takes a moment)."""
        if self._deviceInfo is None:
            if not _logic.isInstalled("torch"):
                self._deviceInfo = (_("PyTorch is not installed: CPU via ONNX Runtime only.")
                                    if _logic.isInstalled("onnxruntime")
                                    else _("Neither PyTorch nor ONNX Runtime is installed yet."))
            else:
                with slicer.util.WaitCursor():
                    self._gpuName = _logic.gpuName()
                self._deviceInfo = (_("CUDA GPU: {name}").format(name=self._gpuName) if self._gpuName
                                    else _("No CUDA GPU found: fusion runs on the CPU."))
        self.ui.deviceInfoLabel.text = self._deviceInfo
        self.labelCudaItem()

    def labelCudaItem(self) -> None:
        """Name the detected GPU in the device list ('CUDA GPU (NVIDIA ...)')."""
        combo = self.ui.deviceComboBox
        for index in range(combo.count):
            if combo.itemText(index).startswith(Device.CUDA.label()):
                text = Device.CUDA.label() + (f" ({self._gpuName})" if self._gpuName else "")
                combo.setItemText(index, text)

    # -- dependencies ---------------------------------------------------------------------------
    def ensureInferencePackage(self, backend: str) -> bool:
        """Offer to install what ``backend`` needs (never done at import). True when usable.

        A declined or failed install never escapes: it is logged, the status line says why the
        fusion did not run, and False is returned (the panel stays usable).
        """
        import importlib
        import logging

        package = _logic.missingPackage(backend)
        if package is None:
            return True
        try:
            declined = not self._installPackage(package)
        except Exception as exc:  # pip_ensure raises on a decline (RuntimeError) and on a failure
            declined = _isDeclinedInstall(exc)
            if not declined:
                reason = _oneLine(exc)
                logging.error(f"LightFusion: installing {package} failed: {reason}")
                self.ui.statusLabel.text = _("Not run: installing {package} failed: {reason}").format(
                    package=package, reason=reason)
                return False
        finally:
            importlib.invalidate_caches()
            self._deviceInfo = None
        if declined:
            logging.warning(f"LightFusion: installing {package} was declined; the fusion did not run")
            self.ui.statusLabel.text = _("Not run: installing {package} was declined.").format(package=package)
            return False
        if not _logic.isInstalled(package):
            logging.warning(f"LightFusion: {package} is still not importable after the install")
            self.ui.statusLabel.text = _("Not run: {package} is not installed (if it was just installed, restart "
                                         "Slicer).").format(package=package)
            return False
        return True

    def _installPackage(self, package: str) -> bool:
        """Ask, then install ``package``. False when the user declines; raises when the install fails."""
        if package == "torch":
            try:
                import PyTorchUtils  # the PyTorch extension's installer picks the right CUDA/CPU wheel
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                # None when the user declines; raises when pip / light-the-torch fails
                return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None
            message = _("LightFusion needs PyTorch (or ONNX Runtime, a smaller CPU-only alternative) to run "
                        "the network, and neither is installed.\n\nInstall PyTorch now with pip? This "
                        "downloads several hundred MB. (Installing the PyTorch extension from the Extensions "
                        "Manager instead picks the build that matches your GPU.)")
        else:
            message = _("The ONNX Runtime backend needs the 'onnxruntime' Python package.\n\nInstall it now "
                        "with pip?")
        pipEnsure = _pipEnsure()
        if pipEnsure is not None:  # asks itself; raises RuntimeError when declined
            pipEnsure([_requirement(package)], requester="LightFusion")
            return True
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("LightFusion")):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(package)
        return True

    # -- actions --------------------------------------------------------------------------------
    def onLoadSampleButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            mri, other, task = self.logic.loadSampleData()
            self._parameterNode.mriVolume = mri
            self._parameterNode.otherVolume = other
            self._parameterNode.task = FusionTask(task)
            slicer.util.setSliceViewerLayers(background=mri, foreground=other, foregroundOpacity=0.5, fit=True)

    def onApplyButton(self) -> None:
        """Apply runs the fusion; while it runs the same button cancels it."""
        if self._running:
            self._cancelRequested = True  # also honoured if the fusion has not started yet
            self.logic.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        p = self._parameterNode
        self.ui.statusLabel.toolTip = ""  # the previous run's warnings
        if not self.ensureInferencePackage(p.backend.value):  # it has said why in the status line
            return
        from LightFusionLib.errors import FusionCancelled

        self.setRunning(True)
        started = time.perf_counter()
        try:
            with slicer.util.tryWithErrorDisplay(_("LightFusion failed."), waitCursor=False):
                try:
                    self.ui.statusLabel.text = _("Loading the model...")
                    slicer.app.processEvents()
                    colormap = (p.colormap.value if self.colormapApplies() and p.colormap != Colormap.DEFAULT
                                else None)
                    custom = p.task == FusionTask.CUSTOM
                    outputNode = self.logic.process(
                        p.mriVolume, p.otherVolume, p.outputVolume, task=self.effectiveTask(),
                        axis=p.axis.value, device=p.device.value, colormap=colormap,
                        progressCallback=self.onProgress, backend=p.backend.value,
                        model=_modelPathOrNone(p.modelPath) if custom else None,
                        cancelCallback=lambda: self._cancelRequested)
                except FusionCancelled:
                    self.ui.statusLabel.text = _("Cancelled after {s:.1f} s; nothing was changed.").format(
                        s=time.perf_counter() - started)
                    return
                self.showResult(outputNode)
        finally:
            self.setRunning(False)

    def onProgress(self, done: int, total: int) -> None:
        if self.ui.progressBar.maximum != total:
            self.ui.progressBar.maximum = total
            self.ui.statusLabel.text = _("Fusing...")
        self.ui.progressBar.value = done
        slicer.app.processEvents()  # keeps the panel responsive and lets Cancel through

    def setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        for widget in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton,
                       self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self.ui.progressBar.maximum = 0  # busy indicator until the first batch reports
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop after the current batch.") if running else _("Fuse the volumes.")
        self.ui.applyButton.enabled = True
        if not running:
            self.updateGUIState()

    def showResult(self, outputNode) -> None:
        """Status line (and the main window's status bar): time and device, then the first input warning
        of the run, if any (all of them are in the Python log and in the status line's tooltip)."""
        slicer.util.setSliceViewerLayers(background=outputNode, foreground=None, fit=True)
        run = self.logic.lastRun or {}
        message = _("{name}: fused in {s:.1f} s on {device}.").format(
            name=outputNode.GetName(), s=run.get("seconds", 0.0), device=run.get("device", "?"))
        warnings = list(run.get("warnings", self.logic.lastWarnings) or [])
        if warnings:
            message += " " + _("Warning: {warning}").format(warning=warnings[0])
            if len(warnings) > 1:
                message += " " + _("(+{n} more in the Python log)").format(n=len(warnings) - 1)
        self.ui.statusLabel.text = message
        self.ui.statusLabel.toolTip = "\n".join(warnings)
        slicer.util.showStatusMessage(message, 30000 if warnings else 10000)


#
# LightFusionTest
#


class LightFusionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): sample volumes -> logic -> checked output."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LightFusion_sample_fusion()
        self.setUp()
        self.test_LightFusion_cancel_and_errors()

    def _loadSamples(self):
        missing = _logic.missingPackage("auto")
        self.assertIsNone(missing, f"install {missing} (or ONNX Runtime) in Slicer before running this test")
        mri, other, task = LightFusionLogic().loadSampleData()
        self.assertEqual(mri.GetClassName(), "vtkMRMLScalarVolumeNode")
        return mri, other, task

    def test_LightFusion_sample_fusion(self):
        import numpy as np

        from LightFusionSlicerLib import mrml

        self.delayDisplay("Loading the bundled sample volumes")
        mri, other, task = self._loadSamples()
        mriBefore = slicer.util.arrayFromVolume(mri).copy()
        otherBefore = slicer.util.arrayFromVolume(other).copy()

        self.delayDisplay(f"Fusing ({task}) on the CPU")
        logic = LightFusionLogic()
        steps = []
        output = logic.process(mri, other, task=task, device="cpu",
                               progressCallback=lambda done, total: steps.append((done, total)))

        expectedClass = _logic.expectedOutputClass(task, None)  # scalar for a non-functional task (CT)
        self.assertEqual(output.GetClassName(), expectedClass)
        self.assertEqual(output.GetName(), f"{mri.GetName()}_{other.GetName()}_fused")
        self.assertEqual(output.GetImageData().GetDimensions(), mri.GetImageData().GetDimensions())
        self.assertTrue(np.allclose(mrml.ijkToRAS(output), mrml.ijkToRAS(mri), atol=1e-6))
        values = slicer.util.arrayFromVolume(output)
        if expectedClass == "vtkMRMLVectorVolumeNode":
            self.assertEqual(values.dtype, np.uint8)
            self.assertEqual(values.shape[-1], 3)
        self.assertGreater(float(values.max()), 0.0)
        self.assertTrue(np.isfinite(values.astype(np.float64)).all())
        self.assertTrue(steps and steps[-1][0] == steps[-1][1])
        self.assertEqual(logic.lastRun["warnings"], logic.lastWarnings)  # the panel shows these
        # inputs untouched
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(mri), mriBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(other), otherBefore))
        slicer.util.setSliceViewerLayers(background=output, fit=True)
        self.delayDisplay("Sample fusion passed")

    def test_LightFusion_cancel_and_errors(self):
        from LightFusionLib.errors import FusionCancelled

        mri, other, task = self._loadSamples()
        logic = LightFusionLogic()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(FusionCancelled):
            logic.process(mri, other, task=task, device="cpu", progressCallback=lambda done, total: logic.cancel())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        with self.assertRaises(ValueError):
            logic.process(mri, mri, task=task)
        with self.assertRaises(ValueError):
            logic.process(None, other, task=task)
        self.delayDisplay("Cancel and error handling passed")
