"""Shared fixtures: paths of the checkout and an environment that finds the collection."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# scripts/testbed.sh links this checkout as .venv/collections/ansible_collections/
# pifarm/inference, so plugins import by their FQCN path as Ansible loads them.
sys.path.insert(0, str(REPO / ".venv" / "collections"))
# The model_store role's store on loopback, for the role tests and the artifact tests alike.
pytest_plugins = ["store_fixtures"]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ansible_env() -> dict[str, str]:
    """Environment for ansible-* commands: this checkout as pifarm.inference."""
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(REPO / ".venv" / "collections")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_RETRY_FILES_ENABLED"] = "0"
    return env
