"""Static wiring of the LightFusion Slicer module (no Slicer, no Qt needed).

- the .ui file: every widget the module code names exists with the expected class; every
  parameter-node field has exactly one widget (``SlicerParameterName``) of a class that
  parameterNodeWrapper's connectGui can bind to its type; node selectors get the scene;
- the panel's choices match LightFusionLib (tasks, axes, backends, devices, colour maps);
- CMake lists every module script and resource, and the layout LightFusionLib relies on;
- LightFusionSlicerLib stays Qt-free;
- the module compares no task names by hand (LightFusionLib.tasks defines them);
- the panel's behaviour (Apply -> Cancel while running, progress, status line with the run's input
  warnings, cancel, errors, install offer declined or failed, GPU name) with stand-in widgets around
  the real logic and a real MRML scene.

``LightFusion.py`` itself imports qt/ctk/slicer.ScriptedLoadableModule, which only exist inside
Slicer: it is parsed with ``ast`` and, for the type checks, imported with minimal stand-ins for
those modules (and the real ``slicer`` wheel when installed).
"""
from __future__ import annotations

import ast
import enum
import importlib
import pathlib
import re
import sys
import types
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LightFusion"
MODULE_PY = MODULE_DIR / "LightFusion.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LightFusion.ui"
for _path in (REPO, MODULE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Widgets the module code uses and the class each must have in the .ui.
EXPECTED_WIDGETS = {
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "outputsCollapsibleButton": "ctkCollapsibleButton",
    "mriSelector": "qMRMLNodeComboBox",
    "otherSelector": "qMRMLNodeComboBox",
    "outputSelector": "qMRMLNodeComboBox",
    "taskComboBox": "QComboBox",
    "modelTaskComboBox": "QComboBox",
    "colormapComboBox": "QComboBox",
    "axisComboBox": "QComboBox",
    "backendComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "modelPathLabel": "QLabel",
    "modelTaskLabel": "QLabel",
    "colormapLabel": "QLabel",
    "deviceInfoLabel": "QLabel",
    "statusLabel": "QLabel",
    "applyButton": "QPushButton",
    "loadSampleButton": "QPushButton",
    "progressBar": "QProgressBar",
}
# Signals the module connects to, per widget class (Qt / CTK API).
KNOWN_SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "ctkCollapsibleButton": {"contentsCollapsed(bool)", "clicked(bool)"},
}
QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QProgressBar", "QCheckBox", "QLineEdit"}


# --------------------------------------------------------------------------------------------------
# parsing helpers

def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def dynamic_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop.findtext("string")
    return None


def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


def ui_references(tree: ast.AST) -> set[str]:
    """Names X in ``self.ui.X`` anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_fields(tree: ast.Module) -> dict[str, ast.expr]:
    """Annotated fields of the @parameterNodeWrapper class: name -> annotation AST."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in LightFusion.py")


def cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in {path}"
    return [item for item in match.group(1).split() if not item.startswith("#")]


# --------------------------------------------------------------------------------------------------
# .ui <-> code

def test_ui_file_is_well_formed_designer_xml():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "LightFusion"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "LightFusion"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert used - QT_CLASSES <= declared, f"custom widgets not declared: {used - QT_CLASSES - declared}"


def test_every_widget_the_code_names_exists_with_the_expected_class():
    widgets = ui_widgets()
    referenced = ui_references(module_tree())
    assert referenced, "LightFusion.py names no self.ui widgets?"
    unknown = referenced - set(EXPECTED_WIDGETS)
    assert not unknown, f"add the expected class of {unknown} to EXPECTED_WIDGETS"
    for name in referenced:
        assert name in widgets, f"self.ui.{name} is not in {UI_FILE.name}"
        assert widgets[name].get("class") == EXPECTED_WIDGETS[name], name


def test_connected_signals_exist_on_the_widget_classes():
    widgets = ui_widgets()
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui"):
            widget = node.func.value.attr
            signal = node.args[0].value
            cls = widgets[widget].get("class")
            assert signal in KNOWN_SIGNALS.get(cls, set()), f"{widget} ({cls}) has no signal {signal}"


