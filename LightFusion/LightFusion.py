"""LightFusion: fuse PET/SPECT/CT volumes with MRI in 3D Slicer (LightFusionNet).

This file holds the Slicer-facing parts that need Qt: the module description, the sample data
registration, the parameter node, the panel (``LightFusionWidget``) and the self-test
(``LightFusionTest``). The computation lives in the Qt-free package ``LightFusionSlicerLib``
(``LightFusionLogic``, the MRML bridge, the slice-view display), so it can also run from the Python
console and under pytest with the slicer-core wheel.

Parent transforms: a linear parent transform on an input is applied (as geometry, no resampling);
the fused volume is put under the MRI's parent transform. A non-linear transform is refused with a
message asking to harden it. "Register first" (rigid / affine) adds the transform it finds to the
scene as a transform node. Requires a Slicer whose Python is 3.10 or newer.
"""
import enum
import logging
import os
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
    from slicer.i18n import translate
except ImportError:  # Slicer without translation support
    def _(text):
        return text

    def translate(context, text):
        return text

import LightFusionSlicerLib
from LightFusionLib.tasks import TASK_NAMES, get_task  # the one definition of the tasks (what is functional...)
from LightFusionSlicerLib import logic as _logic

# The homepage of the extension (CMakeLists.txt's EXTENSION_HOMEPAGE) and the README section on Slicer.
HOMEPAGE = "https://github.com/LightFusion/SlicerLightFusion"
DOCUMENTATION_URL = HOMEPAGE + "#use-in-3d-slicer"

#
# LightFusion
#


class LightFusion(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LightFusion")
        # The category is one of Slicer's own, translated in Slicer's context so that a localised Slicer
        # shows a single "Multimodality" folder (the Slicer script template does the same).
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Multimodality")]
        self.parent.dependencies = []
        self.parent.contributors = ["LightFusion maintainers (LightFusion project)"]
        self.parent.helpText = _(
            "Fuses a PET, SPECT or CT volume with an MRI using LightFusionNet, a lightweight 2-D CNN (about "
            "4,000 parameters) applied plane by plane. PET/SPECT results are RGB volumes (the functional colour "
            "over the MRI detail), CT results are scalar volumes; both lie on the MRI's voxel grid and are shown "
            "over the MRI (fade with the slice views' opacity slider). <i>Register first</i> aligns volumes that "
            "are not co-registered (rigid or affine). Inputs are never modified.<br>"
            "Try it with <i>Load sample data</i> (also in the Sample Data module, category LightFusion).<br>"
            "Console: <code>import LightFusion; LightFusion.LightFusionLogic().process(getNode('MRI'), "
            "getNode('PET'))</code>") + "<br>" + _(
            'See the <a href="{url}">LightFusion documentation</a> (first run, sample data, display, backends).'
        ).format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "LightFusionNet is the method of A. Sagar (Vrije Universiteit Brussel): a lightweight dual-stream "
            "network with Predictive Context Attention for medical image fusion. The shipped models were trained "
            "on image pairs of the Harvard Whole Brain Atlas (K. A. Johnson, J. A. Becker). The sample data derive "
            "from the MNI ICBM152 2009a template (V. Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre, "
            "Montreal Neurological Institute). LightFusion is a research tool, not a medical device.")

        # Additional initialization step after application startup is complete (the script template's
        # pattern): the sample pair appears in the Sample Data module.
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data (Sample Data module, category "LightFusion")
#


def registerSampleData():
    """Add the bundled sample pair to the Sample Data module (category "LightFusion"); returns its
    sample name, or None when the bundled files are missing (a warning is logged).

    The files are shipped inside the extension, so the source's URIs are ``file://`` URIs of them,
    and its ``customDownloader`` (:func:`downloadSample`) loads them where they are, as Slicer loads
    files: the nodes get storage nodes, and the scene can be saved. (The Sample Data module's own
    download path copies files into its cache and removes the storage nodes after loading.)
    Registering again (module reload) replaces the earlier entry instead of adding a second one.
    """
    import SampleData

    try:
        source = _logic.sampleDataSource()
    except _logic.LightFusionInputError as exc:
        logging.warning(f"LightFusion: sample data not registered: {exc}")
        return None
    registered = SampleData.SampleDataLogic.sampleDataSourcesByCategory(source["category"])
    registered[:] = [s for s in registered if s.sampleName != source["sampleName"]]
    thumbnail = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "LightFusionSampleData.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        **source, thumbnailFileName=thumbnail if os.path.isfile(thumbnail) else None,
        customDownloader=downloadSample)
    return source["sampleName"]


