"""Static wiring of the LightFusion Slicer module (no Slicer, no Qt needed).

- the .ui file: every widget the module code names exists with the expected class; every
  parameter-node field has exactly one widget (``SlicerParameterName``) of a class that
  parameterNodeWrapper's connectGui can bind to its type; node selectors get the scene;
- the panel's choices match LightFusionLib (tasks, axes, backends, devices, colour maps, colour
  restoration modes);
- CMake lists every module script and resource, and the layout LightFusionLib relies on;
- LightFusionSlicerLib stays Qt-free;
- the module compares no task names by hand (LightFusionLib.tasks defines them);
- the panel's behaviour (Apply -> Cancel while running, progress, status line with the run's input
  warnings, colour map and registration, cancel at any time, scene close, errors, install offer
  declined or failed, GPU name, sample data through its Sample Data registration, preselection on
  enter, the display after Apply and the classic overlay, Reload) with stand-in widgets around the real
  logic and a real MRML scene;
- the module metadata (categories, contributors, help link, acknowledgement) and the extension CMake;
- ``LightFusionTest`` (the self-test Slicer runs) itself, on a real MRML scene, with and without an
  inference backend.

``LightFusion.py`` itself imports qt/ctk/slicer.ScriptedLoadableModule, which only exist inside
Slicer: it is parsed with ``ast`` and, for the behaviour checks, imported with minimal stand-ins for
those modules (a small parameterNodeWrapper that stores the fields in the real
vtkMRMLScriptedModuleNode, a SampleData module with Slicer's registration API) and the real ``slicer``
wheel. What only a real Slicer can show (Qt widgets drawing, the real parameterNodeWrapper binding,
the Sample Data module's GUI, the layout manager, pip) is listed in the README's Slicer section.
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
    "colourModeComboBox": "QComboBox",
    "axisComboBox": "QComboBox",
    "backendComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "modelPathLabel": "QLabel",
    "modelTaskLabel": "QLabel",
    "colormapLabel": "QLabel",
    "colourModeLabel": "QLabel",
    "deviceInfoLabel": "QLabel",
    "statusLabel": "QLabel",
    "applyButton": "QPushButton",
    "loadSampleButton": "QPushButton",
    "overlayButton": "QPushButton",
    "transformOtherCheckBox": "QCheckBox",
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


def form_rows(layout_name: str) -> dict[str, tuple[int, int]]:
    """Widget name -> (row, column) in the QFormLayout ``layout_name`` of the .ui."""
    root = ET.parse(UI_FILE).getroot()
    layout = next(lay for lay in root.iter("layout") if lay.get("name") == layout_name)
    return {item.find("widget").get("name"): (int(item.get("row")), int(item.get("column")))
            for item in layout.findall("item") if item.find("widget") is not None}


def test_colour_mode_row_is_wired_like_the_colour_map_row():
    """Label + combo box right below the colour map's, in the same form, bound to the parameter node by
    SlicerParameterName; the tooltip says the fused luma is the same and points to the model card; the
    code shows and hides both together, as it does the colour map's."""
    widgets = ui_widgets()
    rows = form_rows("inputsFormLayout")
    row = rows["colormapComboBox"][0]
    assert (rows["colormapLabel"], rows["colormapComboBox"]) == ((row, 0), (row, 1))
    assert (rows["colourModeLabel"], rows["colourModeComboBox"]) == ((row + 1, 0), (row + 1, 1))
    rows_used = sorted(rows.values())
    assert len(rows_used) == len(set(rows_used)), "two widgets in one cell of the inputs form"
    assert dynamic_property(widgets["colormapComboBox"], "SlicerParameterName") == "colormap"
    assert dynamic_property(widgets["colourModeComboBox"], "SlicerParameterName") == "colourMode"
    tooltip = dynamic_property(widgets["colourModeComboBox"], "toolTip")
    assert "fused luma" in tooltip and "same" in tooltip and "model card" in tooltip
    assert "Plain YUV (paper)" in tooltip and "Keep saturation" in tooltip
    assert widgets["colourModeLabel"].find("property/string").text.strip()
    source = MODULE_PY.read_text()
    for name in ("colormap", "colourMode"):
        for suffix in ("Label", "ComboBox"):
            assert f"self.ui.{name}{suffix}.setVisible(" in source, f"{name}{suffix} is never shown or hidden"


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
    for name in ("LightFusion", "LightFusionWidget", "LightFusionLogic", "LightFusionTest", "LightFusionParameterNode"):
        assert name in classes, name
    bases = {n: [ast.unparse(b) for b in c.bases] for n, c in classes.items()}
    assert bases["LightFusion"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in bases["LightFusionWidget"]
    assert bases["LightFusionTest"] == ["ScriptedLoadableModuleTest"]
    # The template's logic: getParameterNode() returns the wrapped node (the Qt-free logic does the work).
    assert bases["LightFusionLogic"] == ["_logic.LightFusionLogic"]
    getter = next(f for f in classes["LightFusionLogic"].body
                  if isinstance(f, ast.FunctionDef) and f.name == "getParameterNode")
    assert ast.unparse(getter.body[-1]) == "return LightFusionParameterNode(super().getParameterNode())"
    init = ast.unparse(next(f for f in classes["LightFusionWidget"].body
                            if isinstance(f, ast.FunctionDef) and f.name == "initializeParameterNode"))
    assert "self.setParameterNode(self.logic.getParameterNode())" in init
    test_methods = {f.name for f in classes["LightFusionTest"].body
                    if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")}
    run_test = next(f for f in classes["LightFusionTest"].body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert test_methods and test_methods <= called, f"runTest skips {test_methods - called}"
    widget = ast.unparse(classes["LightFusionWidget"])
    assert "slicer.util.loadUI(self.resourcePath('UI/LightFusion.ui'))" in widget
    assert "slicer.util.tryWithErrorDisplay(" in widget and ".connectGui(self.ui)" in widget


def test_the_slicer_util_functions_the_module_calls_exist_in_slicer_util():
    """Every ``slicer.util.X`` that LightFusion.py and LightFusionSlicerLib call is in slicer.util (the
    slicer-core wheel ships Slicer's own util.py), with the keyword arguments used."""
    import inspect

    util = pytest.importorskip("slicer.util")
    for path in (MODULE_PY, *(MODULE_DIR / "LightFusionSlicerLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and ast.unparse(node.func.value) == "slicer.util"):
                function = getattr(util, node.func.attr, None)
                assert function is not None, f"{path.name}:{node.lineno}: slicer.util.{node.func.attr} does not exist"
                parameters = inspect.signature(function).parameters
                for keyword in node.keywords:
                    assert keyword.arg in parameters or any(
                        p.kind is p.VAR_KEYWORD for p in parameters.values()), \
                        f"{path.name}:{node.lineno}: slicer.util.{node.func.attr} has no argument {keyword.arg}"


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


def test_requirements_file_lists_what_first_use_installs():
    """Resources/requirements.txt (the template's place, listed in the module CMake by the resources test):
    valid requirement lines, ONNX Runtime with the library's own minimum version; PyTorch is not in it
    (it is installed only when asked for, through the PyTorch extension)."""
    from packaging.requirements import Requirement

    from LightFusionSlicerLib import logic

    lines = logic.loadRequirements()
    assert logic.requirementsPath() == MODULE_DIR / "Resources" / "requirements.txt"
    requirements = {Requirement(line).name: Requirement(line) for line in lines}
    assert set(requirements) == {"onnxruntime"}
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"{requirements["onnxruntime"]}"' in pyproject  # the same minimum as the Python package
    assert logic.requirementFor("onnxruntime") == str(requirements["onnxruntime"])
    assert logic.requirementFor("torch") == "torch"


def test_nothing_is_installed_at_import_time():
    """pip_install / pip_ensure / installTorch are only called inside functions, never by module-level
    code of LightFusion.py or LightFusionSlicerLib."""
    installers = {"pip_install", "pip_ensure", "installTorch", "pipEnsure", "_installPackage"}
    for path in (MODULE_PY, *(MODULE_DIR / "LightFusionSlicerLib").glob("*.py")):
        tree = ast.parse(path.read_text())
        for statement in tree.body:
            if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(statement):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    assert name not in installers, f"{path.name}:{node.lineno} installs at import time"


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
    # the library goes to qt-scripted-modules/LightFusionLib, its package data (models, sample) inside it
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/LightFusionLib" in text
    assert "LightFusionLib/Resources/Models/*.onnx" in text and "LightFusionLib/Resources/SampleData/" in text


def _cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable} "([^"]*)"\)', text)
    assert match, f"{variable} is not set to a quoted string"
    return match.group(1)


def test_extension_cmake_has_a_current_cmake_minimum_and_honest_metadata():
    """The minimum CMake is the range current Slicer's template uses (3.20.6...3.22.6); contributors are
    "Name (Organisation)"; every screenshot URL names a file of this repository that exists (none is
    fine); the icon URL too."""
    text = (REPO / "CMakeLists.txt").read_text()
    minimum = re.search(r"cmake_minimum_required\(VERSION (\d+(?:\.\d+)*)(?:\.\.\.(\d+(?:\.\d+)*))? FATAL_ERROR\)", text)
    assert minimum, "cmake_minimum_required(VERSION x...y FATAL_ERROR) expected"
    version = tuple(int(v) for v in minimum.group(1).split("."))
    assert version >= (3, 20, 6), f"CMake minimum {minimum.group(1)} is older than current Slicer's 3.20.6"
    for contributor in _cmake_value(text, "EXTENSION_CONTRIBUTORS").split(","):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor.strip()), contributor
    urls = _cmake_value(text, "EXTENSION_SCREENSHOTURLS").split() + [_cmake_value(text, "EXTENSION_ICONURL")]
    for url in urls:
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", url)
        assert match, f"{url}: not a raw URL of a file in this repository"
        assert (REPO / match.group(1)).is_file(), f"{url} points at {match.group(1)}, which does not exist"


def test_module_metadata_follows_slicer_conventions():
    """Categories through translate("qSlicerAbstractCoreModule", ...) (Slicer's own context: a localised
    Slicer shows one Multimodality folder), contributors "Name (Organisation)", help text linking the
    README's Slicer section, an acknowledgement, the sample data registered on startupCompleted."""
    tree = module_tree()
    init = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "LightFusion"
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    code = ast.unparse(init)
    assert "self.parent.categories = [translate('qSlicerAbstractCoreModule', 'Multimodality')]" in code
    assert "slicer.app.connect('startupCompleted()', registerSampleData)" in code
    contributors = next(n.value for n in ast.walk(init) if isinstance(n, ast.Assign)
                        and ast.unparse(n.targets[0]) == "self.parent.contributors")
    for contributor in ast.literal_eval(contributors):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor), contributor
    source = MODULE_PY.read_text()
    url = re.search(r'DOCUMENTATION_URL = HOMEPAGE \+ "#([a-z0-9-]+)"', source)
    assert url, "the help text links DOCUMENTATION_URL = HOMEPAGE + '#<README anchor>'"
    headings = [line[3:].strip() for line in (REPO / "README.md").read_text().splitlines() if line.startswith("## ")]
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    assert url.group(1) == "use-in-3d-slicer" and url.group(1) in anchors
    homepage = re.search(r'HOMEPAGE = "([^"]+)"', source).group(1)
    assert _cmake_value((REPO / "CMakeLists.txt").read_text(), "EXTENSION_HOMEPAGE").startswith(homepage)
    assert "DOCUMENTATION_URL" in code and "acknowledgementText" in code


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

