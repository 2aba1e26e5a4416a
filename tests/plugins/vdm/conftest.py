"""Shared settings for the VDM tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny networks here run fastest on one thread (intra-op threads only add overhead at
    these sizes, and the test machine is shared); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