def downloadSample(source):
    """The registered source's ``customDownloader`` (the Sample Data module's button, and the panel's
    *Load sample data*): load its files into the scene with storage nodes, show the pair in the slice
    views (PET over MRI) and return (mriNode, otherNode, task)."""
    mri, other, task = LightFusionLogic().loadSampleData(folder=_logic.sampleFolderFromSource(source))
    slicer.util.setSliceViewerLayers(background=mri, foreground=other, foregroundOpacity=0.5, fit=True)
    return mri, other, task


def registeredSampleSource():
    """The Sample Data module's LightFusion source, as registered at startup (registered now if it is
    not there yet, e.g. in a Slicer started without the main window)."""
    import SampleData

    for attempt in range(2):
        for source in SampleData.SampleDataLogic.sampleDataSourcesByCategory(_logic.SAMPLE_CATEGORY):
            if source.sampleName.startswith("LightFusion") and source.customDownloader is not None:
                return source
        if attempt == 0 and registerSampleData() is None:
            break
    raise _logic.LightFusionInputError(
        f"no sample data in {_logic.sampleDataDir()} (expected files such as mni152-t1.nrrd and "
        "mni152-fdg-pet-sim.nrrd)")


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
        "auto": _("Auto"), "torch": _("PyTorch"), "onnx": _("ONNX Runtime"), "openvino": _("OpenVINO"), "cpu": _("CPU"), "cuda": _("CUDA GPU"),
        "rigid": _("Rigid"), "affine": _("Affine"),
        "yuv": _("Plain YUV (paper)"), "saturated": _("Keep saturation"),
    }.get(value) or (get_task(value).label if value in TASK_NAMES  # a new task shows its own label until translated
                     else value)  # so does any other new choice of the library (its name)


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


class _RegistrationChoice(_LabelledChoice):
    def label(self) -> str:
        return _("None (already aligned)") if self.value == "none" else _choiceLabel(self.value)


# "Register first": none, then the library's registration kinds (LightFusionLib.registration.KINDS).
Registration = enum.Enum("Registration", [(kind.upper(), kind) for kind in _logic.REGISTRATIONS],
                         type=_RegistrationChoice)


class Colormap(_LabelledChoice, enum.Enum):
    # values are LightFusionLib.colormaps names; DEFAULT = the task's own map
    DEFAULT = "default"
    HARVARD_PET = "harvard-pet"
    HARVARD_SPECT = "harvard-spect"
    HOT = "hot"
    JET = "jet"
    NONE = "none"


# PET/SPECT colour restoration: the library's modes (LightFusionLib.colour.COLOUR_MODES), never a copy of them.
ColourMode = enum.Enum("ColourMode", [(mode.upper(), mode) for mode in _logic.COLOUR_MODES], type=_LabelledChoice)


