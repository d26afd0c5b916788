"""LightFusion Slicer module without the Slicer application: the MRML <-> SimpleITK bridge and
LightFusionLogic on a real vtkMRMLScene with real volume nodes (the ``slicer-core`` wheel).

Skipped as a whole when ``slicer`` cannot be imported. Most logic tests fuse with a tiny fake backend
(mean of the two inputs), so they check geometry, node classes, names and errors, not model quality;
one test runs a shipped model end to end on a small volume.
"""
from __future__ import annotations

import re
import sys
import types
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


# --------------------------------------------------------------------------------------------------
# LightFusionLogic (needs LightFusionLib.fusion)

try:
    from LightFusionLib import fusion as volume
except ImportError:  # the library's volume module is not there: the fusion tests skip, the rest runs
    volume = None
from LightFusionSlicerLib import logic as lf_logic  # noqa: E402
from LightFusionSlicerLib.logic import LightFusionInputError, LightFusionLogic  # noqa: E402
from stand_ins import MeanBackend  # noqa: E402


@pytest.fixture
def pair(scene):
    """Oblique anisotropic MRI, and a scalar PET on another (coarser, differently oriented) grid that
    covers it."""
    if volume is None:
        pytest.skip("LightFusionLib.fusion not available")
    mri_matrix = ijk_to_ras(spacing=(1.2, 1.0, 2.0), origin=(-10.0, -12.0, -8.0), angles=(0.2, -0.1, 0.3))
    mri = add_volume(blob((9, 12, 10), np.int16, seed=1), mri_matrix, "MRI")
    pet_matrix = ijk_to_ras(spacing=(2.0, 2.0, 2.5), origin=(-20.0, -20.0, -20.0), angles=(0.0, 0.0, 0.0))
    pet = add_volume(blob((18, 22, 22), np.float32, seed=2, scale=5.0), pet_matrix, "PET")
    return mri, pet


def snapshot(node):
    return slicer.util.arrayFromVolume(node).copy(), node_matrix(node), node.GetName(), node.GetTransformNodeID()


def assert_unchanged(node, before):
    array, matrix, name, transform = before
    assert np.array_equal(slicer.util.arrayFromVolume(node), array)
    assert np.allclose(node_matrix(node), matrix)
    assert node.GetName() == name and node.GetTransformNodeID() == transform


def test_pet_fusion_creates_rgb_vector_node_on_the_mri_grid(scene, pair):
    mri, pet = pair
    before_mri, before_pet = snapshot(mri), snapshot(pet)
    backend = MeanBackend()
    steps = []
    out = LightFusionLogic().process(mri, pet, task="pet-mri", backend=backend,
                                     progressCallback=lambda done, total: steps.append((done, total)))

    assert out.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert out.GetName() == "MRI_PET_fused"
    assert out.GetScene() is scene and scene.IsNodePresent(out)
    assert out.GetImageData().GetNumberOfScalarComponents() == 3
    assert out.GetVoxelVectorType() == slicer.vtkMRMLVolumeNode.VoxelVectorTypeColorRGB
    assert out.GetImageData().GetDimensions() == mri.GetImageData().GetDimensions()
    assert np.allclose(node_matrix(out), node_matrix(mri))
    rgb = slicer.util.arrayFromVolume(out)
    assert rgb.dtype == np.uint8 and rgb.shape == (9, 12, 10, 3) and rgb.max() > 0
    assert out.GetDisplayNode() is not None
    assert backend.calls > 0 and steps[-1] == (9, 9)  # axial planes of this MRI: its k axis
    assert_unchanged(mri, before_mri)
    assert_unchanged(pet, before_pet)


def test_ct_and_grayscale_fusion_give_scalar_nodes_with_window_level(scene, pair):
    mri, pet = pair
    ct = LightFusionLogic().process(mri, pet, task="ct-mri", backend=MeanBackend("ct-mri"))
    assert ct.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert np.allclose(node_matrix(ct), node_matrix(mri))
    values = slicer.util.arrayFromVolume(ct)
    display = ct.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert values.min() <= display.GetWindowLevelMin() < display.GetWindowLevelMax() <= values.max()

    gray = LightFusionLogic().process(mri, pet, task="pet-mri", colormap="none", backend=MeanBackend())
    assert gray.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert gray.GetName() == "MRI_PET_fused_1"  # unique names for repeated runs


def test_rgb_pet_input_gives_rgb_output(scene, pair):
    mri, _ = pair
    rgb = np.random.default_rng(3).integers(0, 256, (9, 12, 10, 3)).astype(np.uint8)
    pet_rgb = add_volume(rgb, node_matrix(mri), "PETrgb", "vtkMRMLVectorVolumeNode")
    out = LightFusionLogic().process(mri, pet_rgb, task="spect-mri", backend=MeanBackend("spect-mri"))
    assert out.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert np.allclose(node_matrix(out), node_matrix(mri))


@pytest.mark.parametrize("dtype, pixel_type", [(np.float32, "vector of 32-bit float"),
                                               (np.uint16, "vector of 16-bit unsigned integer")],
                         ids=["displacement-field", "16-bit-rgb"])
def test_colour_other_than_8bit_rgb_is_refused_naming_the_pixel_type(scene, pair, dtype, pixel_type):
    """LightFusionLib takes colour only as 8-bit RGB; the MRML bridge hands a vector node over with its
    own pixel type (no cast), so a 3-component float volume (a displacement field) or 16-bit RGB is
    refused in one line naming that type, and nothing is added to the scene."""
    mri, _ = pair
    rng = np.random.default_rng(7)
    values = rng.uniform(-5, 5, (9, 12, 10, 3)) if dtype == np.float32 else rng.integers(0, 65535, (9, 12, 10, 3))
    field = add_volume(values.astype(dtype), node_matrix(mri), "displacement PET", "vtkMRMLVectorVolumeNode")
    assert mrml.imageFromVolumeNode(field).GetPixelIDTypeAsString() == pixel_type  # kept as given
    before = snapshot(field)
    count = scene.GetNumberOfNodes()
    backend = MeanBackend()
    with pytest.raises(volume.VolumeError, match=f"3 components of type {pixel_type}.*8-bit RGB") as refused:
        LightFusionLogic().process(mri, field, task="pet-mri", backend=backend)
    assert "\n" not in str(refused.value)
    assert backend.calls == 0 and scene.GetNumberOfNodes() == count
    assert_unchanged(field, before)

    rgb = add_volume(rng.integers(0, 256, (9, 12, 10, 3)).astype(np.uint8), node_matrix(mri), "PET rgb",
                     "vtkMRMLVectorVolumeNode")
    out = LightFusionLogic().process(mri, rgb, task="pet-mri", backend=MeanBackend())  # 8-bit RGB still works
    assert out.GetClassName() == "vtkMRMLVectorVolumeNode" and scene.GetNumberOfNodes() > count