def test_every_parameter_has_one_widget_and_every_bound_widget_a_parameter():
    fields = parameter_fields(module_tree())
    bound: dict[str, list[str]] = {}
    for name, widget in ui_widgets().items():
        parameter = dynamic_property(widget, "SlicerParameterName")
        if parameter is not None:
            bound.setdefault(parameter, []).append(name)
    assert set(bound) == set(fields), (f"fields without widget: {set(fields) - set(bound)}; "
                                       f"widgets bound to no field: {set(bound) - set(fields)}")
    for parameter, names in bound.items():
        assert len(names) == 1, f"{parameter} is bound to several widgets: {names}"


def test_node_selectors_receive_the_scene():
    root = ET.parse(UI_FILE).getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == "LightFusion"}
    assert selectors and selectors <= connected, f"selectors without the scene: {selectors - connected}"


def test_output_selector_offers_create_new_and_both_volume_kinds():
    widget = ui_widgets()["outputSelector"]
    props = {p.get("name"): p for p in widget.findall("property")}
    assert props["noneEnabled"].findtext("bool") == "true"
    assert props["noneDisplay"].findtext("string") == "Create new volume"
    types_ = [s.text for s in props["nodeTypes"].iter("string")]
    assert types_ == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]


# --------------------------------------------------------------------------------------------------
# module structure

