"""Fixtures for the optimizer-step tests."""

import pytest


@pytest.fixture
def runtime():
    """A world-size-1 runtime (gloo on CPU, NCCL on a GPU) with a fixed seed."""
    from bridge_convert.runtime import initialize_parallel

    return initialize_parallel(seed=1234)