def test_input_warnings_are_kept_in_last_run_and_logged(scene, pair, caplog):
    """A PET covering 30% of the MRI (the MRI's grid shifted by 7 of its 10 columns): the library's
    coverage warning is in lastWarnings and lastRun['warnings'], and in the Python log."""
    import logging

    mri, _ = pair
    shifted = node_matrix(mri).copy()
    shifted[:3, 3] += 7 * shifted[:3, 0]  # 7 voxels along i
    partial = add_volume(blob((9, 12, 10), np.float32, seed=3, scale=5.0), shifted, "PET partial")
    logic = LightFusionLogic()
    with caplog.at_level(logging.WARNING):
        out = logic.process(mri, partial, backend=MeanBackend())
    assert out.GetScene() is scene
    assert "the PET volume covers only 30% of the MRI grid; the rest is fused with 0" in logic.lastWarnings
    assert logic.lastRun["warnings"] == logic.lastWarnings and logic.lastRun["outputNodeID"] == out.GetID()
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "covers only 30%" in r.getMessage()]
    assert len(logged) == 1 and logged[0].name.startswith("LightFusionLib")  # logged once, by the library

    with pytest.raises(LightFusionInputError):  # each run starts with no warnings
        logic.process(mri, partial, axis="oblique", backend=MeanBackend())
    assert logic.lastWarnings == []


def test_library_log_records_reach_the_application_handlers_on_the_calling_thread(scene, pair):
    """The volumes are prepared on a worker thread; what the library logs there is handed to the root
    logger's handlers (in Slicer: the error log and Python console, Qt objects of the main thread) by the
    calling thread."""
    import logging
    import threading

    mri, _ = pair
    shifted = node_matrix(mri).copy()
    shifted[:3, 3] += 7 * shifted[:3, 0]
    partial = add_volume(blob((9, 12, 10), np.float32, seed=3, scale=5.0), shifted, "PET partial")
    seen = []

    class Recorder(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage(), threading.current_thread() is threading.main_thread()))

    recorder = Recorder(logging.WARNING)
    logging.getLogger().addHandler(recorder)
    try:
        LightFusionLogic().process(mri, partial, backend=MeanBackend())
    finally:
        logging.getLogger().removeHandler(recorder)
    library = [entry for entry in seen if entry[0].startswith("LightFusionLib")]
    assert library and all(on_main for _, _, on_main in library)
    assert any("covers only 30%" in message for _, message, _ in library)
    assert logging.getLogger("LightFusionLib").propagate  # restored after the run


def test_given_output_node_is_reused_and_an_empty_one_gets_the_fused_name(scene, pair):
    mri, pet = pair
    logic = LightFusionLogic()
    first = logic.process(mri, pet, backend=MeanBackend())
    first.SetName("my fusion")
    count = scene.GetNumberOfNodes()
    again = logic.process(mri, pet, outputNode=first, backend=MeanBackend())
    assert again is first and again.GetName() == "my fusion"
    assert scene.GetNumberOfNodes() == count

    empty = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Volume")  # like "Create new volume"
    out = logic.process(mri, pet, outputNode=empty, backend=MeanBackend())
    assert out is empty and out.GetName().startswith("MRI_PET_fused")
    assert np.allclose(node_matrix(out), node_matrix(mri))


def test_output_node_of_the_wrong_class_is_refused_before_fusing(scene, pair):
    mri, pet = pair
    scalar = add_volume(np.ones((2, 2, 2), np.float32), None, "scalar_out")
    before = snapshot(scalar)
    backend = MeanBackend()
    with pytest.raises(LightFusionInputError, match="RGB volume"):
        LightFusionLogic().process(mri, pet, outputNode=scalar, task="pet-mri", backend=backend)
    assert backend.calls == 0
    assert_unchanged(scalar, before)


def test_cancel_leaves_no_node_and_the_output_untouched(scene, pair):
    mri, pet = pair
    logic = LightFusionLogic()
    count = scene.GetNumberOfNodes()
    with pytest.raises(volume.FusionCancelled):
        logic.process(mri, pet, backend=MeanBackend(), batchSize=2,
                      progressCallback=lambda done, total: logic.cancel())
    assert scene.GetNumberOfNodes() == count

    target = logic.process(mri, pet, backend=MeanBackend())
    before = snapshot(target)
    count = scene.GetNumberOfNodes()
    with pytest.raises(volume.FusionCancelled):
        logic.process(mri, pet, outputNode=target, backend=MeanBackend(), batchSize=2, cancelCallback=lambda: True)
    assert scene.GetNumberOfNodes() == count
    assert_unchanged(target, before)
    # a later run is not cancelled by the earlier request
    assert logic.process(mri, pet, outputNode=target, backend=MeanBackend()) is target


def test_input_errors(scene, pair):
    mri, pet = pair
    logic = LightFusionLogic()
    with pytest.raises(LightFusionInputError, match="no MRI volume"):
        logic.process(None, pet, backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="no PET/SPECT/CT volume"):
        logic.process(mri, None, backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="same node"):
        logic.process(mri, mri, backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="is one of the inputs"):
        logic.process(mri, pet, outputNode=mri, backend=MeanBackend())
    series = add_volume(np.ones((9, 12, 10, 5), np.float32), None, "series", "vtkMRMLVectorVolumeNode")
    with pytest.raises(mrml.VolumeNodeError, match="5 components"):
        logic.process(mri, series, backend=MeanBackend())
    rgb_mri = add_volume(np.ones((3, 4, 5, 3), np.uint8), None, "rgbMRI", "vtkMRMLVectorVolumeNode")
    with pytest.raises(LightFusionInputError, match="MRI volume .* must be a scalar volume"):
        logic.process(rgb_mri, pet, backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="unknown task"):
        logic.process(mri, pet, task="pet-ct", backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="unknown axis"):
        logic.process(mri, pet, axis="oblique", backend=MeanBackend())
    with pytest.raises(LightFusionInputError, match="no node named 'nope'"):
        logic.process("nope", pet, backend=MeanBackend())
    # the library's own checks surface as ValueError subclasses with their message
    flat = add_volume(np.full((9, 12, 10), 7, np.int16), node_matrix(mri), "flat")
    with pytest.raises(volume.VolumeError, match="constant"):
        logic.process(mri, flat, backend=MeanBackend())
    far = ijk_to_ras(origin=(5000.0, 5000.0, 5000.0))
    remote = add_volume(blob((4, 4, 4)), far, "remote")
    with pytest.raises(volume.VolumeError, match="do not overlap"):
        logic.process(mri, remote, backend=MeanBackend())
    assert [n.GetName() for n in slicer.util.getNodesByClass("vtkMRMLVectorVolumeNode", scene)] == ["series", "rgbMRI"]