def test_module_defines_the_slicer_classes_and_the_self_test_runs_all_its_tests():
    tree = module_tree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in ("LightFusion", "LightFusionWidget", "LightFusionTest", "LightFusionParameterNode"):
        assert name in classes, name
    bases = {n: [ast.unparse(b) for b in c.bases] for n, c in classes.items()}
    assert bases["LightFusion"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in bases["LightFusionWidget"]
    assert bases["LightFusionTest"] == ["ScriptedLoadableModuleTest"]
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "LightFusionLogic" in imported  # Slicer looks the logic up in the module's namespace
    test_methods = {f.name for f in classes["LightFusionTest"].body
                    if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    run_test = next(f for f in classes["LightFusionTest"].body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert test_methods and test_methods <= called, f"runTest skips {test_methods - called}"
    widget = ast.unparse(classes["LightFusionWidget"])
    assert "slicer.util.loadUI(self.resourcePath('UI/LightFusion.ui'))" in widget
    assert "slicer.util.tryWithErrorDisplay(" in widget and ".connectGui(self.ui)" in widget


def test_module_compares_no_task_names_by_hand():
    """Task properties come from LightFusionLib.tasks (get_task(task).functional...), never from
    comparing task strings (``task == "ct-mri"``) in the module."""
    from LightFusionLib.tasks import TASK_NAMES

    for path in (MODULE_PY, *(MODULE_DIR / "LightFusionSlicerLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                names = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in TASK_NAMES]
                assert not names, f"{path.name}:{node.lineno} compares task names by hand: {ast.unparse(node)}"


def test_qt_free_package_imports_no_gui_modules():
    for path in (MODULE_DIR / "LightFusionSlicerLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not modules & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"
        uses_app = any(isinstance(n, ast.Attribute) and n.attr == "app" and isinstance(n.value, ast.Name)
                       and n.value.id == "slicer" for n in ast.walk(tree))
        assert not uses_app, f"{path.name} uses slicer.app"


def test_no_helper_script_at_the_module_top_level():
    # Slicer loads every *.py at the top of a scripted-module folder as a module of its own.
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["LightFusion.py"]


# --------------------------------------------------------------------------------------------------
# CMake

def test_module_cmake_lists_every_script_and_resource():
    cmake = MODULE_DIR / "CMakeLists.txt"
    scripts = [s.replace("${MODULE_NAME}", "LightFusion") for s in cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "LightFusion") for s in cmake_list(cmake, "MODULE_PYTHON_RESOURCES")]
    on_disk = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    files = sorted(str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == files
    text = cmake.read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # the library goes to qt-scripted-modules/LightFusionLib, shared resources to qt-scripted-modules/Resources
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/LightFusionLib" in text
    assert "Resources/Models/*.pt" in text and "Resources/SampleData/" in text


def test_extension_cmake_has_the_metadata_and_the_module():
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable} ", text), variable
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LightFusion)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line
    assert "project(LightFusion)" in text


def test_icon_is_a_128px_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "LightFusion.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# --------------------------------------------------------------------------------------------------
# the module imported with stand-ins for the Slicer-only modules: typed checks

@pytest.fixture(scope="module")
def module():
    """Import LightFusion.py with minimal qt/ctk/ScriptedLoadableModule/parameterNodeWrapper stand-ins."""
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    if not hasattr(slicer, "vtkMRMLScalarVolumeNode"):
        pytest.skip("slicer-core wheel expected")

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    stubs = {
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
        "slicer.i18n": types.ModuleType("slicer.i18n"),
    }
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleLogic"):
        setattr(stubs["slicer.ScriptedLoadableModule"], name, type(name, (_Base,), {}))
    stubs["slicer.parameterNodeWrapper"].parameterNodeWrapper = lambda cls: cls
    stubs["slicer.i18n"].tr = lambda text: text
    saved = {name: sys.modules.get(name) for name in [*stubs, "LightFusion", "LightFusionSlicerLib.logic"]}
    package = importlib.import_module("LightFusionSlicerLib")
    saved_attribute = getattr(package, "logic", None)
    sys.modules.update(stubs)
    sys.modules.pop("LightFusion", None)
    sys.modules.pop("LightFusionSlicerLib.logic", None)  # re-import so its base class is the stand-in
    try:
        yield importlib.import_module("LightFusion")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        if saved_attribute is not None:
            package.logic = saved_attribute


def _connectable(widget_class: str, hint) -> bool:
    """Whether parameterNodeWrapper has a connector for (widget class, type hint); see Slicer's
    parameterNodeWrapper guiConnectors (QComboBox<->Enum, qMRMLNodeComboBox<->node or Union of nodes,
    ctkPathLineEdit<->pathlib.Path...)."""
    import slicer

    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _connectable(widget_class, typing.get_args(hint)[0])
    if origin is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return widget_class == "qMRMLNodeComboBox" and all(issubclass(a, slicer.vtkMRMLNode) for a in members)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return widget_class == "QComboBox"
    if isinstance(hint, type) and issubclass(hint, slicer.vtkMRMLNode):
        return widget_class == "qMRMLNodeComboBox"
    if hint in (pathlib.Path, pathlib.PurePath):
        return widget_class in ("ctkPathLineEdit", "ctkDirectoryButton")
    return {bool: {"QCheckBox"}, int: {"QSpinBox", "QSlider"}, float: {"QDoubleSpinBox", "ctkSliderWidget"},
            str: {"QLineEdit", "QTextEdit"}}.get(hint, set()) >= {widget_class}


def test_parameter_types_are_bindable_to_their_widgets(module):
    hints = typing.get_type_hints(module.LightFusionParameterNode, include_extras=True)
    assert set(hints) == set(parameter_fields(module_tree()))
    by_parameter = {dynamic_property(w, "SlicerParameterName"): w.get("class") for w in ui_widgets().values()}
    for name, hint in hints.items():
        assert _connectable(by_parameter[name], hint), f"{name}: {hint} cannot bind to {by_parameter[name]}"


def test_enum_choices_match_the_library(module):
    from LightFusionLib import backends
    from LightFusionLib.tasks import TASK_NAMES, get_task
    from LightFusionSlicerLib import logic

    # the parameter node needs enums; they must list LightFusionLib.tasks' tasks, in its order
    assert tuple(t.value for t in module.ModelTask) == TASK_NAMES == logic.TASKS
    assert tuple(t.value for t in module.FusionTask) == (*TASK_NAMES, "custom")
    for member in module.ModelTask:  # the (translatable) panel label is the library's label
        assert member.label() == get_task(member.value).label
    assert tuple(a.value for a in module.SliceAxis) == logic.AXES
    assert tuple(b.value for b in module.Backend) == backends.BACKENDS == logic.BACKENDS
    assert tuple(d.value for d in module.Device) == backends.DEVICES == logic.DEVICES
    for enum_class in (module.FusionTask, module.ModelTask, module.Colormap, module.SliceAxis, module.Backend,
                       module.Device):
        labels = [member.label() for member in enum_class]
        assert all(labels) and len(set(labels)) == len(labels), enum_class
    try:
        colormaps = importlib.import_module("LightFusionLib.colormaps")
    except ImportError:
        pytest.skip("LightFusionLib.colormaps not available")
    assert {c.value for c in module.Colormap} == set(colormaps.COLORMAPS) | {colormaps.NONE, "default"}


def test_defaults_and_helpers(module):
    fields = {f: getattr(module.LightFusionParameterNode, f, None) for f in ("task", "colormap", "axis", "backend",
                                                                             "device")}
    assert fields == {"task": module.FusionTask.PET_MRI, "colormap": module.Colormap.DEFAULT,
                      "axis": module.SliceAxis.AXIAL, "backend": module.Backend.AUTO, "device": module.Device.AUTO}
    assert module._modelPathOrNone(pathlib.Path()) is None
    assert module._modelPathOrNone(None) is None
    assert module._modelPathOrNone(pathlib.Path("/models/my.pt")) == "/models/my.pt"
    assert module.LightFusionLogic.__name__ == "LightFusionLogic"


# --------------------------------------------------------------------------------------------------
# panel behaviour with stand-in widgets (real scene, real logic, fake Qt widgets and slicer.app)

class FakeWidget:
    """Just the widget API LightFusionWidget uses."""

    def __init__(self, items=()):
        self.enabled, self.visible, self.text, self.toolTip = True, True, "", ""
        self.value, self.maximum = 0, 100
        self.items = list(items)

    def setVisible(self, visible):
        self.visible = visible

    def connect(self, signal, slot):
        pass

    @property
    def count(self):
        return len(self.items)

    def itemText(self, index):
        return self.items[index]

    def setItemText(self, index, text):
        self.items[index] = text


class FakeApp:
    def __init__(self):
        self.on_process_events = None

    def processEvents(self):
        if self.on_process_events:
            self.on_process_events()

    def testingEnabled(self):
        return True

    def layoutManager(self):
        return None


@pytest.fixture
def panel(module, monkeypatch):
    slicer = pytest.importorskip("slicer")
    try:
        volume = importlib.import_module("LightFusionLib.fusion")
    except ImportError:
        pytest.skip("LightFusionLib.fusion not available")
    import numpy as np

    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    app = FakeApp()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *a, **k: True)

    widget = module.LightFusionWidget()
    widget.ui = types.SimpleNamespace(**{name: FakeWidget() for name in EXPECTED_WIDGETS})
    widget.ui.deviceComboBox.items = [d.label() for d in module.Device]
    widget.logic = module.LightFusionLogic()

    class MeanBackend:
        name, device, task, preferred_batch = "fake", "cpu", "pet-mri", 2

        def __call__(self, mri, other):
            return (mri + other) / 2

        def describe(self):
            return "fake on cpu"

    monkeypatch.setattr(widget.logic, "getBackend", lambda *a, **k: MeanBackend())
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (6, 8, 7)], indexing="ij")
    values = 100 * np.exp(-(i ** 2 + j ** 2 + k ** 2)) + np.linspace(0, 1, 6 * 8 * 7).reshape(6, 8, 7)
    mri = slicer.util.addVolumeFromArray(values.astype(np.float32), np.diag([1.0, 1.2, 2.0, 1.0]), name="MRI")
    pet = slicer.util.addVolumeFromArray(values[::-1].astype(np.float32), np.diag([1.0, 1.2, 2.0, 1.0]), name="PET")
    widget._parameterNode = types.SimpleNamespace(
        mriVolume=mri, otherVolume=pet, task=module.FusionTask.PET_MRI, modelPath=pathlib.Path(),
        modelTask=module.ModelTask.PET_MRI, colormap=module.Colormap.DEFAULT, axis=module.SliceAxis.AXIAL,
        backend=module.Backend.AUTO, device=module.Device.CPU, outputVolume=None)
    monkeypatch.setattr(module._logic, "missingPackage", lambda backend="auto": None)
    return types.SimpleNamespace(widget=widget, ui=widget.ui, p=widget._parameterNode, scene=scene, app=app,
                                 volume=volume, module=module)


def test_panel_enables_apply_only_for_complete_inputs(panel):
    ui, p, widget, module = panel.ui, panel.p, panel.widget, panel.module
    widget.updateGUIState()
    assert ui.applyButton.enabled and ui.colormapComboBox.visible and not ui.modelPathLineEdit.visible
    p.otherVolume = p.mriVolume
    widget.updateGUIState()
    assert not ui.applyButton.enabled and "two different" in ui.applyButton.toolTip
    p.otherVolume = None
    widget.updateGUIState()
    assert not ui.applyButton.enabled and "PET, SPECT or CT" in ui.applyButton.toolTip
    p.otherVolume = panel.scene.GetFirstNodeByName("PET")
    p.task = module.FusionTask.CUSTOM
    widget.updateGUIState()
    assert ui.modelPathLineEdit.visible and ui.modelTaskComboBox.visible
    assert not ui.applyButton.enabled and "model file" in ui.applyButton.toolTip
    p.modelPath, p.modelTask = pathlib.Path("/models/mine.onnx"), module.ModelTask.CT_MRI
    widget.updateGUIState()
    assert ui.applyButton.enabled and not ui.colormapComboBox.visible  # CT: no colour map


def test_panel_apply_runs_shows_progress_and_reports_time_and_device(panel):
    ui, widget = panel.ui, panel.widget
    seen = []
    panel.app.on_process_events = lambda: seen.append((ui.applyButton.text, ui.progressBar.visible,
                                                       ui.progressBar.value, ui.progressBar.maximum,
                                                       ui.inputsCollapsibleButton.enabled))
    count = panel.scene.GetNumberOfNodes()
    widget.onApplyButton()
    assert seen and all(text == "Cancel" and visible and not enabled for text, visible, _, _, enabled in seen)
    assert seen[-1][2:4] == (6, 6)  # 6 axial planes done of 6
    assert "fused in" in ui.statusLabel.text and "fake on cpu" in ui.statusLabel.text
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled and not ui.progressBar.visible
    assert ui.inputsCollapsibleButton.enabled
    assert panel.scene.GetNumberOfNodes() > count
    assert panel.scene.GetFirstNodeByName("MRI_PET_fused").GetClassName() == "vtkMRMLVectorVolumeNode"


@pytest.mark.parametrize("when", ["while the model loads", "between batches"])
def test_panel_cancel_button_stops_the_run_and_changes_nothing(panel, when):
    ui, widget = panel.ui, panel.widget
    clicks = []

    def user_clicks_cancel():
        started = ui.progressBar.value > 0
        if not clicks and ui.applyButton.text == "Cancel" and started == (when == "between batches"):
            clicks.append(1)
            widget.onApplyButton()  # the same button, now labelled Cancel

    panel.app.on_process_events = user_clicks_cancel
    count = panel.scene.GetNumberOfNodes()
    widget.onApplyButton()
    assert clicks and "Cancelled" in ui.statusLabel.text and "nothing was changed" in ui.statusLabel.text
    assert panel.scene.GetNumberOfNodes() == count
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled and not ui.progressBar.visible


def test_panel_error_is_raised_through_try_with_error_display_and_the_panel_recovers(panel):
    import numpy as np
    import slicer

    ui, widget = panel.ui, panel.widget
    panel.p.otherVolume = slicer.util.addVolumeFromArray(np.zeros((6, 8, 7), np.float32), name="flat PET")
    with pytest.raises(panel.volume.VolumeError, match="empty"):
        widget.onApplyButton()
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled and ui.inputsCollapsibleButton.enabled


def test_panel_offers_an_install_and_does_not_run_when_declined(panel, monkeypatch):
    import slicer

    monkeypatch.setattr(panel.module._logic, "missingPackage", lambda backend="auto": "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # PyTorch extension not installed
    monkeypatch.delattr(slicer, "packaging", raising=False)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or False)
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: installs.append(a))
    count = panel.scene.GetNumberOfNodes()
    panel.widget.onApplyButton()
    assert asked and "PyTorch" in asked[0] and not installs
    assert "Not run" in panel.ui.statusLabel.text and panel.scene.GetNumberOfNodes() == count


