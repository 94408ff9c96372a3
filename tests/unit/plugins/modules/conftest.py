"""Runs modules in-process: exit_json and fail_json raise instead of exiting."""

from __future__ import annotations

import pytest
from module_harness import patch_module_exits


@pytest.fixture(autouse=True)
def module_exits(monkeypatch) -> list[str]:
    """Patches AnsibleModule's exits to raise; returns the list the module's warnings go to."""
    return patch_module_exits(monkeypatch)
