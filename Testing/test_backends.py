"""Backend choice and half precision: fp16 is offered only where it is fast and within 1 grey level."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from LightFusionLib.backends import BackendUnavailable, load_backend  # noqa: E402
from LightFusionLib.demo import sample_paths  # noqa: E402
from LightFusionLib.models import load_model  # noqa: E402
from LightFusionLib.volume import PlaneGrid, prepare_pair, read_volume  # noqa: E402


def sample_planes(count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``count`` axial planes through the middle of the bundled PET/MRI pair, on the 256 net grid:
    two (count, 256, 256) float32 stacks in [0, 1]."""
    mri_path, pet_path = sample_paths()
    pair = prepare_pair(read_volume(mri_path), read_volume(pet_path), "pet-mri")
    mid = pair.mri.shape[0] // 2
    mri = pair.mri[mid - count // 2: mid + count - count // 2]
    rgb, y = pair.other_colour(pair.other[mid - count // 2: mid + count - count // 2])
    spacing = pair.reference.GetSpacing()
    grid = PlaneGrid(mri.shape[1:], (spacing[1], spacing[0]))
    return np.clip(grid.to_net(mri), 0, 1), np.clip(grid.to_net(y / 255), 0, 1)


def test_half_precision_stays_within_one_grey_level():
    # Measured here on the CPU, where torch emulates fp16 (slowly); CUDA computes the same format.
    net, _ = load_model(None, "pet-mri")
    mri, pet = (torch.from_numpy(a)[:, None] for a in sample_planes())
    with torch.inference_mode():
        full = net(mri, pet).numpy() * 255
        half = net.half()(mri.half(), pet.half()).float().numpy() * 255
    assert full.std() > 10  # real anatomy, not a blank plane
    difference = np.abs(half - full)
    assert difference.max() < 1.0
    assert np.mean(np.rint(half) != np.rint(full)) < 0.1


@pytest.mark.parametrize("backend, device", [("torch", "cpu"), ("onnx", "cpu"), ("auto", "cpu")])
def test_half_precision_is_refused_off_cuda(backend, device):
    pytest.importorskip("onnxruntime")
    with pytest.raises(BackendUnavailable, match="half precision runs on .*CUDA GPU"):
        load_backend(None, "pet-mri", backend, device, half=True)
