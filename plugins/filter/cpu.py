# Copyright: (c) 2026, pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Filters over the CPU list code the irq_affinity module uses."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.pifarm.inference.plugins.module_utils.irq_affinity import parse_cpu_list


def cpu_list(value: object) -> list[int]:
    """The CPUs of a kernel CPU list such as ``0,2-3``, sorted."""
    try:
        return sorted(parse_cpu_list(str(value)))
    except ValueError as exc:
        raise AnsibleFilterError(f"CPU list {str(value)!r} {exc}") from exc


class FilterModule:
    def filters(self) -> dict:
        return {"cpu_list": cpu_list}