def test_nodes_can_be_given_by_name(scene, pair):
    out = LightFusionLogic().process("MRI", "PET", backend=MeanBackend())
    assert out.GetName() == "MRI_PET_fused"


def test_linear_transforms_are_applied_and_the_output_follows_the_mri(scene, pair):
    mri, pet = pair
    mri_local = node_matrix(mri)
    shift = np.eye(4)
    shift[:3, :3] = rotation(0.0, 0.0, 0.3)
    shift[:3, 3] = (3.0, -4.0, 5.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MRI to world")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    mri.SetAndObserveTransformNodeID(transform.GetID())
    pet.SetAndObserveTransformNodeID(transform.GetID())  # same transform: same relative alignment

    out = LightFusionLogic().process(mri, pet, backend=MeanBackend())
    assert out.GetTransformNodeID() == transform.GetID()
    assert np.allclose(node_matrix(out), mri_local)
    assert np.allclose(node_matrix(mri), mri_local)  # not hardened

    untransformed = LightFusionLogic().process(mri, pet, backend=MeanBackend(), outputNode=None)
    moved = slicer.util.arrayFromVolume(untransformed)
    pet.SetAndObserveTransformNodeID(None)  # now the PET sits elsewhere relative to the MRI
    shifted = LightFusionLogic().process(mri, pet, backend=MeanBackend())
    assert not np.array_equal(slicer.util.arrayFromVolume(shifted), moved)

    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    pet.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(mrml.VolumeNodeError, match="non-linear"):
        LightFusionLogic().process(mri, pet, backend=MeanBackend())


def test_expected_output_class_and_missing_package_rules(monkeypatch):
    assert lf_logic.expectedOutputClass("pet-mri", None) == "vtkMRMLVectorVolumeNode"
    assert lf_logic.expectedOutputClass("spect-mri", "hot") == "vtkMRMLVectorVolumeNode"
    assert lf_logic.expectedOutputClass("pet-mri", "none") == "vtkMRMLScalarVolumeNode"
    assert lf_logic.expectedOutputClass("ct-mri", None) == "vtkMRMLScalarVolumeNode"
    installed = {"torch": False, "onnxruntime": True, "openvino": False}
    monkeypatch.setattr(lf_logic, "isInstalled", lambda name: installed[name])
    assert lf_logic.missingPackage("auto") is None
    assert lf_logic.missingPackage("torch") == "torch"
    assert lf_logic.missingPackage("onnx") is None
    # OpenVINO is optional: asked for, it is the package to install (not in requirements.txt)
    assert lf_logic.missingPackage("openvino") == "openvino"
    assert lf_logic.requirementFor("openvino") == "openvino"
    installed["onnxruntime"] = False
    # nothing installed: 'auto' offers the module's requirements.txt (ONNX Runtime, small, CPU);
    # PyTorch only when asked for (backend 'torch')
    assert lf_logic.missingPackage("auto") == "onnxruntime"
    assert lf_logic.requirementFor("onnxruntime") == "onnxruntime>=1.17"
    assert lf_logic.missingPackage("onnx") == "onnxruntime"
    assert lf_logic.missingPackage("torch") == "torch"


def test_models_and_sample_data_are_found_beside_the_library():
    assert lf_logic.modelsDir().resolve() == (REPO / "LightFusionLib" / "Resources" / "Models").resolve() or \
        "LIGHTFUSION_MODELS" in __import__("os").environ
    assert lf_logic.sampleDataDir() == REPO / "LightFusionLib" / "Resources" / "SampleData"


def test_sample_pair_lookup(tmp_path):
    for name in ("mni152-t1.nrrd", "mni152-fdg-pet-sim.nrrd", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert lf_logic.findSamplePair(tmp_path) == (tmp_path / "mni152-t1.nrrd", tmp_path / "mni152-fdg-pet-sim.nrrd",
                                                 "pet-mri")
    for path in tmp_path.iterdir():
        path.unlink()
    for name in ("case1_MRI_T1.nrrd", "case1_PET.nii.gz", "case1_CT.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert lf_logic.findSamplePair(tmp_path) == (tmp_path / "case1_MRI_T1.nrrd", tmp_path / "case1_PET.nii.gz",
                                                 "pet-mri")
    (tmp_path / "case1_PET.nii.gz").unlink()
    assert lf_logic.findSamplePair(tmp_path)[2] == "ct-mri"
    with pytest.raises(LightFusionInputError, match="no sample MRI"):
        lf_logic.findSamplePair(tmp_path / "missing")


def test_load_volume_file_round_trip(scene, tmp_path):
    """Loaded as Slicer loads files: a storage node on the file (so the scene can be saved) and a display
    node; voxels and geometry as in the file."""
    image = sitk.GetImageFromArray(blob((4, 5, 6), np.int16))
    origin, spacing, direction = mrml.geometryFromIJKToRAS(ijk_to_ras())
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "brain_mri.nrrd"))
    node = LightFusionLogic.loadVolumeFile(tmp_path / "brain_mri.nrrd")
    assert node.GetName() == "brain_mri" and node.GetClassName() == "vtkMRMLScalarVolumeNode"
    storage = node.GetStorageNode()
    assert storage is not None and storage.GetClassName() == "vtkMRMLVolumeArchetypeStorageNode"
    assert Path(storage.GetFileName()) == tmp_path / "brain_mri.nrrd"
    assert node.GetDisplayNode() is not None
    with pytest.raises(LightFusionInputError, match="no such file"):
        LightFusionLogic.loadVolumeFile(tmp_path / "missing.nrrd")
    assert np.allclose(node_matrix(node), ijk_to_ras(), atol=1e-5)
    assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))


