"""Settings shared by the example plugin's tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run fastest on one thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
