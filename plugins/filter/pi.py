# Copyright: (c) 2026, pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Filters over the Raspberry Pi hardware knowledge in module_utils/pi_hardware.py."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.pifarm.inference.plugins.module_utils.pi_hardware import (
    describe_boot_order,
    render_setting_value,
)


def boot_order_modes(value: object) -> list[str]:
    """Validate a bootloader BOOT_ORDER and name its modes, first tried first."""
    try:
        # The same rendering eeprom_config uses, so an unquoted YAML 0xf416 (an int) is accepted too.
        return describe_boot_order(render_setting_value("BOOT_ORDER", value))
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from exc


class FilterModule:
    def filters(self) -> dict:
        return {"boot_order_modes": boot_order_modes}