def test_shipped_model_end_to_end_on_cpu(scene, pair):
    """The real path: shipped pet-mri model, torch (or ONNX Runtime) on the CPU, cached backend."""
    if not (lf_logic.isInstalled("torch") or lf_logic.isInstalled("onnxruntime")):
        pytest.skip("no inference backend installed")
    mri, pet = pair
    logic = LightFusionLogic()
    out = logic.process(mri, pet, task="pet-mri", device="cpu")
    assert out.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert np.allclose(node_matrix(out), node_matrix(mri))
    assert slicer.util.arrayFromVolume(out).shape == (9, 12, 10, 3)
    assert logic.lastRun["device"].endswith("cpu") and logic.lastRun["seconds"] > 0
    assert logic.lastRun["outputNodeID"] == out.GetID()
    backend = logic.getBackend("pet-mri", device="cpu")
    assert logic.getBackend("pet-mri", device="cpu") is backend  # cached between runs


def test_guess_inputs_by_name(scene):
    assert lf_logic.guessInputs(scene) == (None, None)
    add_volume(np.ones((2, 2, 2)), None, "Segmentation-label", "vtkMRMLLabelMapVolumeNode")
    t1 = add_volume(np.ones((2, 2, 2)), None, "sub01_T1w")
    pet = add_volume(np.ones((2, 2, 2, 3), np.uint8), None, "sub01 PET (RGB)", "vtkMRMLVectorVolumeNode")
    assert lf_logic.guessInputs(scene) == (t1, pet)


def write_sample_pair(folder):
    """A small pair laid out like Resources/SampleData (RAS-stored uint8 T1, float SUV PET on another grid)."""
    mri = sitk.GetImageFromArray(blob((12, 14, 11), np.uint8, seed=4, scale=200.0))
    mri.SetSpacing((1.5, 1.5, 1.5))
    mri.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    mri.SetOrigin((8.0, 10.0, -9.0))
    pet = sitk.GetImageFromArray(blob((10, 12, 12), np.float32, seed=5, scale=9.0))
    pet.SetSpacing((2.5, 2.5, 3.0))
    pet.SetOrigin((-15.0, -15.0, -15.0))
    sitk.WriteImage(mri, str(folder / "mni152-t1.nrrd"), useCompression=True)
    sitk.WriteImage(pet, str(folder / "mni152-fdg-pet-sim.nrrd"), useCompression=True)
    return mri


def test_load_sample_data_and_fuse(scene, tmp_path):
    if volume is None:
        pytest.skip("LightFusionLib.fusion not available")
    reference = write_sample_pair(tmp_path)
    logic = LightFusionLogic()
    mri, pet, task = logic.loadSampleData(folder=tmp_path)
    assert (mri.GetName(), pet.GetName(), task) == ("mni152-t1", "mni152-fdg-pet-sim", "pet-mri")
    assert [Path(n.GetStorageNode().GetFileName()).name for n in (mri, pet)] == ["mni152-t1.nrrd",
                                                                                 "mni152-fdg-pet-sim.nrrd"]
    assert mri.GetClassName() == pet.GetClassName() == "vtkMRMLScalarVolumeNode"
    image = mrml.imageFromVolumeNode(mri)
    assert np.allclose(image.GetDirection(), reference.GetDirection())
    assert np.allclose(image.GetOrigin(), reference.GetOrigin())
    assert logic.loadSampleData(folder=tmp_path)[:2] == (mri, pet)  # loaded once, then reused
    out = logic.process(mri, pet, task=task, backend=MeanBackend())
    assert out.GetName() == "mni152-t1_mni152-fdg-pet-sim_fused"
    assert np.allclose(node_matrix(out), node_matrix(mri))


def test_bundled_sample_data_loads_if_present(scene):
    folder = lf_logic.sampleDataDir()
    try:
        lf_logic.findSamplePair(folder)
    except LightFusionInputError:
        pytest.skip(f"no sample volumes in {folder} yet")
    mri, other, task = LightFusionLogic().loadSampleData()
    assert mri.GetClassName() == "vtkMRMLScalarVolumeNode" and task in lf_logic.TASKS
    assert mri.GetImageData().GetNumberOfPoints() > 0 and other.GetImageData().GetNumberOfPoints() > 0


# --------------------------------------------------------------------------------------------------
# the bundled sample pair as a Sample Data source

def test_sample_data_source_for_the_sample_data_module(tmp_path):
    import hashlib

    write_sample_pair(tmp_path)
    source = lf_logic.sampleDataSource(tmp_path)
    assert source["category"] == "LightFusion" and source["sampleName"] == "LightFusion PET-MRI"
    assert source["fileNames"] == ["mni152-t1.nrrd", "mni152-fdg-pet-sim.nrrd"]
    assert source["nodeNames"] == ["mni152-t1", "mni152-fdg-pet-sim"]
    assert source["uris"] == [(tmp_path / name).resolve().as_uri() for name in source["fileNames"]]
    assert source["checksums"] == [f"SHA256:{hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()}"
                                   for n in source["fileNames"]]
    assert lf_logic.sampleFolderFromSource(types.SimpleNamespace(uris=source["uris"])) == tmp_path.resolve()
    with pytest.raises(LightFusionInputError, match="no sample MRI"):
        lf_logic.sampleDataSource(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# parameter node and preselection (the raw vtkMRMLScriptedModuleNode; the widget wraps it)

def test_parameter_node_is_one_singleton_per_scene(scene):
    logic = LightFusionLogic()
    node = logic.getParameterNode()
    assert node.GetClassName() == "vtkMRMLScriptedModuleNode" and node.GetAttribute("ModuleName") == "LightFusion"
    assert LightFusionLogic().getParameterNode() is node
    scene.Clear(0)  # a closed scene resets the singleton (and what it remembered)
    assert logic.getParameterNode() is node and node.GetAttribute("ModuleName") == "LightFusion"


def test_preselection_offers_each_volume_once_and_respects_a_cleared_selector(scene):
    node = LightFusionLogic().getParameterNode()
    assert lf_logic.inputsToPreselect(scene, node, None, None) == (None, None)
    t1 = add_volume(np.ones((2, 2, 2)), None, "sub01_T1w")
    pet = add_volume(np.ones((2, 2, 2)), None, "sub01 FDG PET")
    assert lf_logic.inputsToPreselect(scene, node, None, None) == (t1, pet)
    # the user cleared both selectors: entering the module again does not put them back
    assert lf_logic.inputsToPreselect(scene, node, None, None) == (None, None)
    # a volume loaded later is offered (once)
    t2 = add_volume(np.ones((2, 2, 2)), None, "sub02_T2")
    assert lf_logic.inputsToPreselect(scene, node, None, pet) == (t2, None)
    assert lf_logic.inputsToPreselect(scene, node, None, pet) == (None, None)
    # what the user selected by hand counts as seen too
    ct = add_volume(np.ones((2, 2, 2)), None, "CT head")
    lf_logic.rememberSelection(node, ct)
    assert lf_logic.inputsToPreselect(scene, node, t1, None) == (None, None)


# --------------------------------------------------------------------------------------------------
# registration transforms: SimpleITK (ITK: MRI -> other points, LPS) <-> Slicer transform node

def euler(seed=0):
    rng = np.random.default_rng(seed)
    return sitk.Euler3DTransform(tuple(rng.uniform(-20, 20, 3)), *rng.uniform(-0.3, 0.3, 3), tuple(rng.uniform(-15, 15, 3)))


def affine(seed=1):
    rng = np.random.default_rng(seed)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((np.eye(3) + rng.uniform(-0.1, 0.1, (3, 3))).ravel()))
    transform.SetTranslation(tuple(rng.uniform(-10, 10, 3)))
    transform.SetCenter(tuple(rng.uniform(-30, 30, 3)))
    return transform


