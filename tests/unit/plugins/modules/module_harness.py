"""What the module tests share: the exceptions the patched exits raise (see conftest.py)."""

from __future__ import annotations

from types import ModuleType

import pytest
from ansible.module_utils.testing import patch_module_args


class ModuleExitError(Exception):
    """exit_json was called; args[0] is the result."""


class ModuleFailError(Exception):
    """fail_json was called; args[0] is the result, with msg."""


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
