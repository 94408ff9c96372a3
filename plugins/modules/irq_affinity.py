#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: irq_affinity
short_description: Pin NIC interrupts to CPUs by interface name and set RPS/XPS masks
version_added: 0.1.0
description:
  - Finds the interrupts of the given network interfaces by the names C(/proc/interrupts) lists
    for them, never by number (IRQ numbers change between boots and kernels). That is the
    interface itself (C(eth0)) and its queues (C(enp3s0-TxRx-0), C(eno2-rx-1), C(eth0:rx-0)), but not
    C(eth01) or C(veth0). Each one's C(/proc/irq/<n>/smp_affinity_list) is set to O(cpus).
  - With O(rps_cpus), every receive queue's C(rps_cpus) mask is set (receive packet steering);
    with O(xps=true), every transmit queue's C(xps_cpus) mask is set to O(cpus) (transmit packet
    steering).
  - Values are compared as CPU sets (C(0-1) is C(0,1); C(00000001) is C(1)) and only those that
    differ are written.
  - Interface names and CPU lists are checked before anything is written, the CPU lists against
    the host's online CPUs.
  - An interface with no interrupt of its own is not an error; it is reported in
    RV(interfaces_without_irqs) and gets packet steering only. That is true of virtual NICs
    (veth, bridges, bonds), of USB NICs (a Pi 5's USB 2.5GbE adapter is served by the xHCI
    controller's interrupt, C(xhci-hcd:usb1)), of NICs whose driver names its interrupts after
    itself rather than the interface (iwlwifi, mlx5), and of NICs that are down with drivers that
    request their interrupts only when the interface comes up (igb, e1000e).
  - All files are read and written under O(root), so a recorded tree can stand in for a host.
options:
  interfaces:
    description:
      - Network interfaces whose interrupts and queues to set, such as V(eth0).
      - Each must exist under C(/sys/class/net).
    type: list
    elements: str
    required: true
  cpus:
    description:
      - CPU list the interrupts go to, such as V(0), V(0-1) or V(0,2-3).
      - Also the O(xps) mask. Every CPU must be online.
    type: str
    required: true
  rps_cpus:
    description:
      - CPU list that processes received packets (RPS), set on every receive queue of the
        interfaces. Every CPU must be online.
      - Omit it to leave receive steering as it is.
    type: str
  xps:
    description:
      - Whether to set every transmit queue's C(xps_cpus) to O(cpus).
      - An interface with a single transmit queue, whose C(xps_cpus) the kernel does not show,
        is left as it is with a warning.
    type: bool
    default: false
  root:
    description:
      - Directory that holds the C(proc) and C(sys) trees to read and write.
    type: path
    default: /
author:
  - pifarm.inference maintainers (@pifarm)
attributes:
  check_mode:
    description: Reads everything and reports what would change without writing.
    support: full
  diff_mode:
    description: Shows each managed interrupt's CPU list and each queue mask, before and after.
    support: full
  platform:
    description: Linux; writing needs root.
    support: full
    platforms: posix
notes:
  - The kernel does not keep these settings across a reboot, and a driver that resets or
    reloads re-creates its interrupts with the default affinity; run the module again then
    (the net_tuning role installs a boot-time unit that does).
  - C(irqbalance) moves interrupts on its own; ban the CPUs or stop it, or it undoes the pinning.
  - The kernel refuses to move managed interrupts (NVMe queues, for instance) and per-CPU ones;
    the module fails naming the interrupt when a write is refused.
seealso:
  - name: Scaling in the Linux networking stack
    description: RPS, XPS and interrupt affinity in the kernel documentation.
    link: https://docs.kernel.org/networking/scaling.html
"""

EXAMPLES = r"""
- name: Pin eth0's interrupt and receive steering to CPU 0, keeping 1-3 for inference
  pifarm.inference.irq_affinity:
    interfaces: [eth0]
    cpus: "0"
    rps_cpus: "0"
  become: true

- name: Spread a multi-queue NIC's queues over two CPUs and steer transmits there too
  pifarm.inference.irq_affinity:
    interfaces: [enp3s0]
    cpus: "0-1"
    xps: true
  become: true
  register: pinned

- name: Say which NICs had no interrupt to pin (USB and virtual NICs)
  ansible.builtin.debug:
    msg: "Only packet steering applies to {{ pinned.interfaces_without_irqs | join(', ') }}"
  when: pinned.interfaces_without_irqs | length > 0

- name: Preview the changes against a copy of a recorded tree
  pifarm.inference.irq_affinity:
    interfaces: [eth0]
    cpus: "0"
    root: /tmp/pi5-tree
  check_mode: true
  diff: true
"""

RETURN = r"""
irqs:
  description: Every interrupt of the interfaces, in C(/proc/interrupts) order, set or already right.
  returned: always
  type: list
  elements: dict
  contains:
    irq:
      description: IRQ number on this boot.
      type: int
      sample: 106
    name:
      description: The action name C(/proc/interrupts) shows for it.
      type: str
      sample: eth0
    interface:
      description: The interface it belongs to.
      type: str
      sample: eth0
    before:
      description: C(smp_affinity_list) as it was.
      type: str
      sample: 0-3
    after:
      description: C(smp_affinity_list) as it is now (in check mode, as it would be).
      type: str
      sample: "0"
rps:
  description: Every receive queue's C(rps_cpus) mask, set or already right; empty without O(rps_cpus).
  returned: always
  type: list
  elements: dict
  contains:
    interface:
      description: The interface.
      type: str
      sample: eth0
    queue:
      description: The queue.
      type: str
      sample: rx-0
    before:
      description: The mask as it was, as the kernel prints it.
      type: str
      sample: "0"
    after:
      description: The mask as it is now (in check mode, as it would be).
      type: str
      sample: "1"
xps:
  description: Every transmit queue's C(xps_cpus) mask, set or already right; empty unless O(xps=true).
  returned: always
  type: list
  elements: dict
  contains:
    interface:
      description: The interface.
      type: str
      sample: enp3s0
    queue:
      description: The queue.
      type: str
      sample: tx-0
    before:
      description: The mask as it was.
      type: str
      sample: "00"
    after:
      description: The mask as it is now (in check mode, as it would be).
      type: str
      sample: "03"
interfaces_without_irqs:
  description: The interfaces no interrupt names (USB and virtual NICs, for instance).
  returned: always
  type: list
  elements: str
  sample: [eth1]
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pifarm.inference.plugins.module_utils.irq_affinity import (
    ApplyError,
    IrqAffinityError,
    apply_plan,
    plan_affinity,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "interfaces": {"type": "list", "elements": "str", "required": True},
            "cpus": {"type": "str", "required": True},
            "rps_cpus": {"type": "str"},
            "xps": {"type": "bool", "default": False},
            "root": {"type": "path", "default": "/"},
        },
        supports_check_mode=True,
    )
    root = module.params["root"]

    # Every input is checked, and everything read, before the first write.
    try:
        plan = plan_affinity(
            root,
            module.params["interfaces"],
            module.params["cpus"],
            rps_cpus=module.params["rps_cpus"],
            xps=module.params["xps"],
        )
    except IrqAffinityError as exc:
        module.fail_json(msg=str(exc))

    for warning in plan.warnings:
        module.warn(warning)
    result = {
        "changed": plan.changed,
        "irqs": plan.of_kind("irq"),
        "rps": plan.of_kind("rps"),
        "xps": plan.of_kind("xps"),
        "interfaces_without_irqs": plan.interfaces_without_irqs,
    }
    if module._diff:
        result["diff"] = plan.diff(root)

    if plan.changed and not module.check_mode:
        try:
            apply_plan(plan)
        except ApplyError as exc:
            module.fail_json(msg=str(exc), changed=bool(exc.applied), applied=[s.label for s in exc.applied])

    module.exit_json(**result)


if __name__ == "__main__":
    main()
