"""Shared pytest fixtures."""

import pytest
import torch
from hub_server import LocalHub


@pytest.fixture
def local_hub():
    """A running in-memory Hugging Face Hub on 127.0.0.1; its URL is ``local_hub.endpoint``."""
    with LocalHub() as hub:
        yield hub


HUB_TOKEN = "hf_local_test_token"
"""The token ``guarded_hub`` accepts; any other (or none) gets 401."""


@pytest.fixture
def guarded_hub():
    """Like ``local_hub``, but it checks the token (``HUB_TOKEN``) on every request, and files of 1 KiB or
    more go through Git LFS (clients need ``HF_HUB_DISABLE_XET=1``), as model weights do on the real Hub."""
    with LocalHub(token=HUB_TOKEN, lfs_threshold=1024) as hub:
        yield hub


@pytest.fixture
def single_thread():
    """Tiny models run several times faster on one torch thread, above all on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