class SliceAxis(_LabelledChoice, enum.Enum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"


# Inference backends: the library's (LightFusionLib.backends.BACKENDS), never a copy of them.
Backend = enum.Enum("Backend", [(name.upper(), name) for name in _logic.BACKENDS], type=_LabelledChoice)


class Device(_LabelledChoice, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@parameterNodeWrapper
class LightFusionParameterNode:
    """Panel state, saved with the scene.

    mriVolume / otherVolume - the inputs; outputVolume - None means "create new volume".
    task - shipped model (or CUSTOM: modelPath, trained for modelTask).
    colormap - for scalar PET/SPECT; colourMode - how an RGB (PET/SPECT) result is coloured;
    axis, backend, device - how the network runs.
    registration - register the other volume to the MRI first (NONE: they are aligned already);
    transformOther - then also put the other volume under the transform found.
    """

    mriVolume: vtkMRMLScalarVolumeNode
    otherVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    task: FusionTask = FusionTask.PET_MRI
    modelPath: pathlib.Path
    modelTask: ModelTask = ModelTask.PET_MRI
    colormap: Colormap = Colormap.DEFAULT
    colourMode: ColourMode = ColourMode(_logic.DEFAULT_COLOUR_MODE)
    registration: Registration = Registration.NONE
    transformOther: bool = False
    axis: SliceAxis = SliceAxis.AXIAL
    backend: Backend = Backend.AUTO
    device: Device = Device.AUTO
    outputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]


#
# LightFusionLogic
#


class LightFusionLogic(_logic.LightFusionLogic):
    """The module's logic: ``LightFusionSlicerLib.logic.LightFusionLogic`` (all the computation, Qt-free)
    with the parameter node returned wrapped, as the Slicer script template's logic does."""

    def getParameterNode(self):
        return LightFusionParameterNode(super().getParameterNode())


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


def _requirements(package: str) -> list:
    """What to ask pip_ensure for ``package``: its line in Resources/requirements.txt (read with
    ``slicer.packaging.load_requirements`` when Slicer has it), as ``packaging`` Requirements."""
    line = _logic.requirementFor(package)
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return [line]
    loader = getattr(getattr(slicer, "packaging", None), "load_requirements", None)
    if callable(loader) and line != package:
        try:
            found = [r for r in loader(str(_logic.requirementsPath())) if r.name.lower() == package.lower()]
            if found:
                return found
        except Exception:  # an older slicer.packaging: parse the line ourselves
            pass
    return [Requirement(line)]


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
        self.ui.overlayButton.enabled = False
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.overlayButton.connect("toggled(bool)", self.onOverlayToggled)
        self.ui.advancedCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdvancedCollapsed)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onReload(self) -> None:
        """Developer mode's Reload: also pick up edits in LightFusionSlicerLib and LightFusionLib (their
        modules are dropped first, so that re-executing this file imports them again), as SlicerNNUnet
        does for its package."""
        forgotten = LightFusionSlicerLib.reloadPackages()
        logging.info(f"LightFusion: reloading {len(forgotten)} modules of {', '.join(LightFusionSlicerLib.RELOADED_PACKAGES)}")
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        if self._running:  # the logic also sees the close (it observes the scene) and adds nothing
            self._cancelRequested = True
            self.logic.cancel()
        self.ui.overlayButton.enabled = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        """The template's: the logic's (wrapped) parameter node, with inputs preselected by name (MR/T1/T2
        and PET/SPECT/CT) in empty selectors, but never a volume the user has already had there: a
        selection the user cleared stays cleared when the module is entered again."""
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        mri, other = _logic.inputsToPreselect(slicer.mrmlScene, p.parameterNode, p.mriVolume, p.otherVolume)
        if mri is not None:
            p.mriVolume = mri
        if other is not None:
            p.otherVolume = other

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

    def colourModeApplies(self) -> bool:
        """The colour restoration is used where the result is RGB: a PET/SPECT that is RGB, or scalar with
        a colour map other than 'none' (not CT, not a grayscale fusion)."""
        if not get_task(self.effectiveTask()).functional:
            return False
        return not self.colormapApplies() or self._parameterNode.colormap != Colormap.NONE

    def updateGUIState(self, caller=None, event=None) -> None:
        """Show the rows that apply, and enable Apply when the inputs are complete."""
        p = self._parameterNode
        if p is None:
            return
        # what the user has selected counts as seen: clearing it later is not undone on enter()
        _logic.rememberSelection(p.parameterNode, p.mriVolume, p.otherVolume)
        custom = p.task == FusionTask.CUSTOM
        for widget in (self.ui.modelPathLabel, self.ui.modelPathLineEdit, self.ui.modelTaskLabel,
                       self.ui.modelTaskComboBox):
            widget.setVisible(custom)
        showColormap = self.colormapApplies()
        self.ui.colormapLabel.setVisible(showColormap)
        self.ui.colormapComboBox.setVisible(showColormap)
        showColourMode = self.colourModeApplies()
        self.ui.colourModeLabel.setVisible(showColourMode)
        self.ui.colourModeComboBox.setVisible(showColourMode)
        self.ui.transformOtherCheckBox.setVisible(p.registration != Registration.NONE)

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
        """Ask, then install ``package``. False when the user declines; raises when the install fails.

        PyTorch (asked for with the PyTorch backend): the PyTorch extension's installer when present (it
        picks the wheel matching the GPU). Otherwise the line of Resources/requirements.txt (ONNX Runtime),
        with ``slicer.packaging.pip_ensure`` on Slicer 5.10+ (it asks itself), else a confirmation and
        ``slicer.util.pip_install``."""
        if package == "torch":
            try:
                import PyTorchUtils  # the PyTorch extension's installer picks the right CUDA/CPU wheel
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                # None when the user declines; raises when pip / light-the-torch fails
                return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None
            message = _("The PyTorch backend needs PyTorch, which is not installed.\n\nInstall PyTorch now with "
                        "pip? This downloads several hundred MB. (Installing the PyTorch extension from the "
                        "Extensions Manager instead picks the build that matches your GPU; the ONNX Runtime "
                        "backend is a much smaller CPU-only alternative.)")
        else:
            message = _("LightFusion runs its network with ONNX Runtime (the '{requirement}' Python package), "
                        "which is not installed.\n\nInstall it now with pip?").format(
                requirement=_logic.requirementFor(package))
        pipEnsure = _pipEnsure()
        if pipEnsure is not None:  # asks itself; raises RuntimeError when declined
            pipEnsure(_requirements(package), requester="LightFusion")
            return True
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("LightFusion")):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(_logic.requirementFor(package))
        return True

    # -- actions --------------------------------------------------------------------------------
    def onLoadSampleButton(self) -> None:
        """Load the sample pair through its Sample Data registration (the same source and loader as the
        Sample Data module's button) and select it."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            source = registeredSampleSource()
            mri, other, task = source.customDownloader(source)
            self._parameterNode.mriVolume = mri
            self._parameterNode.otherVolume = other
            self._parameterNode.task = FusionTask(task)
            self.ui.statusLabel.text = _("Sample data loaded: {mri} and {other}. Press Apply.").format(
                mri=mri.GetName(), other=other.GetName())

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
                    colormap = (p.colormap.value if self.colormapApplies() and p.colormap != Colormap.DEFAULT
                                else None)
                    colourMode = p.colourMode.value if self.colourModeApplies() else None
                    custom = p.task == FusionTask.CUSTOM
                    outputNode = self.logic.process(
                        p.mriVolume, p.otherVolume, p.outputVolume, task=self.effectiveTask(),
                        axis=p.axis.value, device=p.device.value, colormap=colormap,
                        progressCallback=self.onProgress, backend=p.backend.value,
                        model=_modelPathOrNone(p.modelPath) if custom else None,
                        cancelCallback=lambda: self._cancelRequested,
                        registration=p.registration.value, applyTransformToOther=p.transformOther,
                        statusCallback=self.onStage, idleCallback=slicer.app.processEvents,
                        colourMode=colourMode)
                except FusionCancelled:
                    self.ui.statusLabel.text = _("Cancelled after {s:.1f} s; nothing was changed.").format(
                        s=time.perf_counter() - started)
                    return
                self.showResult(outputNode)
        finally:
            self.setRunning(False)

    def onStage(self, stage: str, **info) -> None:
        """The logic's stage reports, in the status line."""
        if stage == "loading":
            text = _("Loading the model...")
        elif stage == "preparing":
            text = _("Preparing the volumes...")
        elif stage == "registering":
            kind = Registration(info["kind"]).label()
            text = (_("Registering ({kind}): level {level} of {levels}...").format(
                kind=kind, level=info["level"], levels=info["levels"])
                    if info.get("level") else _("Registering ({kind})...").format(kind=kind))
        elif stage == "registered":
            text = _("Registered: alignment measure {before:.3f} -> {after:.3f}.").format(**info)
        else:
            text = _("Fusing...")
        self.ui.statusLabel.text = text

    def onProgress(self, done: int, total: int) -> None:
        if self.ui.progressBar.maximum != total:
            self.ui.progressBar.maximum = total
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
        self.ui.applyButton.toolTip = _("Stop now (nothing is added to the scene).") if running else _("Fuse the volumes.")
        self.ui.applyButton.enabled = True
        if not running:
            self.updateGUIState()

    def colormapDescription(self, run: dict) -> Optional[str]:
        """'Colour map: Harvard PET (PET window 0-8.2)' for a run that coloured a scalar PET/SPECT."""
        name = run.get("colormap")
        valid = {c.value for c in Colormap} - {"default", "none"}
        if name not in valid:
            return None
        text = _("Colour map: {name}").format(name=Colormap(name).label())
        window = run.get("otherWindow")
        if window:
            text += " " + _("({modality} window {low:.4g} to {high:.4g})").format(
                modality=get_task(run["task"]).modality, low=window[0], high=window[1])
        return text

    def colourModeDescription(self, run: dict) -> Optional[str]:
        """'Colours: Keep saturation' for a run whose result is RGB (the colour restoration used)."""
        mode = run.get("colourMode")
        if mode not in {m.value for m in ColourMode}:
            return None
        return _("Colours: {name}").format(name=ColourMode(mode).label())

    def showResult(self, outputNode) -> None:
        """Show the fused volume over the MRI in every (linked) slice view, and say in the status line
        (and the main window's status bar): time and device, the colour map of a scalar PET/SPECT and the
        colour restoration of an RGB result, the registration's alignment measure, then the first input
        warning of the run, if any (all of them are in the Python log and in the status line's tooltip)."""
        run = self.logic.lastRun or {}
        self.ui.overlayButton.checked = False
        self.logic.showFusion()
        slicer.util.setSliceViewerLayers(fit=True)  # layers set above; fit every view to them
        message = _("{name}: fused in {s:.1f} s on {device}.").format(
            name=outputNode.GetName(), s=run.get("seconds", 0.0), device=run.get("device", "?"))
        for colours in (self.colormapDescription(run), self.colourModeDescription(run)):
            if colours:
                message += " " + colours + "."
        if run.get("transformNodeID"):
            transform = slicer.mrmlScene.GetNodeByID(run["transformNodeID"])
            message += " " + _("{kind} registration: alignment measure {before:.3f} -> {after:.3f} (higher is "
                               "better); transform \"{name}\" added.").format(
                kind=Registration(run["registration"]).label(), before=run["measureBefore"],
                after=run["measureAfter"], name=transform.GetName() if transform else "?")
        warnings = list(run.get("warnings", self.logic.lastWarnings) or [])
        if warnings:
            message += " " + _("Warning: {warning}").format(warning=warnings[0])
            if len(warnings) > 1:
                message += " " + _("(+{n} more in the Python log)").format(n=len(warnings) - 1)
        self.ui.statusLabel.text = message
        self.ui.statusLabel.toolTip = "\n".join(warnings)
        self.ui.overlayButton.enabled = True
        slicer.util.showStatusMessage(message, 30000 if warnings else 10000)

    def onOverlayToggled(self, checked: bool) -> None:
        """Checked: the classic overlay (PET over MRI at 50% with Slicer's PET-Heat colours); unchecked:
        the fused volume again."""
        with slicer.util.tryWithErrorDisplay(_("Cannot show the classic overlay."), waitCursor=False):
            if not checked:
                self.logic.showFusion()
                return
            colorNodeID = self.logic.showClassicOverlay()
            run = self.logic.lastRun or {}
            other = slicer.mrmlScene.GetNodeByID(run.get("otherNodeID") or "")
            colors = slicer.mrmlScene.GetNodeByID(colorNodeID) if colorNodeID else None
            text = _("Classic overlay: {other} over the MRI at 50% opacity").format(
                other=other.GetName() if other else "?")
            if colors is not None:
                text += " " + _("with Slicer's {colors} colour table").format(colors=colors.GetName())
            if run.get("transformNodeID") and other is not None and \
                    other.GetTransformNodeID() != run["transformNodeID"]:
                text += ", " + _("as it lies (not under the registration transform)")
            self.ui.statusLabel.text = text + ". " + _("Press the button again for the fused volume.")


