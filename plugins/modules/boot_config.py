#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: boot_config
short_description: Edit one conditional section of a Raspberry Pi config.txt
description:
  - Sets or removes plain C(key=value) settings, base device-tree parameters (C(dtparam=)) and
    device-tree overlays (C(dtoverlay=)) inside one conditional section of the firmware's
    C(config.txt), and reports whether a reboot is needed for the change to take effect.
  - "Only the lines named in the task change: comments, blank lines, spacing, other sections,
    unrelated lines and the trailing newline (or its absence) are kept byte for byte, and a run
    that changes nothing leaves the file untouched."
  - Filters are sticky until the next C([filter]) line, so the file is a sequence of blocks. The
    block for O(section) is the B(last) block opened by a C([section]) line. For C(all), a file
    that has no C([all]) line at all uses the lines before its first filter. When there is no
    such block, a blank line and C([section]) are appended at the end of the file, followed by
    the new lines.
  - New lines go at the end of their block, after its last non-blank line (before the next
    C([filter]) line when the block is not the last one).
author:
  - pifarm.inference maintainers (@pifarm)
options:
  path:
    description:
      - The config.txt to edit. Raspberry Pi OS bookworm mounts the boot partition at
        C(/boot/firmware).
      - When the file does not exist, O(state=present) creates it (only if there is a line to
        write), with mode V(0644) minus the umask; O(state=absent) reports no change.
    type: path
    default: /boot/firmware/config.txt
  section:
    description:
      - The conditional filter, without brackets, whose block is edited.
      - "Accepted: V(all), V(none), V(tryboot); the model filters V(pi0), V(pi0w), V(pi02),
        V(pi1), V(pi2), V(pi3), V(pi3+), V(pi4), V(pi400), V(pi5), V(pi500), V(cm0), V(cm1),
        V(cm3), V(cm3+), V(cm4), V(cm4s), V(cm5); and the forms C(board-type=0x<type>),
        C(EDID=<manufacturer>-<product>), C(gpio<N>=0|1), C(0x<serial>) (8 to 16 hex digits),
        C(HDMI:0|1) and C(boot_partition=<N>)."
      - Anything else fails before the file is read.
    type: str
    default: all
  settings:
    description:
      - Plain C(key=value) lines. Keys are letters, digits and C(_ + . -), optionally with the
        firmware's C(:<index>) suffix (C(hdmi_mode:1)); C(dtparam) and C(dtoverlay) have their own
        options.
      - With O(state=present) an existing C(key=) line of the block gets the new value in place
        (the last one when the key repeats, as the firmware uses the last); otherwise the line is
        appended. A commented C(#key=) line does not count.
      - Values are written as given; V(true)/V(false) become C(1)/C(0). A value may not contain a
        line break, start with C([) or have leading or trailing whitespace.
      - With O(state=absent) every C(key=) line of the block is removed whatever its value; the
        values given here are ignored and may be null.
    type: dict
    default: {}
  dtparams:
    description:
      - Base device-tree parameters, name to value. A null value means a bare C(dtparam=name).
      - Parameters are also recognised inside multi-parameter lines such as
        C(dtparam=audio=on,i2c_arm=on); a change rewrites only that parameter within the line.
      - Values V(true)/V(false) (YAML reads an unquoted C(on) as true) become C(on)/C(off). A
        value may not contain C(,).
      - New C(dtparam=) lines are written above overlays added by the same task. A dtparam that
        follows a C(dtoverlay=) line sets that overlay's parameter of the same name if it has one.
      - With O(state=absent) the parameter is removed whatever its value (a line left without
        parameters is removed).
    type: dict
    default: {}
  dtoverlays:
    description:
      - Overlays, each the whole spec as it follows C(dtoverlay=), for example V(disable-bt) or
        V(pciex1-compat-pi5,no-mip).
      - Present means an exact C(dtoverlay=<spec>) line exists in the block; absent removes such
        lines. Specs are non-empty and contain no whitespace.
    type: list
    elements: str
    default: []
  state:
    description:
      - Whether the settings, parameters and overlays should be in the section's block or not.
    type: str
    choices: [present, absent]
    default: present
  backup:
    description:
      - Keep a timestamped copy of the file next to it before changing it.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
notes:
  - The firmware reads config.txt at boot only, so the module returns RV(reboot_required) rather
    than rebooting; the pifarm.inference.pi_boot role reboots when it is set.
  - The file is written through a temporary file in the same directory and an atomic rename that
    keeps the file's mode and owner.
seealso:
  - name: The config.txt file
    description: Raspberry Pi documentation of config.txt and its conditional filters.
    link: https://www.raspberrypi.com/documentation/computers/config_txt.html
"""

EXAMPLES = r"""
- name: Enable the PCIe connector of a Raspberry Pi 5 at gen 3
  pifarm.inference.boot_config:
    dtparams:
      pciex1: null
      pciex1_gen: 3
  register: boot_config

- name: Raspberry Pi 5 only - no Bluetooth, AI HAT+ compatibility overlay
  pifarm.inference.boot_config:
    section: pi5
    dtoverlays:
      - disable-bt
      - pciex1-compat-pi5,no-mip
    settings:
      usb_max_current_enable: 1

- name: Drop PCIe gen 3 again, keep a backup
  pifarm.inference.boot_config:
    dtparams:
      pciex1_gen: null
    state: absent
    backup: true

- name: Reboot when the firmware configuration changed
  ansible.builtin.reboot:
  when: boot_config.reboot_required
"""

RETURN = r"""
reboot_required:
  description: Whether config.txt changed; the firmware applies it at the next boot only.
  returned: always
  type: bool
  sample: true
backup_file:
  description: The copy of the old file that O(backup=true) made.
  returned: when a backup was made
  type: str
  sample: /boot/firmware/config.txt.2412.2025-01-31@10:12:58~
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pifarm.inference.plugins.module_utils.config_txt import (
    ConfigTxtError,
    EditRequest,
    edit_config_txt,
)

# config.txt is ASCII in practice; surrogateescape keeps any other byte as it was.
ENCODING = "utf-8"
ERRORS = "surrogateescape"


def read_config(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_config(module: AnsibleModule, path: str, data: bytes) -> None:
    """Write through a temporary file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".config.txt.", suffix=".tmp")
    except OSError as exc:
        module.fail_json(msg=f"write config.txt {path}: cannot create a temporary file in {directory}: {exc}")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        os.unlink(temp)
        module.fail_json(msg=f"write config.txt {path}: {exc}")
    # atomic_move gives the temporary file the mode and owner of the file it replaces.
    module.atomic_move(temp, path)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/boot/firmware/config.txt"},
            "section": {"type": "str", "default": "all"},
            "settings": {"type": "dict", "default": {}},
            "dtparams": {"type": "dict", "default": {}},
            "dtoverlays": {"type": "list", "elements": "str", "default": []},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "backup": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    path = module.params["path"]
    state = module.params["state"]

    # Every input is checked before the file is read.
    try:
        request = EditRequest.validated(
            section=module.params["section"],
            settings=module.params["settings"],
            dtparams=module.params["dtparams"],
            dtoverlays=module.params["dtoverlays"],
            state=state,
        )
    except ConfigTxtError as exc:
        module.fail_json(msg=f"edit config.txt {path}: {exc}")

    if os.path.isdir(path):
        module.fail_json(msg=f"edit config.txt {path}: is a directory, give the path of the file")
    try:
        before_bytes = read_config(path)
    except OSError as exc:
        module.fail_json(msg=f"read config.txt {path}: {exc.strerror or exc}")

    result: dict = {"changed": False, "reboot_required": False}
    if before_bytes is None and state == "absent":
        module.exit_json(**result)

    before = (before_bytes or b"").decode(ENCODING, ERRORS)
    after = edit_config_txt(before, request)
    changed = after != before
    result["changed"] = changed
    result["reboot_required"] = changed
    if module._diff:
        result["diff"] = {
            "before": before.encode(ENCODING, ERRORS).decode(ENCODING, "replace"),
            "after": after.encode(ENCODING, ERRORS).decode(ENCODING, "replace"),
            "before_header": path,
            "after_header": path,
        }

    if changed and not module.check_mode:
        if before_bytes is None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            module.fail_json(
                msg=f"create config.txt {path}: directory {os.path.dirname(path)} does not exist "
                "(is the boot partition mounted?)"
            )
        if module.params["backup"] and before_bytes is not None:
            result["backup_file"] = module.backup_local(path)
        write_config(module, path, after.encode(ENCODING, ERRORS))

    module.exit_json(**result)


if __name__ == "__main__":
    main()