def node_points_in_world(node, transform_node=None):
    """World RAS positions of some of ``node``'s voxel centres when it is placed under ``transform_node``
    (Slicer's own transform pipeline: the node's transform to world)."""
    dims = node.GetImageData().GetDimensions()
    ijk = np.array([[0, 0, 0], [dims[0] - 1, 0, 0], [0, dims[1] - 1, dims[2] - 1], [dims[0] // 2, 1, dims[2] - 1]],
                   float)
    local = (node_matrix(node) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    if transform_node is None:
        return local, local
    to_world = vtk.vtkGeneralTransform()
    transform_node.GetTransformToWorld(to_world)
    return local, np.array([to_world.TransformPoint(p) for p in local])


@pytest.mark.parametrize("make", [euler, affine], ids=["rigid", "affine"])
@pytest.mark.parametrize("other_parent", [False, True], ids=["other-at-world", "other-under-a-transform"])
def test_registration_transform_node_puts_the_other_volume_where_simpleitk_maps_it(scene, make, other_parent):
    """ITK's transform maps MRI points (LPS) to the other volume's. The transform node, with the other
    volume under it, must place each voxel of the other volume at the MRI point that the ITK transform
    maps onto that voxel: T(LPS(world)) == LPS(where the voxel was), within 1e-6 mm. With a parent
    transform already on the other volume, the node composes it (the other volume goes under the node
    instead of its old parent)."""
    transform = make()
    other = add_volume(blob((5, 6, 7)), ijk_to_ras(), "PET")
    if other_parent:
        parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "scanner shift")
        shift = np.eye(4)
        shift[:3, :3] = rotation(0.05, -0.1, 0.2)
        shift[:3, 3] = (7.0, -3.0, 12.0)
        parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        other.SetAndObserveTransformNodeID(parent.GetID())
    shown_before = node_points_in_world(other, other.GetParentTransformNode())[1]  # where Slicer shows it now

    node = mrml.transformNodeFromRegistration(scene, transform, other, "PET_to_MRI")
    assert node.GetClassName() == "vtkMRMLLinearTransformNode" and node.IsLinear()
    assert other.GetTransformNodeID() == (parent.GetID() if other_parent else None)  # the input is not moved
    _, registered = node_points_in_world(other, node)
    for world_before, world_after in zip(shown_before, registered):
        back = transform.TransformPoint(tuple(lps_of_ras(world_after)))  # MRI point -> other point (ITK)
        assert np.allclose(back, lps_of_ras(world_before), rtol=0, atol=1e-6)
    if not other_parent:  # exactly the registration: "from parent" = the ITK matrix in RAS
        from_parent = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromParent(from_parent)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        assert np.allclose(slicer.util.arrayFromVTKMatrix(from_parent), lps @ mrml.matrixFromITKTransform(transform) @ lps,
                           atol=1e-12)


@pytest.mark.parametrize("make", [euler, affine], ids=["rigid", "affine"])
def test_slicer_saves_the_transform_node_as_the_registration_itk_transform(scene, tmp_path, make):
    """Saved by Slicer's own transform writer (vtkMRMLTransformStorageNode, vtkITKTransformConverter),
    the node is an ITK transform file that maps points exactly as the registration's SimpleITK transform:
    the same file `lightfusion fuse --save-transform` writes, up to the transform class."""
    transform = make()
    other = add_volume(blob((3, 4, 5)), ijk_to_ras(), "PET")
    node = mrml.transformNodeFromRegistration(scene, transform, other, "PET_to_MRI")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "PET_to_MRI.tfm"))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.WriteData(node)
    saved = sitk.ReadTransform(str(tmp_path / "PET_to_MRI.tfm"))
    for point in ((0.0, 0.0, 0.0), (35.0, -20.0, 60.0), (-80.0, 45.0, -15.0)):
        assert np.allclose(saved.TransformPoint(point), transform.TransformPoint(point), rtol=0, atol=1e-6)


def test_the_itk_matrix_is_read_from_any_linear_transform_and_nonlinear_ones_are_refused():
    for transform in (euler(), affine(), sitk.CompositeTransform([euler(2), affine(3)]), sitk.Transform(3, sitk.sitkIdentity)):
        matrix = mrml.matrixFromITKTransform(transform)
        for point in ((1.0, 2.0, 3.0), (-40.0, 25.0, 90.0)):
            assert np.allclose(transform.TransformPoint(point), (matrix @ [*point, 1.0])[:3], atol=1e-9)
    bspline = sitk.BSplineTransformInitializer(sitk.Image([8, 8, 8], sitk.sitkFloat32), [3, 3, 3])
    params = np.array(bspline.GetParameters())
    params[::7] = 5.0
    bspline.SetParameters(tuple(params))
    with pytest.raises(mrml.VolumeNodeError, match="not linear"):
        mrml.matrixFromITKTransform(bspline)


# --------------------------------------------------------------------------------------------------
# "register first" in LightFusionLogic.process

def fake_register(monkeypatch, transform, fail=None, before=0.25, after=0.75, on_level=None):
    from LightFusionLib import registration

    calls = []

    def register(mri, other, kind="rigid", progress=None, **kwargs):
        calls.append((kind, mri.GetSize(), other.GetSize()))
        for level in range(3):
            if progress is not None:
                progress(level, 3)
            if on_level is not None:
                on_level(level)
        if fail is not None:
            raise fail
        return registration.RegistrationResult(transform=transform, kind=kind, measure_before=before,
                                               measure_after=after, seconds=0.01)

    monkeypatch.setattr(registration, "register", register)
    return calls


