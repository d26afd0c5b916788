"""Backend choice and half precision: fp16 is offered only where it is fast and within 1 grey level."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from LightFusionLib.backends import BackendUnavailable, load_backend  # noqa: E402
from LightFusionLib.models import load_model  # noqa: E402


def test_half_precision_stays_within_one_grey_level(sample_net_planes):
    # Measured here on the CPU, where torch emulates fp16 (slowly); CUDA computes the same format.
    net, _ = load_model(None, "pet-mri")
    mri, pet = (torch.from_numpy(a[:4])[:, None] for a in sample_net_planes)
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