def _node_hint(hint) -> bool:
    import slicer

    members = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union \
        else [hint]
    return all(isinstance(m, type) and issubclass(m, slicer.vtkMRMLNode) for m in members)


def stand_in_parameter_node_wrapper(cls):
    """Just enough of Slicer's @parameterNodeWrapper for these tests: each field is a property stored in
    the wrapped vtkMRMLScriptedModuleNode (nodes as node references, enums by value, bools as
    "true"/"false", paths as text), defaults written when a node is wrapped, observers on the node,
    connectGui a no-op (the real one binds the .ui widgets by their SlicerParameterName)."""
    hints = typing.get_type_hints(cls)
    defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}

    def make(name, hint):
        def read(self):
            node = self.parameterNode
            if _node_hint(hint):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if not text and name in defaults:  # as Slicer's wrapper: a missing value reads as the default
                write(self, defaults[name])
                text = node.GetParameter(name)
            if hint is bool:
                return text == "true"
            if isinstance(hint, type) and issubclass(hint, enum.Enum):
                return hint(text)
            return pathlib.Path(text)

        def write(self, value):
            node = self.parameterNode
            if _node_hint(hint):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            elif hint is bool:
                node.SetParameter(name, "true" if value else "false")
            elif isinstance(value, enum.Enum):
                node.SetParameter(name, value.value)
            else:
                node.SetParameter(name, str(value))

        return property(read, write)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, hint in hints.items():
            if not _node_hint(hint) and not parameterNode.GetParameter(name):
                setattr(self, name, defaults.get(name, pathlib.Path()))

    for name, hint in hints.items():
        setattr(cls, name, make(name, hint))
    cls.__init__ = __init__
    cls.connectGui = lambda self, gui: 1
    cls.disconnectGui = lambda self, tag: None
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.defaults = defaults
    return cls