def test_panel_names_the_gpu_in_the_device_list(panel, monkeypatch):
    monkeypatch.setattr(panel.module._logic, "isInstalled", lambda name: True)
    monkeypatch.setattr(panel.module._logic, "gpuName", lambda: "NVIDIA H100")
    monkeypatch.setattr(panel.module.slicer.util, "WaitCursor", lambda: __import__("contextlib").nullcontext())
    panel.widget.onAdvancedCollapsed(False)
    assert panel.ui.deviceInfoLabel.text == "CUDA GPU: NVIDIA H100"
    assert panel.ui.deviceComboBox.items[2] == "CUDA GPU (NVIDIA H100)"


class FakePackaging(types.ModuleType):
    """Stand-in for Slicer's ``slicer.packaging`` (5.10+): ``pip_ensure`` raises RuntimeError when the
    user declines (Slicer's own message) or ``error`` (e.g. CalledProcessError when pip fails)."""

    def __init__(self, error):
        super().__init__("slicer.packaging")
        self.error, self.calls = error, []

    def pip_ensure(self, requirements, requester=None, **kwargs):
        self.calls.append(([str(r) for r in requirements], requester))
        raise self.error


def _assert_not_run_and_usable(panel, count):
    ui = panel.ui
    assert panel.scene.GetNumberOfNodes() == count  # nothing added
    assert ui.applyButton.enabled and ui.applyButton.text != "Cancel" and not panel.widget._running
    assert ui.inputsCollapsibleButton.enabled


