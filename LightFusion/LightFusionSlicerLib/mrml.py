"""MRML volume nodes <-> SimpleITK images, with the full geometry, in both directions.

Slicer keeps a volume's geometry in the node (``IJKToRAS``: origin, spacing and direction in RAS);
SimpleITK keeps it in the image, in LPS. With ``F = diag(-1, -1, 1)`` (RAS <-> LPS):

    IJKToRAS[:3, :3] = F @ direction @ diag(spacing)        IJKToRAS[:3, 3] = F @ origin

Voxel arrays are (K, J, I) for scalar volumes and (K, J, I, C) for vector volumes on both sides.

Parent transforms (a documented decision): a *linear* parent transform is applied to the geometry
(the voxels are not resampled: the image handed to the library carries the world IJK->RAS), so the
fusion sees both volumes where Slicer shows them. A *non-linear* transform cannot be expressed as
image geometry and is refused with a message that says how to harden it.

Nothing here imports Qt; input nodes are only read, never modified.
"""
from __future__ import annotations

import numpy as np

# Exact node classes accepted as inputs. Subclasses are not enough: in MRML a label map and a
# diffusion tensor volume are also vtkMRMLScalarVolumeNodes, and a DWI is a vtkMRMLVectorVolumeNode.
SCALAR_CLASS = "vtkMRMLScalarVolumeNode"
VECTOR_CLASS = "vtkMRMLVectorVolumeNode"

_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


class VolumeNodeError(ValueError):
    """A volume node that cannot be used as input or output; the message names the node."""


def nodeLabel(node) -> str:
    """'"MRHead" (vtkMRMLScalarVolumeNode1)' for messages."""
    return f'"{node.GetName()}" ({node.GetID()})' if node.GetID() else f'"{node.GetName()}"'


def _matrixToArray(vtkMatrix) -> np.ndarray:
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _arrayToMatrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRAS(node) -> np.ndarray:
    """The node's own (local) IJK->RAS 4x4 matrix, ignoring parent transforms."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrixToArray(matrix)


def parentTransformToWorld(node) -> np.ndarray | None:
    """4x4 matrix of the node's parent transform chain, None if it has none.

    Raises VolumeNodeError for a non-linear transform (grid, B-spline, thin-plate spline...)."""
    import vtk

    transform = node.GetParentTransformNode()
    if transform is None:
        return None
    if not transform.IsTransformToWorldLinear():
        raise VolumeNodeError(
            f"volume {nodeLabel(node)} is under the non-linear transform \"{transform.GetName()}\", which "
            "LightFusion cannot apply as geometry. Harden it first (Data module: right-click the volume > "
            "Harden transform), which resamples the volume, then run the fusion again.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _matrixToArray(matrix)


def worldIJKToRAS(node) -> np.ndarray:
    """IJK->RAS with a linear parent transform applied (see the module docstring)."""
    local = ijkToRAS(node)
    toWorld = parentTransformToWorld(node)
    return local if toWorld is None else toWorld @ local


def geometryFromIJKToRAS(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """4x4 IJK->RAS -> SimpleITK (origin, spacing, direction) in LPS."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear = matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(linear)) < 1e-12:
        raise VolumeNodeError(f"IJK to RAS matrix is singular (voxel spacing {spacing.tolist()})")
    direction = _RAS_LPS @ (linear / spacing)
    origin = _RAS_LPS @ matrix[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def ijkToRASFromImage(image) -> np.ndarray:
    """SimpleITK image geometry -> 4x4 IJK->RAS matrix."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = _RAS_LPS @ direction @ np.diag(spacing)
    matrix[:3, 3] = _RAS_LPS @ np.array(image.GetOrigin(), dtype=np.float64)
    return matrix


def checkInputVolumeNode(node, role: str = "input") -> None:
    """Raise VolumeNodeError unless ``node`` is a usable 3-D scalar or RGB volume."""
    if node is None:
        raise VolumeNodeError(f"no {role} volume selected")
    className = node.GetClassName()
    if className not in (SCALAR_CLASS, VECTOR_CLASS):
        raise VolumeNodeError(
            f"{role} volume {nodeLabel(node)} is a {className}; LightFusion takes scalar volumes "
            f"({SCALAR_CLASS}) or RGB vector volumes ({VECTOR_CLASS})")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise VolumeNodeError(f"{role} volume {nodeLabel(node)} has no voxels")
    components = image.GetNumberOfScalarComponents()
    if className == VECTOR_CLASS and components not in (1, 3):
        raise VolumeNodeError(
            f"{role} volume {nodeLabel(node)} has {components} components per voxel (a 4-D or multi-frame "
            "volume?); LightFusion needs a 3-D volume: scalar, or RGB with 3 components")
    if className == SCALAR_CLASS and components != 1:
        raise VolumeNodeError(f"{role} volume {nodeLabel(node)} has {components} components per voxel")


def voxelArray(node) -> np.ndarray:
    """A copy of the node's voxels: (K, J, I) scalar or (K, J, I, 3) RGB."""
    image = node.GetImageData()
    import vtk.util.numpy_support as numpy_support

    dims = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return np.array(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape), copy=True)