def small_shift(dx=2.0, dy=-1.5, dz=1.0, angle=0.03):
    return sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, angle, (dx, dy, dz))


def test_register_first_adds_the_transform_node_and_fuses_through_it(scene, pair, monkeypatch):
    mri, pet = pair
    before_mri, before_pet = snapshot(mri), snapshot(pet)
    transform = small_shift()
    calls = fake_register(monkeypatch, transform)
    stages = []
    logic = LightFusionLogic()
    out = logic.process(mri, pet, backend=MeanBackend(), registration="rigid",
                        statusCallback=lambda stage, **info: stages.append((stage, info)))
    assert [c[0] for c in calls] == ["rigid"]
    node = scene.GetFirstNodeByName("PET_to_MRI")
    assert node is not None and node.GetClassName() == "vtkMRMLLinearTransformNode"
    assert logic.lastRun["transformNodeID"] == node.GetID() and logic.lastRun["registration"] == "rigid"
    assert (logic.lastRun["measureBefore"], logic.lastRun["measureAfter"]) == (0.25, 0.75)
    assert ("registered", {"before": 0.25, "after": 0.75}) in stages
    assert [s for s, _ in stages if s == "registering"] and stages[-1][0] == "fusing"
    # the fused volume is on the MRI grid, and the inputs are untouched (the PET is not moved)
    assert out.GetImageData().GetDimensions() == mri.GetImageData().GetDimensions()
    assert np.allclose(node_matrix(out), node_matrix(mri))
    assert_unchanged(mri, before_mri)
    assert_unchanged(pet, before_pet)
    # the fusion used the transform: it equals fusing the PET placed under the transform node
    registered = slicer.util.arrayFromVolume(out).astype(int)
    pet.SetAndObserveTransformNodeID(node.GetID())
    moved = slicer.util.arrayFromVolume(LightFusionLogic().process(mri, pet, backend=MeanBackend())).astype(int)
    assert np.abs(registered - moved).max() <= 1
    pet.SetAndObserveTransformNodeID(None)
    unregistered = slicer.util.arrayFromVolume(LightFusionLogic().process(mri, pet, backend=MeanBackend())).astype(int)
    assert np.abs(registered - unregistered).max() > 1


def test_register_first_moves_the_other_volume_only_when_asked(scene, pair, monkeypatch):
    mri, pet = pair
    fake_register(monkeypatch, small_shift())
    LightFusionLogic().process(mri, pet, backend=MeanBackend(), registration="affine")
    assert pet.GetTransformNodeID() is None
    LightFusionLogic().process(mri, pet, backend=MeanBackend(), registration="affine", applyTransformToOther=True)
    second = scene.GetFirstNodeByName("PET_to_MRI_1")  # names made unique, the first one is kept
    assert second is not None and pet.GetTransformNodeID() == second.GetID()
    assert mri.GetTransformNodeID() is None


@pytest.mark.parametrize("how", ["registration fails", "cancelled while registering", "cancelled while fusing",
                                 "cancelled after the last batch", "scene closed while fusing"])
def test_a_failed_or_cancelled_registered_run_leaves_no_transform_node(scene, pair, monkeypatch, how):
    from LightFusionLib.registration import RegistrationError

    mri, pet = pair
    logic = LightFusionLogic()
    fake_register(monkeypatch, small_shift(),
                  fail=RegistrationError("the registration diverged") if how == "registration fails" else None,
                  on_level=(lambda level: logic.cancel()) if how == "cancelled while registering" else None)
    progress = None
    if how == "cancelled while fusing":
        progress = lambda done, total: logic.cancel()  # noqa: E731
    elif how == "cancelled after the last batch":
        progress = lambda done, total: done == total and logic.cancel()  # noqa: E731
    elif how == "scene closed while fusing":
        progress = lambda done, total: scene.Clear(0)  # noqa: E731
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")
    expected = RegistrationError if how == "registration fails" else volume.FusionCancelled
    with pytest.raises(expected):
        logic.process(mri, pet, backend=MeanBackend(), batchSize=3, registration="rigid", progressCallback=progress)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    if how == "scene closed while fusing":
        assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0
    else:
        assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == volumes
        assert pet.GetTransformNodeID() is None


def test_unknown_registration_kind_is_refused(scene, pair):
    mri, pet = pair
    with pytest.raises(LightFusionInputError, match="unknown registration 'elastic'; choose one of none, rigid, affine"):
        LightFusionLogic().process(mri, pet, backend=MeanBackend(), registration="elastic")


BT601_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def test_saturated_colour_mode_changes_the_colours_but_not_the_fused_luma(scene, pair):
    """colourMode='saturated' (LightFusionLib.colour.restore_colour) gives other colours than the
    default plain YUV, with the same BT.601 luma wherever the YUV result is not clipped (a channel at 0
    or 255 may have been clipped, which changes YUV's luma); the run record says which mode was used."""
    mri, pet = pair
    logic = LightFusionLogic()
    default = logic.process(mri, pet, task="pet-mri", backend=MeanBackend())
    assert logic.lastRun["colourMode"] == lf_logic.DEFAULT_COLOUR_MODE == "yuv"
    saturated = logic.process(mri, pet, task="pet-mri", backend=MeanBackend(), colourMode=" Saturated ")
    assert logic.lastRun["colourMode"] == "saturated" and logic.lastRun["outputNodeID"] == saturated.GetID()
    assert saturated.GetClassName() == default.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert np.allclose(node_matrix(saturated), node_matrix(default))
    yuv_rgb = slicer.util.arrayFromVolume(default).astype(np.float32)
    saturated_rgb = slicer.util.arrayFromVolume(saturated).astype(np.float32)
    assert (yuv_rgb != saturated_rgb).any(axis=-1).mean() > 0.1  # the colours differ on many voxels
    unclipped = ((yuv_rgb > 0) & (yuv_rgb < 255)).all(axis=-1)
    assert unclipped.sum() > 100
    luma_difference = np.abs(yuv_rgb @ BT601_LUMA - saturated_rgb @ BT601_LUMA)[unclipped]
    assert np.percentile(luma_difference, 99) <= 1.5, np.percentile(luma_difference, 99)
    # an explicit 'yuv' is the default
    again = logic.process(mri, pet, task="pet-mri", backend=MeanBackend(), colourMode="yuv")
    assert np.array_equal(slicer.util.arrayFromVolume(again), slicer.util.arrayFromVolume(default))
    assert logic.lastRun["colourMode"] == "yuv"