def test_panel_install_declined_in_slicer_packaging_leaves_a_status_and_does_not_run(panel, monkeypatch, caplog):
    """Slicer 5.10+: pip_ensure raises RuntimeError when the user declines; Apply must return normally."""
    import logging
    import slicer

    panel.p.backend = panel.module.Backend.ONNX
    monkeypatch.setattr(panel.module._logic, "missingPackage", lambda backend="auto": "onnxruntime")
    packaging = FakePackaging(RuntimeError("User declined package installation"))
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda *a, **k: pytest.fail("pip_ensure asks; no second dialog"))
    count = panel.scene.GetNumberOfNodes()
    panel.ui.statusLabel.text = "a previous message"
    with caplog.at_level(logging.WARNING):
        panel.widget.onApplyButton()  # returns normally
    assert packaging.calls == [(["onnxruntime"], "LightFusion")]
    assert panel.ui.statusLabel.text == "Not run: installing onnxruntime was declined."
    assert any("installing onnxruntime was declined" in r.getMessage() for r in caplog.records)
    _assert_not_run_and_usable(panel, count)
    panel.widget.updateGUIState()
    assert panel.ui.applyButton.enabled  # nothing about the inputs changed: Apply can be pressed again


def _called_process_error():
    import subprocess

    return subprocess.CalledProcessError(1, "pip install")


