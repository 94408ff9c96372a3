"""What module tests share: AnsibleModule exits that raise, and helpers that run a module in-process.

Unit tests (tests/unit/plugins/modules) and integration tests (tests/integration) both import it;
tests/ is on sys.path through tests/conftest.py.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args


class ModuleExitError(Exception):
    """exit_json was called; args[0] is the result."""


class ModuleFailError(Exception):
    """fail_json was called; args[0] is the result, with msg."""


def patch_module_exits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make AnsibleModule's exits raise; returns the list the module's warnings go to."""
    warnings: list[str] = []

    def exit_json(self, **result):
        raise ModuleExitError(result)

    def fail_json(self, msg, **result):
        raise ModuleFailError({"msg": msg, "failed": True, **result})

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "warn", lambda self, warning: warnings.append(warning))
    return warnings


def no_bin_path(self, name, required=False, opt_dirs=None):
    """AnsibleModule.get_bin_path on a host where the program is not installed."""
    return None


def module_result(module: ModuleType, raised: type[Exception], args: dict) -> dict:
    """Run ``module.main()`` with ``args``; return the result it exited (or failed) with."""
    with patch_module_args(args), pytest.raises(raised) as exited:
        module.main()
    return exited.value.args[0]


def run_module(module: ModuleType, **args) -> dict:
    """The result of a run expected to succeed."""
    return module_result(module, ModuleExitError, args)


def fail_module(module: ModuleType, **args) -> dict:
    """The result of a run expected to fail."""
    return module_result(module, ModuleFailError, args)
