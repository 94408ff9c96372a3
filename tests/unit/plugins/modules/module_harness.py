"""What the module tests share: the exceptions the patched exits raise (see conftest.py)."""

from __future__ import annotations


class ModuleExitError(Exception):
    """exit_json was called; args[0] is the result."""


class ModuleFailError(Exception):
    """fail_json was called; args[0] is the result, with msg."""


def no_bin_path(self, name, required=False, opt_dirs=None):
    """AnsibleModule.get_bin_path on a host where the program is not installed."""
    return None
