"""LightFusion Slicer module without the Slicer application: the MRML <-> SimpleITK bridge and
LightFusionLogic on a real vtkMRMLScene with real volume nodes (the ``slicer-core`` wheel).

Skipped as a whole when ``slicer`` cannot be imported. Most logic tests fuse with a tiny fake backend
(mean of the two inputs), so they check geometry, node classes, names and errors, not model quality;
one test runs a shipped model end to end on a small volume.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "LightFusion"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML (slicer-core wheel expected)", allow_module_level=True)
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from LightFusionSlicerLib import mrml  # noqa: E402


# --------------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture
def scene():
    """A fresh MRML scene, also set as slicer.mrmlScene (as in the application)."""
    previous = getattr(slicer, "mrmlScene", None)
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)
    slicer.mrmlScene = previous


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def ijk_to_ras(spacing=(0.9, 1.1, 2.5), origin=(12.0, -30.0, 7.5), angles=(0.25, -0.15, 0.4)) -> np.ndarray:
    """Oblique, anisotropic IJK->RAS."""
    m = np.eye(4)
    m[:3, :3] = rotation(*angles) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def add_volume(array, matrix=None, name="vol", class_name="vtkMRMLScalarVolumeNode"):
    return slicer.util.addVolumeFromArray(array, np.eye(4) if matrix is None else matrix, name=name,
                                          nodeClassName=class_name)


def node_matrix(node) -> np.ndarray:
    return mrml.ijkToRAS(node)


def blob(shape, dtype=np.float32, seed=0, scale=1000.0):
    """Smooth-ish positive test volume (K, J, I)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    values = scale * np.exp(-(i ** 2 + j ** 2 + k ** 2) * 2) + rng.uniform(0, scale * 0.05, shape)
    return values.astype(dtype)


def lps_of_ras(ras):
    return np.array([-ras[0], -ras[1], ras[2]])


# --------------------------------------------------------------------------------------------------
# bridge: MRML node -> SimpleITK image

def test_scalar_node_to_image_keeps_voxels_and_oblique_anisotropic_geometry(scene):
    array = blob((5, 6, 7), np.int16)
    matrix = ijk_to_ras()
    node = add_volume(array, matrix, "mri")
    image = mrml.imageFromVolumeNode(node)

    assert image.GetSize() == (7, 6, 5)
    assert image.GetNumberOfComponentsPerPixel() == 1
    assert np.array_equal(sitk.GetArrayFromImage(image), array)
    assert np.allclose(image.GetSpacing(), (0.9, 1.1, 2.5))
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        ras = matrix @ np.array([*ijk, 1.0])
        assert np.allclose(image.TransformIndexToPhysicalPoint(ijk), lps_of_ras(ras[:3]))
    # the node is untouched
    assert np.array_equal(slicer.util.arrayFromVolume(node), array)
    assert np.allclose(node_matrix(node), matrix)


def test_rgb_vector_node_to_image(scene):
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)
    node = add_volume(rgb, ijk_to_ras(), "pet_rgb", "vtkMRMLVectorVolumeNode")
    image = mrml.imageFromVolumeNode(node)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorUInt8
    assert np.array_equal(sitk.GetArrayFromImage(image), rgb)


def test_linear_parent_transform_is_applied_to_the_geometry(scene):
    matrix = ijk_to_ras()
    node = add_volume(blob((4, 5, 6)), matrix, "pet")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(0.1, 0.2, -0.3)
    to_parent[:3, 3] = (5.0, -2.0, 11.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())

    image = mrml.imageFromVolumeNode(node)
    world = to_parent @ matrix
    for ijk in [(0, 0, 0), (5, 4, 3)]:
        assert np.allclose(image.TransformIndexToPhysicalPoint(ijk), lps_of_ras((world @ [*ijk, 1.0])[:3]))
    assert np.allclose(node_matrix(node), matrix)  # the node's own geometry is not hardened