class FakeSampleDataLogic:
    """Slicer's SampleData.SampleDataLogic registration API (static methods over one dict of lists, as
    slicer.modules.sampleDataSources is), with SampleDataSource's fields."""

    sources: dict = {}

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                       customDownloader=None, thumbnailFileName=None, loadFileType="VolumeFile",
                                       loadFiles=None, loadFileProperties={}, checksums=None):
        source = types.SimpleNamespace(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                       customDownloader=customDownloader, thumbnailFileName=thumbnailFileName,
                                       loadFileType=loadFileType, checksums=checksums)
        FakeSampleDataLogic.sources.setdefault(category, []).append(source)

    @staticmethod
    def sampleDataSourcesByCategory(category=None):
        if category is None:
            return FakeSampleDataLogic.sources
        return FakeSampleDataLogic.sources.get(category, [])


@pytest.fixture(scope="module")
def module():
    """Import LightFusion.py with minimal qt/ctk/ScriptedLoadableModule/parameterNodeWrapper/SampleData
    stand-ins (the logic then uses its own Qt-free base class, which mirrors Slicer's)."""
    import unittest

    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    if not hasattr(slicer, "vtkMRMLScalarVolumeNode"):
        pytest.skip("slicer-core wheel expected")

    class _Module:
        def __init__(self, parent):
            self.parent = parent

    class _Widget:
        reloaded: list = []

        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def onReload(self):  # Slicer's: slicer.util.reloadScriptedModule(self.moduleName)
            _Widget.reloaded.append(sorted(name for name in sys.modules if name.startswith("LightFusionLib")))

    class _Test(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    stubs = {
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
        "slicer.i18n": types.ModuleType("slicer.i18n"),
        "SampleData": types.ModuleType("SampleData"),
    }
    stubs["qt"].Qt = types.SimpleNamespace(WaitCursor=3)
    stubs["slicer.ScriptedLoadableModule"].ScriptedLoadableModule = _Module
    stubs["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleWidget = _Widget
    stubs["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleTest = _Test
    stubs["slicer.parameterNodeWrapper"].parameterNodeWrapper = stand_in_parameter_node_wrapper
    stubs["slicer.i18n"].tr = lambda text: text
    stubs["slicer.i18n"].translated = []
    stubs["slicer.i18n"].translate = lambda context, text: stubs["slicer.i18n"].translated.append((context, text)) or text
    stubs["SampleData"].SampleDataLogic = FakeSampleDataLogic
    saved = {name: sys.modules.get(name) for name in [*stubs, "LightFusion", "LightFusionSlicerLib.logic"]}
    package = importlib.import_module("LightFusionSlicerLib")
    saved_attribute = getattr(package, "logic", None)
    sys.modules.update(stubs)
    sys.modules.pop("LightFusion", None)
    sys.modules.pop("LightFusionSlicerLib.logic", None)  # re-import so its base class is the Qt-free one
    try:
        imported = importlib.import_module("LightFusion")
        imported.stubs = stubs
        imported.StubWidgetBase = _Widget
        yield imported
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
    ctkPathLineEdit<->pathlib.Path, QCheckBox<->bool...)."""
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
    from LightFusionLib import backends, registration
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
    assert tuple(r.value for r in module.Registration) == ("none", *registration.KINDS) == logic.REGISTRATIONS
    # the colour restoration choices are the library's modes (one definition: LightFusionLib.colour)
    from LightFusionLib import colour

    assert tuple(m.value for m in module.ColourMode) == colour.COLOUR_MODES == logic.COLOUR_MODES
    for member in module.ColourMode:  # every mode has a panel label of its own, not its raw name
        assert member.label() not in ("", member.value)
    assert (module.ColourMode("yuv").label(), module.ColourMode("saturated").label()) == (
        "Plain YUV (paper)", "Keep saturation")
    for enum_class in (module.FusionTask, module.ModelTask, module.Colormap, module.ColourMode, module.SliceAxis,
                       module.Backend, module.Device, module.Registration):
        labels = [member.label() for member in enum_class]
        assert all(labels) and len(set(labels)) == len(labels), enum_class
    try:
        colormaps = importlib.import_module("LightFusionLib.colormaps")
    except ImportError:
        pytest.skip("LightFusionLib.colormaps not available")
    assert {c.value for c in module.Colormap} == set(colormaps.COLORMAPS) | {colormaps.NONE, "default"}


def test_defaults_and_helpers(module):
    import slicer

    scene = slicer.vtkMRMLScene()
    raw = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    p = module.LightFusionParameterNode(raw)
    assert (p.task, p.colormap, p.registration, p.transformOther, p.axis, p.backend, p.device) == (
        module.FusionTask.PET_MRI, module.Colormap.DEFAULT, module.Registration.NONE, False, module.SliceAxis.AXIAL,
        module.Backend.AUTO, module.Device.AUTO)
    from LightFusionLib.colour import DEFAULT_COLOUR_MODE

    assert p.colourMode is module.ColourMode(DEFAULT_COLOUR_MODE) and p.colourMode.value == "yuv"  # the paper's
    assert module._modelPathOrNone(pathlib.Path()) is None
    assert module._modelPathOrNone(None) is None
    assert module._modelPathOrNone(pathlib.Path("/models/my.pt")) == "/models/my.pt"
    assert module.LightFusionLogic.__name__ == "LightFusionLogic"


def test_module_description_at_startup(module, monkeypatch):
    """LightFusion(parent) as Slicer creates it: the category through translate() in Slicer's context,
    contributors "Name (Organisation)", help with the documentation link, acknowledgement, and the
    sample data registered once startup has completed."""
    import slicer

    connected = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: connected.append((signal, slot))),
                        raising=False)
    parent = types.SimpleNamespace()
    module.stubs["slicer.i18n"].translated.clear()
    module.LightFusion(parent)
    assert parent.categories == ["Multimodality"]
    assert module.stubs["slicer.i18n"].translated == [("qSlicerAbstractCoreModule", "Multimodality")]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in parent.contributors)
    assert f'href="{module.DOCUMENTATION_URL}"' in parent.helpText
    assert "Harvard Whole Brain Atlas" in parent.acknowledgementText and "ICBM152" in parent.acknowledgementText
    assert connected == [("startupCompleted()", module.registerSampleData)]


# --------------------------------------------------------------------------------------------------
# panel behaviour with stand-in widgets (real scene, real logic, fake Qt widgets and slicer.app)

class FakeWidget:
    """Just the widget API LightFusionWidget uses."""

    def __init__(self, items=()):
        self.enabled, self.visible, self.text, self.toolTip, self.checked = True, True, "", "", False
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
        self.process_events_calls = 0

    def processEvents(self):
        self.process_events_calls += 1
        if self.on_process_events:
            self.on_process_events()

    def testingEnabled(self):
        return True

    def layoutManager(self):
        return None

    def connect(self, signal, slot):
        pass

    def setOverrideCursor(self, cursor):  # slicer.util.tryWithErrorDisplay(waitCursor=True)
        pass

    def restoreOverrideCursor(self):
        pass


class PanelMeanBackend:
    name, device, task, preferred_batch = "fake", "cpu", "pet-mri", 2

    def __call__(self, mri, other):
        return (mri + other) / 2

    def describe(self):
        return "fake on cpu"


def add_slice_views(scene):
    """The three slice views' composite nodes, as Slicer's layout has them (singletons)."""
    import slicer

    nodes = []
    for name in ("Red", "Yellow", "Green"):
        node = slicer.vtkMRMLSliceCompositeNode()
        node.SetSingletonTag(f"vtkMRMLSliceCompositeNode{name}")
        node.SetLayoutName(name)
        nodes.append(scene.AddNode(node))
    return nodes


@pytest.fixture
def panel(module, monkeypatch):
    slicer = pytest.importorskip("slicer")
    try:
        volume = importlib.import_module("LightFusionLib.fusion")
    except ImportError:
        pytest.skip("LightFusionLib.fusion not available")
    import numpy as np

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # Slicer's default colour tables (Grey, PET-Heat...)
    colors.SetMRMLScene(scene)
    views = add_slice_views(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    app = FakeApp()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *a, **k: True)
    FakeSampleDataLogic.sources.clear()

    widget = module.LightFusionWidget()
    widget.ui = types.SimpleNamespace(**{name: FakeWidget() for name in EXPECTED_WIDGETS})
    widget.ui.deviceComboBox.items = [d.label() for d in module.Device]
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.logic = module.LightFusionLogic()
    monkeypatch.setattr(widget.logic, "getBackend", lambda *a, **k: PanelMeanBackend())
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (6, 8, 7)], indexing="ij")
    values = 100 * np.exp(-(i ** 2 + j ** 2 + k ** 2)) + np.linspace(0, 1, 6 * 8 * 7).reshape(6, 8, 7)
    mri = slicer.util.addVolumeFromArray(values.astype(np.float32), np.diag([1.0, 1.2, 2.0, 1.0]), name="MRI")
    pet = slicer.util.addVolumeFromArray(values[::-1].astype(np.float32), np.diag([1.0, 1.2, 2.0, 1.0]), name="PET")
    # what setup() does besides loading the .ui: observe the scene's close
    widget.addObserver(scene, scene.StartCloseEvent, widget.onSceneStartClose)
    widget.addObserver(scene, scene.EndCloseEvent, widget.onSceneEndClose)
    widget.setParameterNode(widget.logic.getParameterNode())
    p = widget._parameterNode
    p.mriVolume, p.otherVolume, p.device = mri, pet, module.Device.CPU
    monkeypatch.setattr(module._logic, "missingPackage", lambda backend="auto": None)
    yield types.SimpleNamespace(widget=widget, ui=widget.ui, p=p, scene=scene, app=app, views=views,
                                volume=volume, module=module)
    widget.setParameterNode(None)
    widget.removeObservers()


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
    assert not ui.colourModeComboBox.visible and not ui.colourModeLabel.visible  # nor a colour restoration


def test_panel_shows_the_colour_restoration_only_where_the_result_is_rgb(panel):
    """Like the colour map's row, the colour restoration's is shown only where it applies: a PET/SPECT
    whose result is RGB (a scalar one with a colour map other than None, or an RGB one); not for CT or a
    grayscale fusion."""
    import numpy as np
    import slicer

    ui, p, widget, module = panel.ui, panel.p, panel.widget, panel.module

    def shown():
        widget.updateGUIState()
        assert ui.colourModeLabel.visible == ui.colourModeComboBox.visible
        assert ui.colormapLabel.visible == ui.colormapComboBox.visible
        return ui.colormapComboBox.visible, ui.colourModeComboBox.visible

    assert shown() == (True, True)  # scalar PET, the task's colour map
    for colormap in module.Colormap:
        p.colormap = colormap
        assert shown() == (True, colormap != module.Colormap.NONE)
    p.task = module.FusionTask.SPECT_MRI
    assert shown() == (True, False)  # still colour map None
    p.colormap = module.Colormap.HOT
    assert shown() == (True, True)
    p.task = module.FusionTask.CT_MRI
    assert shown() == (False, False)
    p.task, p.modelTask, p.modelPath = module.FusionTask.CUSTOM, module.ModelTask.PET_MRI, pathlib.Path("/m.onnx")
    assert shown() == (True, True)  # a custom model follows the task it was trained for
    p.task = module.FusionTask.PET_MRI
    p.colormap = module.Colormap.NONE
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 7, 3)).astype(np.uint8)
    p.otherVolume = slicer.util.addVolumeFromArray(rgb, np.diag([1.0, 1.2, 2.0, 1.0]), name="PET rgb",
                                                   nodeClassName="vtkMRMLVectorVolumeNode")
    assert shown() == (False, True)  # an RGB PET: no colour map (whatever it is set to), but coloured


@pytest.mark.parametrize("mode", ["yuv", "saturated"])
def test_panel_passes_the_colour_restoration_and_names_it_in_the_status_line(panel, mode):
    ui, p, widget, module = panel.ui, panel.p, panel.widget, panel.module
    p.colourMode = module.ColourMode(mode)
    widget.onApplyButton()
    run = widget.logic.lastRun
    assert run["colourMode"] == mode and run["colormap"] == "harvard-pet"
    label = module.ColourMode(mode).label()
    assert f"Colour map: Harvard PET (PET window {run['otherWindow'][0]:.4g} to {run['otherWindow'][1]:.4g}). " \
           f"Colours: {label}." in ui.statusLabel.text


def test_panel_grayscale_run_names_no_colour_restoration(panel):
    """Colour map None: a scalar result; the choice is hidden, not passed, and not claimed in the status line."""
    ui, p, widget, module = panel.ui, panel.p, panel.widget, panel.module
    p.colourMode, p.colormap = module.ColourMode.SATURATED, module.Colormap.NONE
    calls = []
    process = widget.logic.process
    widget.logic.process = lambda *args, **kwargs: calls.append(kwargs.get("colourMode")) or process(*args, **kwargs)
    widget.onApplyButton()
    assert calls == [None] and widget.logic.lastRun["colourMode"] is None
    assert "fused in" in ui.statusLabel.text and "Colours:" not in ui.statusLabel.text
    assert panel.scene.GetFirstNodeByName("MRI_PET_fused").GetClassName() == "vtkMRMLScalarVolumeNode"


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

    @staticmethod
    def load_requirements(path):  # slicer.packaging.load_requirements (comments and options skipped)
        from packaging.requirements import Requirement

        lines = [line.strip() for line in Path(path).read_text().splitlines()]
        return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


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
    assert packaging.calls == [([panel.module._logic.requirementFor("onnxruntime")], "LightFusion")]
    assert packaging.calls[0][0] == ["onnxruntime>=1.17"]  # the line of Resources/requirements.txt
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


# --------------------------------------------------------------------------------------------------
# sample data, preselection, display, overlay, registration, cancel at any time, reload, self-test

def test_sample_data_is_registered_in_the_sample_data_module_and_the_button_uses_it(panel):
    """registerSampleData (the template's, on startupCompleted): one LightFusion entry with the bundled
    files as file:// URIs and their checksums; registering again (a reload) replaces it. The panel's
    button loads through that entry's downloader: nodes with storage nodes on the bundled files, selected."""
    import hashlib
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    module = panel.module
    name = module.registerSampleData()
    assert name == module.registerSampleData()  # twice (a reload): still one entry
    entries = FakeSampleDataLogic.sampleDataSourcesByCategory("LightFusion")
    assert [e.sampleName for e in entries] == [name] and name.startswith("LightFusion ")
    source = entries[0]
    paths = [pathlib.Path(url2pathname(urlparse(uri).path)) for uri in source.uris]
    assert [p.name for p in paths] == source.fileNames == ["mni152-t1.nrrd", "mni152-fdg-pet-sim.nrrd"]
    assert all(p.parent == REPO / "LightFusionLib" / "Resources" / "SampleData" for p in paths)
    assert source.checksums == [f"SHA256:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in paths]
    assert source.nodeNames == ["mni152-t1", "mni152-fdg-pet-sim"] and source.loadFileType == ["VolumeFile"] * 2

    used = []
    original = source.customDownloader
    source.customDownloader = lambda s: used.append(s) or original(s)
    panel.widget.onLoadSampleButton()
    assert used == [source]  # the panel loaded through the Sample Data registration
    p = panel.p
    assert (p.mriVolume.GetName(), p.otherVolume.GetName(), p.task) == ("mni152-t1", "mni152-fdg-pet-sim",
                                                                         module.FusionTask.PET_MRI)
    for node, path in zip((p.mriVolume, p.otherVolume), paths):
        storage = node.GetStorageNode()
        assert storage is not None and storage.GetClassName() == "vtkMRMLVolumeArchetypeStorageNode"
        assert pathlib.Path(storage.GetFileName()).resolve() == path.resolve()
    for view in panel.views:  # shown as loaded: PET over MRI
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (p.mriVolume.GetID(), p.otherVolume.GetID())
    assert "Sample data loaded" in panel.ui.statusLabel.text


def test_enter_preselects_new_volumes_but_never_refills_a_cleared_selection(panel):
    import numpy as np
    import slicer

    widget, p = panel.widget, panel.p
    pet = p.otherVolume
    p.mriVolume = None  # the user clears the MRI selector (the GUI writes the parameter node)
    widget.exit()
    widget.enter()
    assert widget._parameterNode.mriVolume is None and widget._parameterNode.otherVolume is pet
    p = widget._parameterNode
    p.otherVolume = None
    widget.exit()
    widget.enter()
    assert (widget._parameterNode.mriVolume, widget._parameterNode.otherVolume) == (None, None)
    # a volume loaded later is preselected once
    t1 = slicer.util.addVolumeFromArray(np.ones((3, 3, 3), np.float32), name="sub02_T1w")
    widget.exit()
    widget.enter()
    assert widget._parameterNode.mriVolume is t1 and widget._parameterNode.otherVolume is None


def test_enter_preselects_inputs_by_name_in_a_new_scene(panel):
    import slicer

    panel.widget.setParameterNode(None)
    panel.scene.Clear(0)  # a new scene: the parameter node is reset, nothing is selected
    import numpy as np

    mri = slicer.util.addVolumeFromArray(np.ones((3, 3, 3), np.float32), name="brain MR")
    pet = slicer.util.addVolumeFromArray(np.ones((3, 3, 3), np.float32), name="FDG PET")
    panel.widget.enter()
    assert (panel.widget._parameterNode.mriVolume, panel.widget._parameterNode.otherVolume) == (mri, pet)


def test_panel_apply_shows_the_fused_volume_over_the_mri_in_all_linked_views(panel):
    widget, ui = panel.widget, panel.ui
    widget.onApplyButton()
    fused = panel.scene.GetFirstNodeByName("MRI_PET_fused")
    assert fused is not None and fused.GetClassName() == "vtkMRMLVectorVolumeNode"
    for view in panel.views:
        assert view.GetBackgroundVolumeID() == panel.p.mriVolume.GetID()
        assert view.GetForegroundVolumeID() == fused.GetID() and view.GetForegroundOpacity() == 1.0
        assert view.GetLinkedControl()
    display = fused.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 255.0)  # colours as computed
    # a scalar PET: the colour map used (and its window) is named in the status line
    run = widget.logic.lastRun
    assert run["colormap"] == "harvard-pet"
    assert f"Colour map: Harvard PET (PET window {run['otherWindow'][0]:.4g} to {run['otherWindow'][1]:.4g})." \
        in ui.statusLabel.text
    assert ui.overlayButton.enabled and not ui.overlayButton.checked


def test_panel_classic_overlay_is_one_click_away_and_back(panel):
    import slicer

    widget, ui = panel.widget, panel.ui
    pet = panel.p.otherVolume
    before = slicer.util.arrayFromVolume(pet).copy(), pet.GetTransformNodeID()
    widget.onApplyButton()
    fused = panel.scene.GetFirstNodeByName("MRI_PET_fused")
    widget.onOverlayToggled(True)
    for view in panel.views:
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (panel.p.mriVolume.GetID(), pet.GetID())
        assert view.GetForegroundOpacity() == 0.5
    display = pet.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"  # Slicer's own colour table
    low, high = widget.logic.lastRun["otherWindow"]
    assert abs(display.GetWindowLevelMin() - low) < 1e-3 and abs(display.GetWindowLevelMax() - high) < 1e-3
    assert "PET-Heat" in ui.statusLabel.text and "Classic overlay" in ui.statusLabel.text
    widget.onOverlayToggled(False)
    for view in panel.views:
        assert view.GetForegroundVolumeID() == fused.GetID() and view.GetForegroundOpacity() == 1.0
    assert (slicer.util.arrayFromVolume(pet) == before[0]).all() and pet.GetTransformNodeID() == before[1]


def fake_registration(monkeypatch, transform=None, delay=0.0, fail=None):
    """LightFusionLib.registration.register replaced by one that 'finds' ``transform`` in three levels
    (``delay`` seconds each, reporting progress as the real one does) or raises ``fail``."""
    import time as _time

    import SimpleITK as sitk

    from LightFusionLib import registration

    transform = transform or sitk.Euler3DTransform((1.0, 2.0, 0.5), 0.04, -0.03, 0.05, (1.5, -1.0, 0.8))
    calls = []

    def register(mri, other, kind="rigid", progress=None, **kwargs):
        calls.append(kind)
        for level in range(3):
            if progress is not None:
                progress(level, 3)
            _time.sleep(delay)
        if fail is not None:
            raise fail
        if progress is not None:
            progress(3, 3)
        return registration.RegistrationResult(transform=transform, kind=kind, measure_before=0.2,
                                               measure_after=0.8, seconds=3 * delay)

    monkeypatch.setattr(registration, "register", register)
    return calls


@pytest.mark.parametrize("move", [False, True], ids=["inputs-unchanged", "other-under-transform"])
def test_panel_register_first_adds_the_transform_and_reports_the_measure(panel, monkeypatch, move):
    calls = fake_registration(monkeypatch)
    widget, p, ui = panel.widget, panel.p, panel.ui
    p.registration = panel.module.Registration.RIGID
    p.transformOther = move
    widget.updateGUIState()
    assert ui.transformOtherCheckBox.visible
    stages = []
    panel.app.on_process_events = lambda: stages.append(ui.statusLabel.text)
    widget.onApplyButton()
    assert calls == ["rigid"]
    transform = panel.scene.GetFirstNodeByName("PET_to_MRI")
    assert transform is not None and transform.GetClassName() == "vtkMRMLLinearTransformNode"
    assert p.otherVolume.GetTransformNodeID() == (transform.GetID() if move else None)
    assert p.mriVolume.GetTransformNodeID() is None
    assert ('Rigid registration: alignment measure 0.200 -> 0.800 (higher is better); transform "PET_to_MRI" added.'
            in ui.statusLabel.text)
    assert any(text.startswith("Registering (Rigid)") for text in stages)
    p.registration = panel.module.Registration.NONE
    widget.updateGUIState()
    assert not ui.transformOtherCheckBox.visible


def _count(scene, class_name):
    return scene.GetNumberOfNodesByClass(class_name)


@pytest.mark.parametrize("when", ["while the model loads", "while registering", "during the last batch",
                                  "scene closed"])
def test_panel_cancel_works_at_any_time_and_leaves_nothing(panel, monkeypatch, when):
    """Cancel (the Apply button while running) is seen at once while the model loads or the volumes are
    registered (the panel processes events every 50 ms meanwhile), and also when clicked while the last
    batch is reported; a scene closed during a run is a cancel too. Nothing is added in any case."""
    import time as _time

    widget, ui, p = panel.widget, panel.ui, panel.p
    slow = 3.0
    if when == "while the model loads":
        monkeypatch.setattr(widget.logic, "getBackend", lambda *a, **k: _time.sleep(slow) or PanelMeanBackend())
    if when == "while registering":
        fake_registration(monkeypatch, delay=slow / 3)
        p.registration = panel.module.Registration.AFFINE
    clicks = []

    def user():
        if clicks:
            return
        if when == "during the last batch" and not (ui.progressBar.maximum and ui.progressBar.value == ui.progressBar.maximum):
            return
        clicks.append(_time.perf_counter())
        if when == "scene closed":
            panel.scene.Clear(0)
        else:
            widget.onApplyButton()  # the same button, now labelled Cancel

    panel.app.on_process_events = user
    volumes = _count(panel.scene, "vtkMRMLVolumeNode")
    started = _time.perf_counter()
    widget.onApplyButton()
    took = _time.perf_counter() - started
    assert clicks and "Cancelled" in ui.statusLabel.text and "nothing was changed" in ui.statusLabel.text
    if when in ("while the model loads", "while registering"):
        assert took < slow / 2, f"the cancel took {took:.1f} s"
    assert _count(panel.scene, "vtkMRMLTransformNode") == 0
    if when == "scene closed":
        assert _count(panel.scene, "vtkMRMLVolumeNode") == 0
        assert ui.applyButton.toolTip == "Select an MRI volume." and not ui.applyButton.enabled  # a new, empty scene: nothing selected
    else:
        assert _count(panel.scene, "vtkMRMLVolumeNode") == volumes
        assert ui.applyButton.enabled
    assert ui.applyButton.text == "Apply" and not ui.progressBar.visible


def test_panel_stays_responsive_while_the_model_loads(panel, monkeypatch):
    import time as _time

    monkeypatch.setattr(panel.widget.logic, "getBackend", lambda *a, **k: _time.sleep(0.6) or PanelMeanBackend())
    panel.widget.onApplyButton()
    assert panel.app.process_events_calls >= 6  # about every 50 ms during the 0.6 s load
    assert panel.scene.GetFirstNodeByName("MRI_PET_fused") is not None


def test_scene_close_in_the_panel_cancels_the_run(panel):
    panel.widget._running = True
    panel.widget.onSceneStartClose(None, None)
    assert panel.widget._cancelRequested and panel.widget.logic._cancelRequested
    assert not panel.ui.overlayButton.enabled


def test_reload_forgets_the_libraries_before_slicers_reload(module, monkeypatch):
    """onReload drops LightFusionLib and LightFusionSlicerLib from sys.modules, then calls Slicer's
    onReload (which re-executes LightFusion.py, whose imports then read the edited files)."""
    saved = {name: mod for name, mod in sys.modules.items()
             if name.split(".")[0] in ("LightFusionLib", "LightFusionSlicerLib")}
    module.StubWidgetBase.reloaded.clear()
    try:
        module.LightFusionWidget().onReload()
        assert module.StubWidgetBase.reloaded == [[]]  # nothing of LightFusionLib left when Slicer reloads
    finally:
        sys.modules.update(saved)


@pytest.fixture
def self_test_scene(module, monkeypatch):
    """What LightFusionTest finds in Slicer: slicer.mrmlScene with the default colour tables and three
    slice views, slicer.app, the Sample Data module."""
    import slicer

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    views = add_slice_views(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", FakeApp(), raising=False)
    FakeSampleDataLogic.sources.clear()
    return types.SimpleNamespace(scene=scene, views=views)


def test_self_test_passes_without_onnx_runtime_or_pytorch(module, self_test_scene, monkeypatch, caplog):
    """The build factory has neither backend: LightFusionTest tests the rest and logs why it skips the
    network."""
    import logging

    monkeypatch.setattr(module._logic, "isInstalled", lambda name: False)
    with caplog.at_level(logging.INFO):
        module.LightFusionTest().runTest()
    assert any("inference test is skipped: neither ONNX Runtime nor PyTorch is installed" in r.getMessage()
               for r in caplog.records)


def test_self_test_runs_the_network_when_a_backend_is_installed(module, self_test_scene, caplog):
    import logging

    from LightFusionSlicerLib import logic

    if logic.missingPackage("auto") is not None:
        pytest.skip("no inference backend installed")
    with caplog.at_level(logging.INFO):
        module.LightFusionTest().test_LightFusion_inference()
    assert not any("skipped" in r.getMessage() for r in caplog.records)
    assert self_test_scene.scene.GetFirstNodeByName("mni152-t1_mni152-fdg-pet-sim_fused") is not None
