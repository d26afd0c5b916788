"""Shared pytest fixtures."""
import pytest


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
