"""Shared pytest fixtures."""
import os

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def own_cache_folder(tmp_path_factory):
    """The CPU runtime that ``auto`` picks is measured once per machine and remembered under
    $XDG_CACHE_HOME (LightFusionLib.backends.faster_cpu_runtime): the suite measures in a folder of
    its own (inherited by the CLI subprocesses), never reading or writing the user's."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for a test module (use with ``pytestmark``): the planes in the volume
    tests are tiny, and on a shared machine two threads spend far longer waiting for each other
    (about 400 ms a call here) than computing."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_net_planes() -> tuple[np.ndarray, np.ndarray]:
    """8 axial planes through the middle of the bundled PET/MRI pair as the network sees them:
    MRI and coloured-PET luma, two (8, 256, 256) float32 stacks in [0, 1]."""
    from LightFusionLib.demo import sample_paths
    from LightFusionLib.fusion import prepare_pair
    from LightFusionLib.geometry import PlaneGrid
    from LightFusionLib.volumeio import read_volume

    mri_path, pet_path = sample_paths()
    pair = prepare_pair(read_volume(mri_path), read_volume(pet_path), "pet-mri")
    middle = slice(pair.mri.shape[0] // 2 - 4, pair.mri.shape[0] // 2 + 4)
    pet_luma = pair.other_colour(pair.other[middle]).luma
    spacing = pair.reference.GetSpacing()
    grid = PlaneGrid(pair.mri.shape[1:], (spacing[1], spacing[0]))
    return np.clip(grid.to_net(pair.mri[middle]), 0, 1), np.clip(grid.to_net(pet_luma / 255), 0, 1)
