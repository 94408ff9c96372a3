"""Runs modules in-process: exit_json and fail_json raise instead of exiting."""

from __future__ import annotations

import pytest
from ansible.module_utils import basic
from module_harness import ModuleExitError, ModuleFailError


@pytest.fixture(autouse=True)
def module_exits(monkeypatch) -> list[str]:
    """Patches AnsibleModule's exits to raise; returns the list the module's warnings go to."""
    warnings: list[str] = []

    def exit_json(self, **result):
        raise ModuleExitError(result)

    def fail_json(self, msg, **result):
        raise ModuleFailError({"msg": msg, "failed": True, **result})

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, warning: warnings.append(warning))
    return warnings
