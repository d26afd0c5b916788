"""The CUDA path: skipped without a GPU (as in CI); run on a GPU machine with ``pytest Testing/test_cuda.py``.

Agreement with the CPU, fp16 within 1 grey level, and a real device out-of-memory error halving the
batch until the volume fits.
"""
import logging

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from LightFusionLib.backends import load_backend  # noqa: E402
from LightFusionLib.fusion import fuse_volumes  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cpu_and_cuda():
    return load_backend(None, "pet-mri", "torch", "cpu"), load_backend(None, "pet-mri", "torch", "cuda")


def test_cuda_agrees_with_the_cpu(cpu_and_cuda, sample_net_planes):
    cpu, cuda = cpu_and_cuda
    assert cuda.device == "cuda" and cuda.preferred_batch == 32
    mri, pet = sample_net_planes
    difference = np.abs(cuda(mri, pet) - cpu(mri, pet)) * 255
    assert difference.max() < 0.5  # cuDNN may use TF32 for convolutions: well inside half a grey level


def test_half_precision_on_cuda_stays_within_one_grey_level(cpu_and_cuda, sample_net_planes):
    cpu, _ = cpu_and_cuda
    half = load_backend(None, "pet-mri", "torch", "cuda", half=True)
    mri, pet = sample_net_planes
    assert np.abs(half(mri, pet) - cpu(mri, pet)).max() * 255 < 1.0


def test_device_out_of_memory_halves_the_batch_until_it_fits(cpu_and_cuda, caplog):
    cpu, cuda = cpu_and_cuda
    rng = np.random.default_rng(0)
    mri = sitk.GetImageFromArray(rng.uniform(50, 500, (64, 256, 256)).astype(np.float32))
    pet = sitk.GetImageFromArray(rng.uniform(0, 10, (64, 256, 256)).astype(np.float32))
    # Leave about 400 MB free: a batch of 64 planes cannot fit (each plane's 16-channel maps are
    # 4 MB apiece, several alive at once), a batch of a few planes does.
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - 400 * 2**20), dtype=torch.uint8, device="cuda")
    try:
        with caplog.at_level(logging.WARNING, logger="LightFusionLib.fusion"):
            fused = fuse_volumes(mri, pet, backend=cuda, batch_size=64)
    finally:
        del filler
        torch.cuda.empty_cache()
    assert "device out of memory with batch 64" in caplog.text
    reference = fuse_volumes(mri, pet, backend=cpu)
    difference = np.abs(sitk.GetArrayFromImage(fused).astype(int) - sitk.GetArrayFromImage(reference))
    assert difference.max() <= 1
