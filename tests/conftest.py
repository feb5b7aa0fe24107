"""Shared pytest fixtures."""

import pytest
from hub_server import LocalHub


@pytest.fixture
def local_hub():
    """A running in-memory Hugging Face Hub on 127.0.0.1; its URL is ``local_hub.endpoint``."""
    with LocalHub() as hub:
        yield hub
