#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pi_facts
short_description: Gather Raspberry Pi 5 hardware facts
version_added: 0.1.0
description:
  - Reads what a Raspberry Pi 5 shows about itself (device tree, board revision,
    SoC temperature, the device that holds C(/), PCIe devices, a Hailo NPU) and,
    through C(vcgencmd), its throttling state and bootloader version.
  - Returns them as the C(pifarm_pi) fact. On a host that is not a Raspberry Pi 5 Model B
    (a container, a PC, a Pi 4, a CM5) O(root) is still read for the device-tree model,
    C(is_pi5) is V(false) and every hardware fact is empty; the module does not fail.
  - All files are read under O(root), so a recorded board tree can stand in for
    a real one.
options:
  root:
    description:
      - Directory that holds the C(proc), C(sys) and C(dev) trees to read.
    type: path
    default: /
  vcgencmd:
    description:
      - Path of the C(vcgencmd) command to run C(get_throttled) and C(bootloader_version) with.
      - When unset, the C(vcgencmd) on the PATH is used if O(root=/) and none is run otherwise
        (the host's firmware says nothing about a recorded tree).
      - Without one, C(throttled) and C(bootloader) are empty.
    type: path
author:
  - pifarm.inference maintainers (@pifarm)
attributes:
  check_mode:
    description: Can run in check mode; it only reads.
    support: full
  diff_mode:
    description: Changes nothing, so there is no diff.
    support: none
  facts:
    description: Returns the C(pifarm_pi) fact.
    support: full
  platform:
    description: Raspberry Pi OS (bookworm) on a Raspberry Pi 5; any POSIX host answers C(is_pi5=false).
    support: full
    platforms: posix
notes:
  - C(vcgencmd) needs access to C(/dev/vcio); run as root or as a member of the C(video) group.
"""

EXAMPLES = r"""
- name: Read the board's hardware facts
  pifarm.inference.pi_facts:

- name: Stop early on anything but a Raspberry Pi 5
  ansible.builtin.assert:
    that: ansible_facts.pifarm_pi.is_pi5
    fail_msg: "{{ inventory_hostname }} is not a Raspberry Pi 5 ({{ ansible_facts.pifarm_pi.model }})"

- name: Read a recorded board tree with a stand-in vcgencmd
  pifarm.inference.pi_facts:
    root: /srv/pi5-root
    vcgencmd: /usr/local/bin/vcgencmd-recorded
"""

RETURN = r"""
ansible_facts:
  description: Facts added to C(ansible_facts).
  returned: always
  type: complex
  contains:
    pifarm_pi:
      description: Raspberry Pi 5 hardware facts.
      returned: always
      type: dict
      contains:
        is_pi5:
          description: Whether the device tree names a Raspberry Pi 5 Model B.
          type: bool
          returned: always
          sample: true
        model:
          description: Board name from C(/proc/device-tree/model); null without a device tree.
          type: str
          returned: always
          sample: Raspberry Pi 5 Model B Rev 1.0
        compatible:
          description: Device-tree compatible strings, most specific first.
          type: list
          elements: str
          returned: always
          sample: ["raspberrypi,5-model-b", "brcm,bcm2712"]
        revision:
          description: Board revision code from C(/proc/cpuinfo).
          type: str
          returned: always
          sample: d04170
        memory_mb:
          description: Memory size the revision code declares, in MiB.
          type: int
          returned: always
          sample: 8192
        throttled:
          description:
            - Decoded C(vcgencmd get_throttled); empty without C(vcgencmd).
            - C(raw) is the hex value; the other keys are the bits, the C(*_occurred) ones since boot.
          type: dict
          returned: always
          sample:
            raw: "0x50005"
            under_voltage: true
            freq_capped: false
            throttled: true
            soft_temp_limit: false
            under_voltage_occurred: true
            freq_capped_occurred: false
            throttled_occurred: true
            soft_temp_limit_occurred: false
        temperature_c:
          description: SoC temperature in degrees Celsius, one decimal.
          type: float
          returned: always
          sample: 51.2
        boot_device:
          description: What holds C(/).
          type: str
          returned: always
          choices: [sd, nvme, usb, network, unknown]
          sample: nvme
        bootloader:
          description: Bootloader EEPROM build from C(vcgencmd bootloader_version); empty without C(vcgencmd).
          type: dict
          returned: always
          sample:
            date: "2024-09-23"
            timestamp: 1727096576
            version: 2682625908f5585e5f4832bb82e74e7d757ec48f
        nvme_devices:
          description: The PCIe devices of class NVMe (C(0x010802)), each like an item of C(pcie_devices).
          type: list
          elements: dict
          returned: always
        pcie_devices:
          description: Every device under C(/sys/bus/pci/devices), by address.
          type: list
          elements: dict
          returned: always
          contains:
            address:
              description: PCI address.
              type: str
              sample: "0001:01:00.0"
            vendor:
              description: Vendor id.
              type: str
              sample: "0x15b7"
            device:
              description: Device id.
              type: str
              sample: "0x5017"
            class:
              description: PCI class code.
              type: str
              sample: "0x010802"
            current_link_speed:
              description: Negotiated link speed; null where the device has no PCIe link.
              type: str
              sample: 5.0 GT/s PCIe
            current_link_width:
              description: Negotiated lane count; null where the device has no PCIe link.
              type: str
              sample: "1"
        npu:
          description: The Hailo NPU on PCIe, if any.
          type: dict
          returned: always
          contains:
            type:
              description: C(hailo8) (AI HAT+ and AI Kit, Hailo-8 and 8L), C(hailo10h) (AI HAT+ 2) or C(none).
              type: str
              sample: hailo8
            pci_address:
              description: PCI address of the NPU.
              type: str
              sample: "0001:01:00.0"
            device_node:
              description: Its character device; null while no Hailo driver has created one.
              type: str
              sample: /dev/hailo0
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
import os
from collections.abc import Callable

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pifarm.inference.plugins.module_utils.pi_hardware import (
    gather_pi_facts,
    parse_bootloader_version,
    parse_get_throttled,
)

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}


def run_vcgencmd(
    module: AnsibleModule, vcgencmd: str, command: str, parse: Callable[[str], object]
) -> str | None:
    """stdout of ``vcgencmd <command>`` when it parses; otherwise warn and return None."""
    rc, stdout, stderr = module.run_command([vcgencmd, command], environ_update=C_LOCALE)
    if rc != 0:
        module.warn(f"vcgencmd {command} exited {rc}: {(stderr or stdout).strip()}")
        return None
    try:
        parse(stdout)
    except ValueError as exc:
        module.warn(str(exc))
        return None
    return stdout


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/"},
            "vcgencmd": {"type": "path"},
        },
        supports_check_mode=True,
    )
    root = module.params["root"]
    vcgencmd = module.params["vcgencmd"]
    if vcgencmd is None and os.path.abspath(root) == "/":
        vcgencmd = module.get_bin_path("vcgencmd")
    throttled_text = bootloader_text = None
    if vcgencmd:
        throttled_text = run_vcgencmd(module, vcgencmd, "get_throttled", parse_get_throttled)
        bootloader_text = run_vcgencmd(module, vcgencmd, "bootloader_version", parse_bootloader_version)
    facts = gather_pi_facts(root, throttled_text=throttled_text, bootloader_text=bootloader_text)
    module.exit_json(changed=False, ansible_facts={"pifarm_pi": facts})


if __name__ == "__main__":
    main()