@pytest.mark.parametrize("installer", ["slicer.packaging fails", "PyTorch extension fails",
                                       "PyTorch extension declined", "pip_install fails"])
def test_panel_install_failure_or_decline_is_reported_in_the_status_line(panel, monkeypatch, installer, caplog):
    import logging
    import slicer

    monkeypatch.setattr(panel.module._logic, "missingPackage", lambda backend="auto": "torch")
    monkeypatch.setattr(panel.module._logic, "isInstalled", lambda name: False)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # PyTorch extension not installed
    monkeypatch.setattr(slicer.util, "WaitCursor", lambda: __import__("contextlib").nullcontext())
    if installer == "slicer.packaging fails":
        monkeypatch.setattr(slicer, "packaging", FakePackaging(_called_process_error()), raising=False)
    elif installer.startswith("PyTorch extension"):
        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False):
                assert askConfirmation
                if installer.endswith("fails"):
                    raise ImportError("No module named 'torch'\n(after light-the-torch)")
                return None  # what installTorch returns when the user cancels

        monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    else:
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True)
        monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: (_ for _ in ()).throw(_called_process_error()))
    count = panel.scene.GetNumberOfNodes()
    with caplog.at_level(logging.WARNING):
        panel.widget.onApplyButton()
    status = panel.ui.statusLabel.text
    if installer == "PyTorch extension declined":
        assert status == "Not run: installing torch was declined."
    elif installer == "PyTorch extension fails":
        assert status == "Not run: installing torch failed: No module named 'torch'"  # one line
    else:
        assert status == ("Not run: installing torch failed: Command 'pip install' returned non-zero exit "
                          "status 1.")
    assert any("installing torch" in r.getMessage() for r in caplog.records)
    _assert_not_run_and_usable(panel, count)


