"""Shared pytest fixtures."""

import pytest
import torch
from hub_server import LocalHub


@pytest.fixture
def local_hub():
    """A running in-memory Hugging Face Hub on 127.0.0.1; its URL is ``local_hub.endpoint``."""
    with LocalHub() as hub:
        yield hub


@pytest.fixture
def single_thread():
    """Tiny models run several times faster on one torch thread, above all on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