@pytest.mark.parametrize("task, colormap", [("ct-mri", None), ("pet-mri", "none")], ids=["ct", "grayscale-pet"])
def test_colour_mode_has_no_effect_on_a_grayscale_result(scene, pair, task, colormap):
    mri, pet = pair
    logic = LightFusionLogic()
    default = logic.process(mri, pet, task=task, colormap=colormap, backend=MeanBackend(task))
    saturated = logic.process(mri, pet, task=task, colormap=colormap, backend=MeanBackend(task), colourMode="saturated")
    assert saturated.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert np.array_equal(slicer.util.arrayFromVolume(saturated), slicer.util.arrayFromVolume(default))
    assert logic.lastRun["colourMode"] is None  # not used: the record does not claim a colouring


def test_unknown_colour_mode_is_refused_before_any_work(scene, pair):
    mri, pet = pair
    logic = LightFusionLogic()
    target = logic.process(mri, pet, backend=MeanBackend())
    before, count, run = snapshot(target), scene.GetNumberOfNodes(), dict(logic.lastRun)
    for outputNode in (None, target):
        backend = MeanBackend()
        with pytest.raises(LightFusionInputError, match=re.escape(
                f"unknown colour mode 'vivid'; choose one of {', '.join(lf_logic.COLOUR_MODES)}")) as refused:
            logic.process(mri, pet, outputNode=outputNode, backend=backend, colourMode="vivid")
        assert "\n" not in str(refused.value)
        assert backend.calls == 0 and scene.GetNumberOfNodes() == count
    assert_unchanged(target, before)
    assert logic.lastRun == run  # the last successful run is still the one recorded


def test_real_registration_recovers_a_known_move_of_the_sample_pet_through_the_panel_logic(scene):
    """LightFusionLib.registration itself (no stand-in) in process(): the bundled PET with its geometry
    moved by a known rigid transform S (no resampling: Slicer shows it at S(x)). The transform node left
    in the scene must undo S (node @ S = identity, within 2 mm over the head), and the fused volume is on
    the MRI grid."""
    try:
        lf_logic.findSamplePair(lf_logic.sampleDataDir())
    except LightFusionInputError:
        pytest.skip("no bundled sample volumes")
    logic = LightFusionLogic()
    mri, pet, task = logic.loadSampleData()
    move = np.eye(4)
    move[:3, :3] = rotation(0.06, -0.05, 0.09)
    move[:3, 3] = (6.0, -4.0, 5.0)
    moved = add_volume(slicer.util.arrayFromVolume(pet).copy(), move @ node_matrix(pet), "PET moved")
    stages = []
    out = logic.process(mri, moved, task=task, backend=MeanBackend(), registration="rigid",
                        statusCallback=lambda stage, **info: stages.append((stage, info)))
    node = scene.GetNodeByID(logic.lastRun["transformNodeID"])
    assert node.GetName() == "PET moved_to_mni152-t1"
    assert logic.lastRun["measureAfter"] > logic.lastRun["measureBefore"]
    residual = mrml.transformToParentMatrix(node) @ move
    for point in ((0.0, 0.0, 0.0), (60.0, -70.0, 40.0), (-60.0, 60.0, -30.0)):
        assert np.linalg.norm((residual - np.eye(4)) @ [*point, 1.0]) < 2.0
    assert [info["level"] for stage, info in stages if stage == "registering"][-1] == 3
    assert np.allclose(node_matrix(out), node_matrix(mri))


# --------------------------------------------------------------------------------------------------
# long runs: cancel at any time, the scene closed meanwhile, responsive while the model loads

def test_cancel_while_the_model_loads_is_immediate_and_the_load_is_kept(scene, pair, monkeypatch):
    import threading
    import time

    mri, pet = pair
    logic = LightFusionLogic()
    release = threading.Event()
    loads = []

    def slow_load(model, task, backend, device):
        loads.append(task)
        release.wait(10)
        return MeanBackend(task)

    monkeypatch.setattr("LightFusionLib.backends.load_backend", lambda model=None, task="pet-mri", backend="auto",
                        device="auto", **kw: slow_load(model, task, backend, device))
    idle = []
    started = time.perf_counter()
    with pytest.raises(volume.FusionCancelled, match="loading the model"):
        logic.process(mri, pet, idleCallback=lambda: idle.append(1) or (len(idle) == 3 and logic.cancel()))
    assert time.perf_counter() - started < 2.0 and len(idle) == 3
    release.set()
    for _ in range(100):  # the load finishes on its own thread and is cached for the next run
        if logic._backends:
            break
        time.sleep(0.02)
    out = logic.process(mri, pet)
    assert loads == ["pet-mri"] and out.GetScene() is scene


def test_scene_closed_while_the_model_loads_adds_nothing(scene, pair, monkeypatch):
    import time

    mri, pet = pair
    logic = LightFusionLogic()
    monkeypatch.setattr(logic, "getBackend", lambda *a, **k: time.sleep(1.0) or MeanBackend())
    closed = []
    with pytest.raises(volume.FusionCancelled):
        logic.process(mri, pet, idleCallback=lambda: closed or closed.append(scene.Clear(0)))
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0


def test_cancel_after_the_last_batch_still_counts(scene, pair):
    mri, pet = pair
    logic = LightFusionLogic()
    count = scene.GetNumberOfNodes()
    seen = []
    with pytest.raises(volume.FusionCancelled, match="after the last batch"):
        logic.process(mri, pet, backend=MeanBackend(), batchSize=100,  # one batch: it is the last
                      progressCallback=lambda done, total: seen.append((done, total)) or logic.cancel())
    assert seen == [(9, 9)] and scene.GetNumberOfNodes() == count


def test_an_input_removed_during_the_run_adds_nothing(scene, pair):
    mri, pet = pair
    count = scene.GetNumberOfNodes()
    with pytest.raises(volume.FusionCancelled, match="removed from the scene"):
        LightFusionLogic().process(mri, pet, backend=MeanBackend(), batchSize=100,
                                   progressCallback=lambda done, total: scene.RemoveNode(pet))
    assert scene.GetNumberOfNodes() == count - 1  # only the PET the "user" removed is gone


# --------------------------------------------------------------------------------------------------
# display: fused over the MRI in every linked view, classic overlay, window/level

def slice_views(scene):
    nodes = []
    for name in ("Red", "Yellow", "Green"):
        node = slicer.vtkMRMLSliceCompositeNode()
        node.SetSingletonTag(f"vtkMRMLSliceCompositeNode{name}")
        nodes.append(scene.AddNode(node))
    return nodes