#
# LightFusionTest
#


class _StandInBackend:
    """For the self-test where neither ONNX Runtime nor PyTorch is installed (as on the build
    factory): fused luma = mean of the two inputs. It exercises everything around the network."""

    name, device, preferred_batch = "stand-in", "cpu", 8

    def __init__(self, task: str) -> None:
        self.task = task
        self.calls = 0

    def __call__(self, mri, other):
        self.calls += 1
        return (mri + other) / 2

    def describe(self) -> str:
        return "stand-in mean on cpu"


class LightFusionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest) and passes without ONNX Runtime or PyTorch (the
    extensions build factory has neither): sample data through the Sample Data registration, parameter
    node, geometry and transform helpers, the whole pipeline with a stand-in network, cancel, errors.
    The real network runs when a backend is installed; otherwise that part is skipped with a logged
    reason."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LightFusion_sample_data()
        self.setUp()
        self.test_LightFusion_parameter_node()
        self.setUp()
        self.test_LightFusion_geometry_and_transforms()
        self.setUp()
        self.test_LightFusion_pipeline_cancel_and_errors()
        self.setUp()
        self.test_LightFusion_inference()

    def _loadSamples(self):
        source = registeredSampleSource()
        mri, other, task = source.customDownloader(source)
        self.assertEqual(mri.GetClassName(), "vtkMRMLScalarVolumeNode")
        return mri, other, task

    def test_LightFusion_sample_data(self):
        import SampleData

        self.delayDisplay("Sample data: registered in the Sample Data module, loaded with storage nodes")
        name = registerSampleData()
        self.assertIsNotNone(name, "the bundled sample data is missing")
        names = [s.sampleName for s in SampleData.SampleDataLogic.sampleDataSourcesByCategory(_logic.SAMPLE_CATEGORY)]
        self.assertEqual(names.count(name), 1)
        registerSampleData()  # again (as after a reload): still one entry
        names = [s.sampleName for s in SampleData.SampleDataLogic.sampleDataSourcesByCategory(_logic.SAMPLE_CATEGORY)]
        self.assertEqual(names.count(name), 1)
        mri, other, task = self._loadSamples()
        self.assertIn(task, TASK_NAMES)
        for node in (mri, other):
            storage = node.GetStorageNode()
            self.assertIsNotNone(storage, f"{node.GetName()} has no storage node")
            self.assertTrue(os.path.isfile(storage.GetFileName()), storage.GetFileName())
        self.assertEqual(self._loadSamples()[:2], (mri, other))  # loaded once, then reused
        self.delayDisplay("Sample data passed")

    def test_LightFusion_parameter_node(self):
        self.delayDisplay("Parameter node: wrapped, defaults, preselection that respects a cleared selection")
        logic = LightFusionLogic()
        p = logic.getParameterNode()
        self.assertIsInstance(p, LightFusionParameterNode)
        self.assertEqual((p.task, p.colormap, p.colourMode, p.registration, p.transformOther, p.axis, p.backend,
                          p.device),
                         (FusionTask.PET_MRI, Colormap.DEFAULT, ColourMode(_logic.DEFAULT_COLOUR_MODE),
                          Registration.NONE, False, SliceAxis.AXIAL, Backend.AUTO, Device.AUTO))
        self.assertIs(logic.getParameterNode().parameterNode, p.parameterNode)  # one parameter node per scene
        mri, other, _task = self._loadSamples()
        self.assertEqual(_logic.inputsToPreselect(slicer.mrmlScene, p.parameterNode, p.mriVolume, p.otherVolume),
                         (mri, other))
        p.mriVolume, p.otherVolume = mri, other
        p.mriVolume = None  # the user clears the MRI selection
        self.assertEqual(_logic.inputsToPreselect(slicer.mrmlScene, p.parameterNode, p.mriVolume, p.otherVolume),
                         (None, None))
        p.registration = Registration.RIGID
        self.assertEqual(logic.getParameterNode().registration, Registration.RIGID)
        self.delayDisplay("Parameter node passed")

    def test_LightFusion_geometry_and_transforms(self):
        import numpy as np
        import SimpleITK as sitk

        from LightFusionSlicerLib import mrml

        self.delayDisplay("Geometry: MRML node <-> SimpleITK image; registration transform -> transform node")
        matrix = np.array([[0.0, -1.2, 0.1, 10.0], [0.9, 0.0, 0.0, -20.0], [0.0, 0.05, 2.5, 5.0], [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), matrix,
                                              name="geometry test")
        image = mrml.imageFromVolumeNode(node)
        self.assertTrue(np.allclose(mrml.ijkToRASFromImage(image), mrml.ijkToRAS(node), atol=1e-9))
        ras = matrix @ np.array([5.0, 4.0, 3.0, 1.0])
        self.assertTrue(np.allclose(image.TransformIndexToPhysicalPoint((5, 4, 3)), (-ras[0], -ras[1], ras[2])))

        euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -6.0, 2.5))
        transformNode = mrml.transformNodeFromRegistration(slicer.mrmlScene, euler, node, "test_transform")
        toParent = mrml.transformToParentMatrix(transformNode)
        for point in ((0.0, 0.0, 0.0), (30.0, -12.0, 55.0)):
            mriPoint = (toParent @ np.array([*point, 1.0]))[:3]  # other -> MRI, RAS
            back = euler.TransformPoint((-mriPoint[0], -mriPoint[1], mriPoint[2]))  # MRI -> other, LPS
            self.assertTrue(np.allclose(back, (-point[0], -point[1], point[2]), atol=1e-6))
        self.delayDisplay("Geometry passed")

    def test_LightFusion_pipeline_cancel_and_errors(self):
        import numpy as np

        from LightFusionLib.errors import FusionCancelled

        self.delayDisplay("Pipeline with a stand-in network: output, display, cancel, errors")
        mri, other, task = self._loadSamples()
        mriBefore = slicer.util.arrayFromVolume(mri).copy()
        otherBefore = slicer.util.arrayFromVolume(other).copy()
        logic = LightFusionLogic()
        stages = []
        output = logic.process(mri, other, task=task, backend=_StandInBackend(task),
                               statusCallback=lambda stage, **info: stages.append(stage))
        self.assertEqual(output.GetClassName(), _logic.expectedOutputClass(task, None))
        self.assertEqual(output.GetImageData().GetDimensions(), mri.GetImageData().GetDimensions())
        self.assertTrue(np.allclose(_logic.mrml.ijkToRAS(output), _logic.mrml.ijkToRAS(mri), atol=1e-6))
        self.assertEqual(stages[-1], "fusing")
        rgb = output.GetClassName() == "vtkMRMLVectorVolumeNode"
        self.assertEqual(logic.lastRun["colourMode"], _logic.DEFAULT_COLOUR_MODE if rgb else None)
        self.assertTrue(logic.showFusion())
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            self.assertEqual((composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()),
                             (mri.GetID(), output.GetID()))
            self.assertEqual(composite.GetForegroundOpacity(), 1.0)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(mri), mriBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(other), otherBefore))

        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(FusionCancelled):
            logic.process(mri, other, task=task, backend=_StandInBackend(task),
                          progressCallback=lambda done, total: logic.cancel())
        with self.assertRaises(FusionCancelled):  # Cancel during the last (here: only) batch
            logic.process(mri, other, task=task, backend=_StandInBackend(task), batchSize=100000,
                          progressCallback=lambda done, total: logic.cancel())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        with self.assertRaises(ValueError):
            logic.process(mri, mri, task=task, backend=_StandInBackend(task))
        with self.assertRaises(ValueError):
            logic.process(None, other, task=task, backend=_StandInBackend(task))
        with self.assertRaises(ValueError):
            logic.process(mri, other, task=task, backend=_StandInBackend(task), registration="elastic")
        with self.assertRaises(ValueError):
            logic.process(mri, other, task=task, backend=_StandInBackend(task), colourMode="vivid")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Pipeline, cancel and errors passed")

    def test_LightFusion_inference(self):
        import numpy as np

        missing = _logic.missingPackage("auto")
        if missing is not None:
            reason = (f"LightFusionTest: the inference test is skipped: neither ONNX Runtime nor PyTorch is installed "
                      f"(install {_logic.requirementFor(missing)} to run it)")
            logging.info(reason)
            self.delayDisplay(reason)
            return
        self.delayDisplay("Fusing the sample data with the shipped model on the CPU")
        mri, other, task = self._loadSamples()
        logic = LightFusionLogic()
        steps = []
        output = logic.process(mri, other, task=task, device="cpu",
                               progressCallback=lambda done, total: steps.append((done, total)))
        expectedClass = _logic.expectedOutputClass(task, None)  # scalar for a non-functional task (CT)
        self.assertEqual(output.GetClassName(), expectedClass)
        self.assertEqual(output.GetName(), f"{mri.GetName()}_{other.GetName()}_fused")
        values = slicer.util.arrayFromVolume(output)
        if expectedClass == "vtkMRMLVectorVolumeNode":
            self.assertEqual(values.dtype, np.uint8)
            self.assertEqual(values.shape[-1], 3)
        self.assertGreater(float(values.max()), 0.0)
        self.assertTrue(steps and steps[-1][0] == steps[-1][1])
        self.assertEqual(logic.lastRun["warnings"], logic.lastWarnings)  # the panel shows these
        logic.showFusion()
        self.delayDisplay("Sample fusion passed")
