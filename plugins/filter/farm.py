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
from collections.abc import Mapping

from ansible.errors import AnsibleFilterError
from ansible.module_utils.parsing.convert_bool import boolean

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


def farm_address(host: str, hostvars: Mapping) -> str:
    """How the farm's other hosts reach ``host``: its ``farm_address``, else its ``ansible_host``,
    else its inventory name. Every role that points one host at another (Prometheus, the store's
    clients, NATS routes and workers) asks this, so all of them reach a host at one address."""
    if not isinstance(host, str) or not host:
        raise AnsibleFilterError(f"farm_address: a host's inventory name is a non-empty string, got {host!r}")
    try:
        values = hostvars[host]
    except KeyError:
        raise AnsibleFilterError(f"farm_address: {host!r} is not a host of the inventory") from None
    for key in ("farm_address", "ansible_host"):
        value = values.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return host


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


def _figure(figures: dict, name: str) -> float | None:
    value = figures.get(name)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _limits(limits: dict) -> dict:
    """The thresholds as numbers (extra vars arrive as strings), None where a check is off."""
    out: dict = {}
    for key, value in limits.items():
        if key == "allow_throttling":
            out[key] = boolean(value, strict=False)
        elif value is None or value == "":
            out[key] = None
        else:
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                raise AnsibleFilterError(
                    f"rollout_gate: the threshold {key} is not a number: {value!r}"
                ) from None
    return out


def rollout_gate(figures: dict, limits: dict) -> dict:
    """Judge a rollout step's canary against its baseline.

    ``figures`` holds what Prometheus answered over the window (a number, or None when it had
    no sample): ``requests``, ``errors`` (5xx) and ``restarts`` of the canary, ``temperature``
    and ``throttled`` (its Pi sources, absent elsewhere), and ``tps`` and ``p95`` of the canary
    and the baseline (``tps_baseline``, ``p95_baseline``). ``limits`` holds the thresholds, each
    None to skip its check. A check that has no figure to judge fails, except where the
    figure's absence is no evidence (no Pi sources, no baseline left to compare with).
    """
    limits = _limits(limits)
    checks: list[dict] = []

    def check(name: str, value: float | None, limit: object, passed: bool, note: str = "") -> None:
        checks.append({"check": name, "value": value, "limit": limit, "passed": passed, "note": note})

    requests = _figure(figures, "requests")
    if limits.get("min_requests"):
        check(
            "requests",
            requests,
            limits["min_requests"],
            (requests or 0) >= limits["min_requests"],
            ""
            if (requests or 0) >= limits["min_requests"]
            else "too little traffic to judge the new version",
        )
    # Without canary traffic the ratios have nothing to judge; the requests check (min_requests)
    # decides whether that is acceptable.
    idle = not requests
    if limits.get("max_error_ratio") is not None:
        ratio = _ratio(_figure(figures, "errors") or 0.0, requests)
        passed = idle or ratio <= limits["max_error_ratio"]
        check("error ratio", ratio, limits["max_error_ratio"], passed, "no canary traffic" if idle else "")
    for name, key, limit_key, higher_is_better in (
        ("tokens/s ratio", "tps", "min_tokens_per_second_ratio", True),
        ("p95 latency ratio", "p95", "max_latency_p95_ratio", False),
    ):
        if limits.get(limit_key) is None:
            continue
        canary, baseline = _figure(figures, key), _figure(figures, f"{key}_baseline")
        if baseline is None:
            check(name, None, limits[limit_key], True, "no baseline figure: nothing to compare with")
            continue
        ratio = _ratio(canary, baseline)
        if ratio is None:
            note = "no canary traffic" if idle else "no canary figure in the window"
            check(name, None, limits[limit_key], idle, note)
            continue
        passed = ratio >= limits[limit_key] if higher_is_better else ratio <= limits[limit_key]
        check(name, ratio, limits[limit_key], passed, f"canary {canary:.4g}, baseline {baseline:.4g}")
    if limits.get("max_restarts") is not None:
        restarts = _figure(figures, "restarts") or 0.0
        check("restarts", restarts, limits["max_restarts"], restarts <= limits["max_restarts"])
    temperature = _figure(figures, "temperature")
    if limits.get("max_temperature") is not None:
        check(
            "temperature",
            temperature,
            limits["max_temperature"],
            temperature is None or temperature <= limits["max_temperature"],
            "no Pi temperature source" if temperature is None else "",
        )
    if not limits.get("allow_throttling", False):
        throttled = _figure(figures, "throttled")
        check(
            "throttled", throttled, 0, not throttled, "no Pi throttling source" if throttled is None else ""
        )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def rollout_check_line(check: dict) -> str:
    """One gate check as a line for the operator: figure, limit, verdict, why."""
    value = check.get("value")
    shown = "no figure" if value is None else f"{value:.4g}"
    limit = check["limit"]
    limit = f"{limit:g}" if isinstance(limit, float) else limit
    line = f"{check['check']} {shown} (limit {limit}): {'ok' if check['passed'] else 'FAILED'}"
    return f"{line}, {check['note']}" if check.get("note") else line


def _shown(value: object, digits: int = 1) -> str:
    if value is None or value == "":
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def rollout_summary(rows: list, gates: list | None = None) -> list[str]:
    """The rollout's summary as a table of lines: one row per node, then each gate's verdict."""
    header = ("node", "from -> to", "step", "TTFT ms", "tok/s", "seconds", "recovery s", "result")
    table = [header] + [
        (
            str(row["node"]),
            f"{row.get('from') or '-'} -> {row.get('to') or '-'}",
            str(row.get("step", "-")),
            _shown(row.get("ttft_ms"), 0),
            _shown(row.get("tokens_per_second")),
            _shown(row.get("seconds")),
            _shown(row.get("recovery_seconds")),
            str(row.get("result", "-")),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
    for gate in gates or []:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines.append(
            f"gate after step {gate['step']} ({', '.join(gate['canary'])} against "
            f"{', '.join(gate['baseline']) or 'no baseline'}): {verdict}"
        )
        lines.extend(f"  {rollout_check_line(check)}" for check in gate["checks"])
    return lines


class FilterModule:
    def filters(self) -> dict:
        return {
            "edge_backend": edge_backend,
            "edge_server": edge_server,
            "farm_address": farm_address,
            "rollout_plan": rollout_plan,
            "rollout_gate": rollout_gate,
            "rollout_check_line": rollout_check_line,
            "rollout_summary": rollout_summary,
        }