def imageFromVolumeNode(node, role: str = "input", world: bool = True):
    """Copy a scalar or RGB volume node into a SimpleITK image with its world geometry (``world``
    False: its own geometry, without parent transforms, i.e. in the frame of the file it came from).

    The node is not modified. A nonzero vtkImageData extent start is folded into the origin.
    """
    import SimpleITK as sitk

    checkInputVolumeNode(node, role)
    array = voxelArray(node)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    matrix = worldIJKToRAS(node) if world else ijkToRAS(node)
    extent = node.GetImageData().GetExtent()
    start = np.array([extent[0], extent[2], extent[4], 1.0])
    if np.any(start[:3]):
        matrix = matrix.copy()
        matrix[:, 3] = matrix @ start
    try:
        origin, spacing, direction = geometryFromIJKToRAS(matrix)
    except VolumeNodeError as exc:
        raise VolumeNodeError(f"{role} volume {nodeLabel(node)}: {exc}") from None
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def isRGBImage(image) -> bool:
    return image.GetNumberOfComponentsPerPixel() == 3


def outputClassForImage(image) -> str:
    """vtkMRMLVectorVolumeNode for 3-component images, vtkMRMLScalarVolumeNode for scalar ones."""
    components = image.GetNumberOfComponentsPerPixel()
    if components == 3:
        return VECTOR_CLASS
    if components == 1:
        return SCALAR_CLASS
    raise VolumeNodeError(f"cannot store an image with {components} components per voxel")


def updateVolumeNodeFromImage(node, image, ijkToRASMatrix: np.ndarray | None = None) -> None:
    """Set the node's voxels and geometry from a SimpleITK image (deep copy).

    ``ijkToRASMatrix`` overrides the image's own geometry (used to put the output in the MRI's local
    frame when the MRI has a linear parent transform). RGB images are tagged as colour.
    """
    import SimpleITK as sitk
    import slicer

    expected = outputClassForImage(image)
    if node.GetClassName() != expected:
        raise VolumeNodeError(
            f"output volume {nodeLabel(node)} is a {node.GetClassName()} but the result needs a {expected}")
    if image.GetDimension() != 3:
        raise VolumeNodeError(f"result image is {image.GetDimension()}-D, expected 3-D")
    array = sitk.GetArrayFromImage(image)
    matrix = ijkToRASFromImage(image) if ijkToRASMatrix is None else np.asarray(ijkToRASMatrix, dtype=np.float64)
    wasModifying = node.StartModify()
    try:
        node.SetIJKToRASMatrix(_arrayToMatrix(matrix))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        if expected == VECTOR_CLASS and hasattr(node, "SetVoxelVectorType"):
            node.SetVoxelVectorType(slicer.vtkMRMLVolumeNode.VoxelVectorTypeColorRGB)
    finally:
        node.EndModify(wasModifying)


# --------------------------------------------------------------------------------------------------
# Transforms: SimpleITK (ITK convention) <-> MRML transform nodes
#
# An ITK transform from a registration maps *fixed* (MRI) physical points to *moving* (other volume)
# points, in LPS: the "resampling" direction. A Slicer transform node that moves the other volume onto
# the MRI maps the other's points to the MRI's, in RAS: its "to parent" transform is the inverse, and
# its "from parent" transform is the ITK transform with LPS <-> RAS applied on both sides
# (F @ M @ F, F = diag(-1, -1, 1, 1)). This is how Slicer itself reads an ITK .tfm into a transform
# node (vtkITKTransformConverter; Slicer developer guide, "Transforms").

_RAS_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def matrixFromITKTransform(transform) -> np.ndarray:
    """4x4 matrix ``M`` of a linear SimpleITK transform (``T(x) = M @ [x, 1]``, LPS).

    Read from the transform itself (its action on the origin and the unit vectors), so it works for
    any linear kind (Euler3D, Similarity3D, Affine, a composite of them...). Raises VolumeNodeError
    for a transform that is not linear."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, 3] = origin
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.array(transform.TransformPoint(unit), dtype=np.float64) - origin
    for point in ((120.5, -80.25, 60.0), (-200.0, 150.0, -90.5), (33.0, 250.0, 175.0)):
        expected = matrix[:3, :3] @ np.array(point) + origin
        if not np.allclose(transform.TransformPoint(point), expected, rtol=0.0, atol=1e-6):
            raise VolumeNodeError(f"the transform ({transform.GetName()}) is not linear; LightFusion stores only "
                                  "linear (rigid or affine) transforms")
    return matrix


def fromParentMatrixFromITKTransform(transform) -> np.ndarray:
    """The ITK transform (fixed -> moving points, LPS) as a Slicer "from parent" matrix (RAS)."""
    return _RAS_LPS_4 @ matrixFromITKTransform(transform) @ _RAS_LPS_4


def transformNodeFromRegistration(scene, transform, movingNode, name: str):
    """A new ``vtkMRMLLinearTransformNode`` that puts ``movingNode`` where ``transform`` aligns it.

    ``transform`` is a registration result in ITK's convention, found on the volumes' world
    geometry (the images from :func:`imageFromVolumeNode`): it maps fixed (MRI) world points to
    ``movingNode``'s world points, LPS. The node holds the transform from ``movingNode``'s *local*
    coordinates to the MRI's world: the registration composed with ``movingNode``'s current linear
    parent transform, if it has one. So placing ``movingNode`` under the node (instead of its current
    parent) shows it registered; without a parent transform the node is exactly the registration
    (its "from parent" matrix is the ITK matrix in RAS). ``movingNode`` is not changed.
    """
    fromParent = fromParentMatrixFromITKTransform(transform)  # MRI world RAS -> moving world RAS
    parentToWorld = parentTransformToWorld(movingNode)
    if parentToWorld is not None:  # moving local -> moving world -> MRI world
        fromParent = np.linalg.inv(parentToWorld) @ fromParent
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformFromParent(_arrayToMatrix(fromParent))
    return node


def transformToParentMatrix(transformNode) -> np.ndarray:
    """4x4 "to parent" matrix of a linear transform node."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToParent(matrix)
    return _matrixToArray(matrix)
