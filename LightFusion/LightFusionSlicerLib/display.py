"""How a fusion result is shown in Slicer's slice views, without Qt.

Everything here works on MRML nodes only (slice composite nodes, volume display nodes), so it runs
in Slicer and on a bare ``vtkMRMLScene`` (the slicer-core wheel) alike. Fitting the views to the
volumes needs the layout manager and is left to the widget.

- :func:`showFusion`: every slice view shows the MRI as background and the fused volume as
  foreground at full opacity, views linked: the slice view's foreground opacity slider then fades
  between the fused volume and the MRI, in all views at once.
- :func:`showClassicOverlay`: the classic comparison: the PET/SPECT (or CT) over the MRI at 50%,
  a scalar PET/SPECT with Slicer's own "PET-Heat" colour table and the window the fusion used.
- :func:`setupFusedDisplay`: the fused volume's window/level: 0-255 for an RGB result (colours
  shown exactly as computed), the 0.5-99.5 percentiles for a scalar one.
"""
from __future__ import annotations

import numpy as np

from . import mrml

# Slicer's own colour table for PET (a procedural colour node that vtkMRMLColorLogic adds to every
# scene: "PET-Heat" in the Colors module).
PET_HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
CLASSIC_OVERLAY_OPACITY = 0.5
RGB_WINDOW = (0.0, 255.0)


def sliceCompositeNodes(scene) -> list:
    """The scene's slice composite nodes (one per slice view)."""
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def _ensureDisplayNode(node):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


def setupFusedDisplay(node) -> tuple[float, float] | None:
    """Display node of a fused volume with a sensible window/level; returns (low, high) or None.

    RGB result: 0-255 (the display's shift/scale is then the identity: the colours are shown exactly
    as computed, not stretched by an automatic window). Scalar result: its 0.5-99.5 percentiles.
    """
    display = _ensureDisplayNode(node)
    if display is None:
        return None
    if node.GetClassName() == mrml.VECTOR_CLASS:
        low, high = RGB_WINDOW
    else:
        voxels = mrml.voxelArray(node).ravel()
        voxels = voxels[:: max(1, voxels.size // 2_000_000)]  # percentiles of a subsample: fast on big volumes
        low, high = (float(v) for v in np.percentile(voxels, [0.5, 99.5]))
        if high <= low:
            low, high = float(voxels.min()), float(voxels.max())
        if high <= low:
            return None
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    return low, high


def showFusion(scene, mriNode, fusedNode) -> int:
    """Every slice view: background = MRI, foreground = fused volume at opacity 1, views linked.

    The foreground opacity slider of a slice view then fades from the fused volume (1) to the MRI
    (0), in every view because they are linked. Returns the number of slice views set."""
    composites = sliceCompositeNodes(scene)
    for composite in composites:
        wasModified = composite.StartModify()
        composite.SetBackgroundVolumeID(mriNode.GetID() if mriNode is not None else None)
        composite.SetForegroundVolumeID(fusedNode.GetID())
        composite.SetForegroundOpacity(1.0)
        composite.SetLinkedControl(True)
        composite.EndModify(wasModified)
    return len(composites)


def classicOverlayColorNodeID(scene, otherNode, functional: bool) -> str | None:
    """Colour node for the classic overlay: Slicer's PET-Heat for a scalar PET/SPECT (when the scene has
    it), None (keep the volume's own colours) for a CT or an RGB volume."""
    if not functional or otherNode.GetClassName() != mrml.SCALAR_CLASS:
        return None
    return PET_HEAT_COLOR_NODE_ID if scene.GetNodeByID(PET_HEAT_COLOR_NODE_ID) is not None else None


def showClassicOverlay(scene, mriNode, otherNode, functional: bool, window: tuple[float, float] | None = None,
                       opacity: float = CLASSIC_OVERLAY_OPACITY) -> str | None:
    """The classic view for comparison: the other volume over the MRI, in every (linked) slice view.

    Background = MRI, foreground = the PET/SPECT/CT at ``opacity``. A scalar PET/SPECT is shown with
    Slicer's PET-Heat colour table and ``window`` (the window the fusion used, so both views show the
    same uptake range). Only display properties of the other volume change (its colour table and
    window/level), never its voxels, geometry or transform. Returns the colour node ID used (None:
    the volume's own colours)."""
    display = _ensureDisplayNode(otherNode)
    colorNodeID = classicOverlayColorNodeID(scene, otherNode, functional)
    if display is not None:
        if colorNodeID is not None:
            display.SetAndObserveColorNodeID(colorNodeID)
        if window is not None and window[1] > window[0] and otherNode.GetClassName() == mrml.SCALAR_CLASS:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    for composite in sliceCompositeNodes(scene):
        wasModified = composite.StartModify()
        composite.SetBackgroundVolumeID(mriNode.GetID())
        composite.SetForegroundVolumeID(otherNode.GetID())
        composite.SetForegroundOpacity(opacity)
        composite.SetLinkedControl(True)
        composite.EndModify(wasModified)
    return colorNodeID