def test_non_linear_parent_transform_is_refused(scene):
    node = add_volume(blob((4, 5, 6)), ijk_to_ras(), "pet")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(mrml.VolumeNodeError, match="non-linear transform.*Harden"):
        mrml.imageFromVolumeNode(node)


def test_extent_start_is_folded_into_the_origin(scene):
    matrix = ijk_to_ras()
    node = add_volume(blob((4, 5, 6)), matrix, "cropped")
    node.GetImageData().SetExtent(2, 7, 1, 5, 3, 6)  # same dimensions, shifted index start
    image = mrml.imageFromVolumeNode(node)
    assert np.allclose(image.GetOrigin(), lps_of_ras((matrix @ [2, 1, 3, 1.0])[:3]))


@pytest.mark.parametrize("class_name", ["vtkMRMLLabelMapVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"])
def test_other_volume_classes_are_refused(scene, class_name):
    node = scene.AddNewNodeByClass(class_name, "odd")
    with pytest.raises(mrml.VolumeNodeError, match=class_name):
        mrml.checkInputVolumeNode(node, "MRI")


def test_multi_component_and_empty_volumes_are_refused(scene):
    four_d = add_volume(np.zeros((3, 4, 5, 6), np.float32), None, "series", "vtkMRMLVectorVolumeNode")
    with pytest.raises(mrml.VolumeNodeError, match="6 components.*3-D"):
        mrml.imageFromVolumeNode(four_d)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(mrml.VolumeNodeError, match="no voxels"):
        mrml.imageFromVolumeNode(empty)
    with pytest.raises(mrml.VolumeNodeError, match="no MRI volume"):
        mrml.checkInputVolumeNode(None, "MRI")


# --------------------------------------------------------------------------------------------------
# bridge: SimpleITK image -> MRML node

def test_image_to_node_round_trip_scalar_and_rgb(scene):
    matrix = ijk_to_ras(spacing=(0.5, 0.7, 3.0), angles=(0.5, 0.1, -0.7))
    source = add_volume(blob((6, 5, 4), np.float32), matrix, "src")
    image = mrml.imageFromVolumeNode(source)

    scalar = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scalar_out")
    mrml.updateVolumeNodeFromImage(scalar, image)
    assert np.allclose(node_matrix(scalar), matrix)
    assert np.array_equal(slicer.util.arrayFromVolume(scalar), slicer.util.arrayFromVolume(source))

    rgb = sitk.GetImageFromArray(np.random.default_rng(2).integers(0, 256, (6, 5, 4, 3)).astype(np.uint8),
                                 isVector=True)
    rgb.CopyInformation(image)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb_out")
    mrml.updateVolumeNodeFromImage(vector, rgb)
    assert vector.GetImageData().GetNumberOfScalarComponents() == 3
    assert vector.GetVoxelVectorType() == slicer.vtkMRMLVolumeNode.VoxelVectorTypeColorRGB
    assert np.allclose(node_matrix(vector), matrix)
    assert np.array_equal(slicer.util.arrayFromVolume(vector), sitk.GetArrayFromImage(rgb))

    with pytest.raises(mrml.VolumeNodeError, match="needs a vtkMRMLVectorVolumeNode"):
        mrml.updateVolumeNodeFromImage(scalar, rgb)


def test_geometry_conversion_is_exact_inverse():
    matrix = ijk_to_ras(spacing=(0.3, 1.7, 4.0), origin=(-100.0, 55.5, 3.25), angles=(1.0, -0.6, 2.2))
    origin, spacing, direction = mrml.geometryFromIJKToRAS(matrix)
    image = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    assert np.allclose(mrml.ijkToRASFromImage(image), matrix)
    with pytest.raises(mrml.VolumeNodeError, match="singular"):
        mrml.geometryFromIJKToRAS(np.diag([1.0, 0.0, 1.0, 1.0]))
