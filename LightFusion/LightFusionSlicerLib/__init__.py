"""Qt-free half of the LightFusion Slicer module: the MRML <-> SimpleITK bridge and LightFusionLogic.

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
