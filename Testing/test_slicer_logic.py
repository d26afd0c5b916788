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
    installed = {"torch": False, "onnxruntime": True}
    monkeypatch.setattr(lf_logic, "isInstalled", lambda name: installed[name])
    assert lf_logic.missingPackage("auto") is None
    assert lf_logic.missingPackage("torch") == "torch"
    assert lf_logic.missingPackage("onnx") is None
    installed["onnxruntime"] = False
    assert lf_logic.missingPackage("auto") == "torch"
    assert lf_logic.missingPackage("onnx") == "onnxruntime"


def test_models_and_sample_data_are_found_beside_the_library():
    assert lf_logic.modelsDir().resolve() == (REPO / "Resources" / "Models").resolve() or \
        "LIGHTFUSION_MODELS" in __import__("os").environ
    assert lf_logic.sampleDataDir() == REPO / "Resources" / "SampleData"


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
    image = sitk.GetImageFromArray(blob((4, 5, 6), np.int16))
    origin, spacing, direction = mrml.geometryFromIJKToRAS(ijk_to_ras())
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / "brain_mri.nrrd"))
    node = LightFusionLogic.loadVolumeFile(tmp_path / "brain_mri.nrrd")
    assert node.GetName() == "brain_mri" and node.GetClassName() == "vtkMRMLScalarVolumeNode"
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
