import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import trainhelp


@pytest.fixture
def images():
    return trainhelp.tiny_images()


@pytest.fixture
def catalog():
    """A catalogue with the entry-point plugins (the vae) and no extra hooks."""
    from genkit.registry import make_plugin_manager

    return make_plugin_manager()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine stays usable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