def test_fused_rgb_volume_is_shown_over_the_mri_in_all_linked_views_with_its_exact_colours(scene, pair):
    from LightFusionSlicerLib import display
    from vtk.util.numpy_support import vtk_to_numpy

    views = slice_views(scene)
    mri, pet = pair
    logic = LightFusionLogic()
    out = logic.process(mri, pet, backend=MeanBackend())
    assert logic.showFusion()
    for view in views:
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (mri.GetID(), out.GetID())
        assert view.GetForegroundOpacity() == 1.0 and view.GetLinkedControl()
    # window 0-255: Slicer's vector display pipeline shows the computed colours unchanged
    shown = out.GetDisplayNode()
    assert not shown.GetAutoWindowLevel() and (shown.GetWindowLevelMin(), shown.GetWindowLevelMax()) == display.RGB_WINDOW
    shown.SetInputImageDataConnection(out.GetImageDataConnection())
    shown.UpdateImageDataPipeline()
    producer = shown.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(*slicer.util.arrayFromVolume(out).shape[:3], -1)
    assert np.array_equal(rgba[..., :3], slicer.util.arrayFromVolume(out))


def test_classic_overlay_uses_slicers_pet_colours_and_the_fusion_window(scene, pair):
    from LightFusionSlicerLib import display

    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    views = slice_views(scene)
    mri, pet = pair
    before = snapshot(pet)
    logic = LightFusionLogic()
    with pytest.raises(LightFusionInputError, match="run the fusion first"):
        logic.showClassicOverlay()
    out = logic.process(mri, pet, backend=MeanBackend())
    assert logic.showClassicOverlay() == display.PET_HEAT_COLOR_NODE_ID
    for view in views:
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (mri.GetID(), pet.GetID())
        assert view.GetForegroundOpacity() == display.CLASSIC_OVERLAY_OPACITY and view.GetLinkedControl()
    shown = pet.GetDisplayNode()
    assert shown.GetColorNodeID() == display.PET_HEAT_COLOR_NODE_ID
    low, high = logic.lastRun["otherWindow"]
    assert np.isclose(shown.GetWindowLevelMin(), low) and np.isclose(shown.GetWindowLevelMax(), high)
    assert_unchanged(pet, before)  # display only: voxels, geometry, name and transform unchanged
    assert logic.showFusion() and views[0].GetForegroundVolumeID() == out.GetID()
    # a CT keeps its own (grey) colours in the overlay
    ct = logic.process(mri, pet, task="ct-mri", backend=MeanBackend("ct-mri"))
    grey = pet.GetDisplayNode().GetColorNodeID()
    assert logic.showClassicOverlay() is None and pet.GetDisplayNode().GetColorNodeID() == grey
    assert ct.GetClassName() == "vtkMRMLScalarVolumeNode"


# --------------------------------------------------------------------------------------------------
# developer-mode Reload picks up edited library files

def test_reload_packages_makes_the_next_import_read_edited_files(tmp_path):
    """In a separate interpreter (this one keeps its modules): import both packages from a copy, edit a
    file of each, reloadPackages(), import again: the edits are there."""
    import shutil
    import subprocess
    import textwrap

    shutil.copytree(REPO / "LightFusionLib", tmp_path / "LightFusionLib",
                    ignore=shutil.ignore_patterns("Resources", "__pycache__"))
    shutil.copytree(REPO / "LightFusion" / "LightFusionSlicerLib", tmp_path / "LightFusionSlicerLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}]
        import LightFusionSlicerLib, LightFusionLib.tasks
        from LightFusionSlicerLib import logic
        old_logic, old_tasks = logic, LightFusionLib.tasks
        for path in ({str(tmp_path / "LightFusionLib" / "tasks.py")!r},
                     {str(tmp_path / "LightFusionSlicerLib" / "logic.py")!r}):
            with open(path, "a") as f:
                f.write("\\nRELOAD_PROBE = 42\\n")
        forgotten = LightFusionSlicerLib.reloadPackages()
        assert "LightFusionLib.tasks" in forgotten and "LightFusionSlicerLib.logic" in forgotten, forgotten
        import LightFusionLib.tasks
        from LightFusionSlicerLib import logic
        assert logic is not old_logic and LightFusionLib.tasks is not old_tasks
        assert logic.RELOAD_PROBE == 42 and LightFusionLib.tasks.RELOAD_PROBE == 42
        assert logic.FusionCancelled is sys.modules["LightFusionLib.errors"].FusionCancelled  # one consistent set
        print("reloaded", len(forgotten))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("reloaded")


# --------------------------------------------------------------------------------------------------
# DICOM export of a fused node (the same writer as `lightfusion fuse --format dicom`)

def test_fused_node_exports_as_a_dicom_series_on_the_mri_series_grid(scene, tmp_path):
    from stand_ins import PORCINE_MR

    if not PORCINE_MR.is_dir():
        pytest.skip("realdata not present")
    from LightFusionLib.volumeio import read_volume

    mri_image = read_volume(PORCINE_MR, "MRI")
    mri = scene.AddNewNodeByClass(mrml.SCALAR_CLASS, "T2")
    mrml.updateVolumeNodeFromImage(mri, mri_image)
    # A scalar 'fused' result on the MRI grid, under the same parent transform as the MRI: the series
    # must lie on the MRI series' own grid (file frame), not on the transformed one.
    fused_image = sitk.Cast(sitk.RescaleIntensity(mri_image, 0, 255), sitk.sitkUInt8)
    fused = scene.AddNewNodeByClass(mrml.SCALAR_CLASS, "T2_CT_fused")
    mrml.updateVolumeNodeFromImage(fused, fused_image)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    shift.SetMatrixTransformToParent(matrix)
    for node in (mri, fused):
        node.SetAndObserveTransformNodeID(shift.GetID())

    out = LightFusionLogic().exportDicomSeries(fused, mri, tmp_path / "series", sourceFiles=PORCINE_MR,
                                               task="ct-mri")
    back = read_volume(out, "fused series")
    assert back.GetSize() == mri_image.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), mri_image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetSpacing(), mri_image.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(fused_image))
    assert len(list(out.iterdir())) == mri_image.GetSize()[2]


def test_dicom_export_of_an_mri_not_from_dicom_is_refused(scene, tmp_path):
    mri = add_volume(blob((6, 8, 7)), name="MRI")
    with pytest.raises(LightFusionInputError, match="not loaded from DICOM"):
        LightFusionLogic().exportDicomSeries(mri, mri, tmp_path / "series")
    assert not (tmp_path / "series").exists()
