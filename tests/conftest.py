"""Settings shared by every test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests' tiny networks run fastest on one thread (intra-op threads only add overhead at
    these sizes, and CI has 2 cores); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
