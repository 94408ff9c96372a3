# Copyright: (c) 2026, pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The farm's names that more than one role must spell alike, and the rollout's plan.

The gateway's HAProxy configuration names an edge backend per model and a server per
(node, llama-server instance); the rollout drains and enables exactly those through the
runtime API. Both read the names from here.
"""

from __future__ import annotations

import math
import re

from ansible.errors import AnsibleFilterError

# HAProxy proxy names allow letters, digits, '-', '_', '.' and ':'; the farm keeps to the
# characters a NATS subject token and a Prometheus label value take without quoting.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PERCENT = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*%$")


def edge_backend(model: str) -> str:
    """The gateway's backend of the nodes serving ``model``."""
    if not isinstance(model, str) or not model:
        raise AnsibleFilterError(f"edge_backend: a model name is a non-empty string, got {model!r}")
    return "edge_" + _NAME_UNSAFE.sub("_", model)


def edge_server(node: str, instance: str) -> str:
    """The gateway's server of one llama-server instance on one node."""
    for what, value in (("node", node), ("instance", instance)):
        if not isinstance(value, str) or not value:
            raise AnsibleFilterError(f"edge_server: the {what} is a non-empty string, got {value!r}")
    return f"{node}_{instance}"


def _step_target(spec: object, total: int, index: int) -> int:
    """How many nodes have switched once step ``index`` (0-based) is done."""
    if isinstance(spec, bool):
        raise AnsibleFilterError(f"rollout step {index + 1}: {spec!r} is neither a count nor a percentage")
    if isinstance(spec, int):
        if spec < 1:
            raise AnsibleFilterError(f"rollout step {index + 1}: a count of nodes is 1 or more, got {spec}")
        return min(spec, total)
    if isinstance(spec, str) and spec.strip().isdigit():
        return _step_target(int(spec), total, index)
    match = _PERCENT.match(spec.strip()) if isinstance(spec, str) else None
    if not match or not 0 < float(match.group(1)) <= 100:
        raise AnsibleFilterError(
            f"rollout step {index + 1}: {spec!r} is neither a count of nodes (1 or more) "
            "nor a percentage above 0 % and at most 100 %"
        )
    return min(total, math.ceil(float(match.group(1)) * total / 100))


def rollout_plan(nodes: list, steps: list, max_unavailable: int = 1) -> dict:
    """Split ``nodes`` (in switching order) into the rollout's steps and batches.

    Each step names how many nodes have switched once it is done, as a count or a
    percentage of ``nodes`` (rounded up: a step is never empty while nodes are left), and
    the counts never decrease. Within a step at most ``max_unavailable`` nodes switch at
    once, one batch each. The analysis gate runs after every step but the last, in the
    batch whose last node ends the step.
    """
    if not isinstance(nodes, list) or len(set(nodes)) != len(nodes):
        raise AnsibleFilterError(f"rollout_plan: nodes must be a list without repeats, got {nodes!r}")
    if not isinstance(steps, list) or not steps:
        raise AnsibleFilterError("rollout_plan: steps must be a non-empty list of counts or percentages")
    if isinstance(max_unavailable, bool) or not isinstance(max_unavailable, int) or max_unavailable < 1:
        raise AnsibleFilterError(f"rollout_plan: max_unavailable must be 1 or more, got {max_unavailable!r}")
    planned, batches, done = [], [], 0
    for index, spec in enumerate(steps):
        target = _step_target(spec, len(nodes), index)
        if target < done:
            raise AnsibleFilterError(
                f"rollout step {index + 1}: {spec!r} is {target} node(s), fewer than the {done} "
                "switched by the steps before it; the steps must not shrink"
            )
        if target == done:
            continue
        step_nodes = nodes[done:target]
        planned.append({"step": len(planned) + 1, "spec": str(spec), "nodes": step_nodes})
        batches.extend(
            len(step_nodes[i : i + max_unavailable]) for i in range(0, len(step_nodes), max_unavailable)
        )
        done = target
    gate_after = {step["nodes"][-1]: step["step"] for step in planned[:-1]}
    return {
        "steps": planned,
        "batches": batches,
        "gate_after": gate_after,
        "left_unswitched": nodes[done:],
    }


class FilterModule:
    def filters(self) -> dict:
        return {"edge_backend": edge_backend, "edge_server": edge_server, "rollout_plan": rollout_plan}
