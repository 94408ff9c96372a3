#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: eeprom_config
short_description: Set Raspberry Pi 5 bootloader EEPROM settings
version_added: 0.1.0
description:
  - Reads the bootloader configuration with C(rpi-eeprom-config), sets the given settings in its
    board-wide part (the C([all]) section and the lines above any section) and, when that changes
    any value, stages the new configuration with C(rpi-eeprom-config --apply).
  - Every other line of the configuration (comments, conditional sections such as C([gpio4=0]))
    is kept as it was. Existing keys keep their place; new keys go after the last board-wide setting.
  - The bootloader writes the staged configuration to the EEPROM at the next reboot;
    RV(reboot_required) says when one is due.
  - All settings are validated before any command runs; C(BOOT_ORDER) must be C(0x) and up to
    8 known boot modes, for example V(0xf416) (NVMe, then SD card, then USB, then start again).
options:
  settings:
    description:
      - Bootloader settings to set, by name, for example C(BOOT_ORDER) and C(PCIE_PROBE).
      - Names are upper-case letters, digits and underscores. Values are strings or numbers;
        V(true) and V(false) become C(1) and C(0). An unquoted YAML C(0xf416) arrives as an
        integer and is written back in hex for C(BOOT_ORDER).
    type: dict
    required: true
  command:
    description:
      - Path of C(rpi-eeprom-config), from the C(rpi-eeprom) package of Raspberry Pi's apt repository.
      - Defaults to the one on the PATH.
    type: path
author:
  - pifarm.inference maintainers (@pifarm)
attributes:
  check_mode:
    description: Reads the current configuration and reports the change without staging it.
    support: full
  diff_mode:
    description: Shows the configuration text before and after.
    support: full
  platform:
    description: Raspberry Pi OS on a Raspberry Pi 5 (or 4); C(--apply) must run as root.
    support: full
    platforms: posix
seealso:
  - name: Raspberry Pi bootloader configuration
    description: The settings the bootloader understands.
    link: https://www.raspberrypi.com/documentation/computers/raspberry-pi.html#raspberry-pi-bootloader-configuration
"""

EXAMPLES = r"""
- name: Boot from NVMe first, then SD card, then USB
  pifarm.inference.eeprom_config:
    settings:
      BOOT_ORDER: "0xf416"
  become: true
  register: eeprom

- name: Reboot so the bootloader writes the new configuration
  ansible.builtin.reboot:
  become: true
  when: eeprom.reboot_required

- name: Enumerate PCIe for an NVMe adapter that is not a HAT+ and allow 5 A from the supply
  pifarm.inference.eeprom_config:
    settings:
      PCIE_PROBE: 1
      PSU_MAX_CURRENT: 5000
  become: true
"""

RETURN = r"""
current:
  description: Board-wide settings before the change, as C(rpi-eeprom-config) printed them.
  returned: always
  type: dict
  sample: {BOOT_UART: "1", POWER_OFF_ON_HALT: "0", BOOT_ORDER: "0xf461"}
desired:
  description: Board-wide settings after the change (what was or, in check mode, would be staged).
  returned: always
  type: dict
  sample: {BOOT_UART: "1", POWER_OFF_ON_HALT: "0", BOOT_ORDER: "0xf416"}
reboot_required:
  description: Whether a configuration was (in check mode, would be) staged for the next reboot.
  returned: always
  type: bool
  sample: true
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pifarm.inference.plugins.module_utils.pi_hardware import (
    merge_eeprom_config,
    parse_eeprom_config,
    render_eeprom_settings,
)

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}
PACKAGE_HINT = "install the rpi-eeprom package from Raspberry Pi's apt repository (archive.raspberrypi.com)"


def find_command(module: AnsibleModule) -> str:
    """The rpi-eeprom-config to run, or fail with what to install."""
    command = module.params["command"] or module.get_bin_path("rpi-eeprom-config")
    if not command:
        module.fail_json(msg=f"rpi-eeprom-config not found on the PATH: {PACKAGE_HINT}")
    if not os.access(command, os.X_OK):
        module.fail_json(msg=f"rpi-eeprom-config {command} is not an executable file: {PACKAGE_HINT}")
    return command


def read_config(module: AnsibleModule, command: str) -> str:
    rc, stdout, stderr = module.run_command([command], environ_update=C_LOCALE)
    if rc != 0:
        module.fail_json(
            msg=f"rpi-eeprom-config {command} could not read the bootloader configuration: exit {rc}",
            rc=rc,
            stdout=stdout,
            stderr=stderr,
        )
    return stdout


def stage_config(module: AnsibleModule, command: str, text: str) -> None:
    """Hand ``text`` to ``rpi-eeprom-config --apply``, which stages it for the next boot."""
    fd, path = tempfile.mkstemp(dir=module.tmpdir, prefix="bootconf-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    rc, stdout, stderr = module.run_command([command, "--apply", path], environ_update=C_LOCALE)
    if rc != 0:
        module.fail_json(
            msg=f"rpi-eeprom-config --apply could not stage the bootloader configuration: exit {rc}: "
            f"{(stderr or stdout).strip()}",
            rc=rc,
            stdout=stdout,
            stderr=stderr,
        )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "settings": {"type": "dict", "required": True},
            "command": {"type": "path"},
        },
        supports_check_mode=True,
    )
    settings = module.params["settings"]
    try:
        render_eeprom_settings(settings)
    except ValueError as exc:
        module.fail_json(msg=str(exc))

    command = find_command(module)
    current_text = read_config(module, command)
    desired_text = merge_eeprom_config(current_text, settings)
    current = parse_eeprom_config(current_text)
    desired = parse_eeprom_config(desired_text)
    changed = desired != current

    if changed and not module.check_mode:
        stage_config(module, command, desired_text)

    result = {"changed": changed, "current": current, "desired": desired, "reboot_required": changed}
    if module._diff:
        result["diff"] = {
            "before": current_text,
            "after": desired_text if changed else current_text,
            "before_header": "rpi-eeprom-config (current)",
            "after_header": "rpi-eeprom-config (desired)",
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
