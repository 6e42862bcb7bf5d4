"""Fixtures for bridge-peft's tests: a world-size-1 runtime and tiny HF checkpoints on disk."""

import pytest
from peft_helpers import ORACLE_FAMILIES

from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import save_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def runtime():
    return initialize_parallel(seed=1234)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf-families")
    return {family: save_tiny_hf_checkpoint(root / family, family, seed=i)
            for i, family in enumerate(ORACLE_FAMILIES)}