def test_panel_install_accepted_but_package_still_missing_says_so(panel, monkeypatch):
    import slicer

    monkeypatch.setattr(panel.module._logic, "missingPackage", lambda backend="auto": "onnxruntime")
    monkeypatch.setattr(panel.module._logic, "isInstalled", lambda name: False)
    packaging = FakePackaging(None)
    packaging.pip_ensure = lambda requirements, requester=None, **kw: None  # e.g. skipped in testing mode
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    count = panel.scene.GetNumberOfNodes()
    panel.widget.onApplyButton()
    assert panel.ui.statusLabel.text.startswith("Not run: onnxruntime is not installed")
    _assert_not_run_and_usable(panel, count)


@pytest.mark.parametrize("hu_like", [False, True], ids=["coverage", "coverage+HU"])
def test_panel_shows_the_input_warnings_of_the_run(panel, monkeypatch, hu_like):
    """A PET covering about 2/7 of the MRI (shifted 5 of 7 voxels along i): the library's coverage warning
    reaches the status line and the main window's status bar; further warnings are counted."""
    import numpy as np
    import slicer

    shown = []
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda message, *a, **k: shown.append(message))
    values = slicer.util.arrayFromVolume(panel.p.otherVolume).copy()
    if hu_like:
        values[0] = -1000.0  # a plane of Hounsfield-unit air: the library also warns that it looks like a CT
    matrix = np.diag([1.0, 1.2, 2.0, 1.0])
    matrix[0, 3] = 5.0  # i spacing 1.0 mm: the PET starts at the MRI's 6th column
    panel.p.otherVolume = slicer.util.addVolumeFromArray(values, matrix, name="PET shifted")
    panel.widget.onApplyButton()
    status = panel.ui.statusLabel.text
    warnings = panel.widget.logic.lastWarnings
    assert status.startswith("MRI_PET shifted_fused: fused in ") and "fake on cpu." in status
    assert "the PET volume covers only 29% of the MRI grid; the rest is fused with 0" in warnings
    assert f" Warning: {warnings[0]}" in status
    if hu_like:
        assert any("like a CT in Hounsfield units" in w for w in warnings)
    assert len(warnings) >= (2 if hu_like else 1)
    if len(warnings) > 1:
        assert status.endswith(f" (+{len(warnings) - 1} more in the Python log)")
    else:
        assert "more in the Python log" not in status
    assert panel.ui.statusLabel.toolTip == "\n".join(warnings)  # all of them on hover
    assert shown == [status]


def test_panel_status_line_formats_zero_one_or_more_warnings(panel, monkeypatch):
    import slicer

    shown = []
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda message, *a, **k: shown.append(message))
    node = panel.scene.GetFirstNodeByName("MRI")
    for warnings, tail in [([], "."),
                           (["the PET volume covers only 30% of the MRI grid"],
                            ". Warning: the PET volume covers only 30% of the MRI grid"),
                           (["first", "second", "third"], ". Warning: first (+2 more in the Python log)")]:
        panel.widget.logic.lastRun = {"seconds": 1.23, "device": "onnx on cpu", "warnings": warnings}
        panel.widget.showResult(node)
        assert panel.ui.statusLabel.text == "MRI: fused in 1.2 s on onnx on cpu" + tail
        assert panel.ui.statusLabel.toolTip == "\n".join(warnings)
        assert shown[-1] == panel.ui.statusLabel.text
