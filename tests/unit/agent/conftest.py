"""Fixtures for the node agent's unit tests: keys, a fake store and a cache in tmp_path."""

from __future__ import annotations

from pathlib import Path

import minisign
import pytest
from agent_helpers import FakeSource

from pifarm_agent.cache import ModelCache


@pytest.fixture(scope="session")
def keypair() -> minisign.KeyPair:
    return minisign.KeyPair.generate()


@pytest.fixture(scope="session")
def other_keypair() -> minisign.KeyPair:
    return minisign.KeyPair.generate()


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def cache(tmp_path: Path, keypair: minisign.KeyPair) -> ModelCache:
    return ModelCache(tmp_path / "cache", keypair.public_key, reserve_bytes=0, progress_interval=3600)
