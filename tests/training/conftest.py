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
