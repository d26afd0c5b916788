"""Qt-free half of the LightFusion Slicer module: the MRML <-> SimpleITK bridge (``mrml``), LightFusionLogic
(``logic``) and the slice-view display of a result (``display``).

Nothing here imports qt, ctk or slicer.app, so it runs in the Slicer Python console, inside
Slicer's self-test, and under pytest with the ``slicer-core`` wheel alike. The Qt widget, the
parameter node and the self-test live in ``LightFusion.py``.

It is a sub-package (not top-level helper scripts) because Slicer loads every ``*.py`` at the top of
a scripted-module folder as a module of its own.
"""
from __future__ import annotations

import importlib.util
import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ensureLightFusionLibImportable() -> None:
    """Make ``import LightFusionLib`` work in both layouts.

    Installed extension: ``LightFusionLib/`` sits beside ``LightFusion.py`` in qt-scripted-modules,
    which Slicer already puts on ``sys.path``. Source checkout added via Application Settings >
    Modules: the module folder is ``<repo>/LightFusion`` and the library is ``<repo>/LightFusionLib``,
    so the repository root is appended to ``sys.path``.
    """
    if importlib.util.find_spec("LightFusionLib") is not None:
        return
    for root in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(root, "LightFusionLib", "__init__.py")):
            if root not in sys.path:
                sys.path.append(root)
            return


_ensureLightFusionLibImportable()

# Packages whose edits a developer-mode "Reload" must pick up (LightFusion.py's onReload).
RELOADED_PACKAGES = ("LightFusionLib", "LightFusionSlicerLib")


def reloadPackages(packages=RELOADED_PACKAGES) -> list[str]:
    """Forget every loaded module of ``packages`` (``sys.modules``), so that the next import reads
    their files again; returns the module names forgotten.

    Slicer's Reload re-executes ``LightFusion.py`` only; its ``import LightFusionLib...`` /
    ``from LightFusionSlicerLib import ...`` would otherwise get the modules loaded at startup.
    Dropping the whole packages (rather than ``importlib.reload`` of each module in some order) makes
    the re-import consistent: no module keeps a reference to an old version of another (an old
    exception class would no longer match in an ``except``). The module widget's ``onReload`` calls
    this before ``ScriptedLoadableModuleWidget.onReload``, as SlicerNNUnet does for its package.
    """
    names = sorted(name for name in sys.modules
                   if any(name == package or name.startswith(package + ".") for package in packages))
    for name in names:
        del sys.modules[name]
    importlib.invalidate_caches()  # files edited since startup are found by the next import
    return names
