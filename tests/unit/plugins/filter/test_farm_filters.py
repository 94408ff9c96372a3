"""The farm's shared names and the rollout's plan (plugins/filter/farm.py)."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.pifarm.inference.plugins.filter.farm import (
    edge_backend,
    edge_server,
    farm_address,
    rollout_check_line,
    rollout_gate,
    rollout_plan,
    rollout_summary,
)

NODES = [f"n{i}" for i in range(1, 9)]


def test_farm_address_prefers_farm_address_then_ansible_host_then_the_name():
    hostvars = {
        "store1": {"farm_address": "10.0.10.5", "ansible_host": "192.168.1.5"},
        "node1": {"ansible_host": "192.168.1.21", "farm_address": None},
        "node2": {"farm_address": " "},
    }
    assert farm_address("store1", hostvars) == "10.0.10.5"
    assert farm_address("node1", hostvars) == "192.168.1.21"
    assert farm_address("node2", hostvars) == "node2"


@pytest.mark.parametrize(
    ("host", "message"), [("", "non-empty string"), ("ghost", "not a host of the inventory")]
)
def test_farm_address_refuses_what_is_not_a_host(host, message):
    with pytest.raises(AnsibleFilterError, match=message):
        farm_address(host, {"node1": {}})


def test_edge_names_keep_subject_and_label_safe_characters():
    assert edge_backend("qwen2.5-0.5b") == "edge_qwen2_5-0_5b"
    assert edge_backend("smollm2-135m") == "edge_smollm2-135m"
    assert edge_server("node1", "chat") == "node1_chat"


@pytest.mark.parametrize("bad", ["", None, 3])
def test_edge_names_refuse_what_is_not_a_name(bad):
    with pytest.raises(AnsibleFilterError):
        edge_backend(bad)
    with pytest.raises(AnsibleFilterError):
        edge_server("node1", bad)


def test_canary_quarter_all_over_eight_nodes():
    plan = rollout_plan(NODES, [1, "25%", "100%"], 2)
    assert [s["nodes"] for s in plan["steps"]] == [["n1"], ["n2"], NODES[2:]]
    assert [s["spec"] for s in plan["steps"]] == ["1", "25%", "100%"]
    assert plan["batches"] == [1, 1, 2, 2, 2]
    assert plan["gate_after"] == {"n1": 1, "n2": 2}
    assert plan["left_unswitched"] == []


def test_steps_that_add_no_node_are_dropped():
    # Two nodes: the canary already is 25 % (rounded up), so only two steps switch anything.
    plan = rollout_plan(["node1", "node2"], [1, "25%", "100%"])
    assert [s["nodes"] for s in plan["steps"]] == [["node1"], ["node2"]]
    assert [s["step"] for s in plan["steps"]] == [1, 2]
    assert plan["batches"] == [1, 1]
    assert plan["gate_after"] == {"node1": 1}


def test_counts_are_cumulative_and_capped_at_the_nodes():
    plan = rollout_plan(NODES[:3], [1, 2, 10])
    assert [s["nodes"] for s in plan["steps"]] == [["n1"], ["n2"], ["n3"]]
    assert rollout_plan(NODES[:3], ["2"])["steps"][0]["nodes"] == ["n1", "n2"]


def test_a_last_step_below_all_leaves_nodes_unswitched():
    plan = rollout_plan(NODES[:4], [1, "50%"])
    assert plan["left_unswitched"] == ["n3", "n4"]
    assert plan["gate_after"] == {"n1": 1}


def test_nothing_to_switch_is_an_empty_plan():
    assert rollout_plan([], [1, "100%"]) == {
        "steps": [],
        "batches": [],
        "gate_after": {},
        "left_unswitched": [],
    }


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "steps must be a non-empty list"),
        ([0], "rollout step 1: a count of nodes is 1 or more, got 0"),
        ([True], "rollout step 1: True is neither a count nor a percentage"),
        (["0%"], "rollout step 1: '0%' is neither a count of nodes"),
        (["150%"], "rollout step 1: '150%' is neither a count of nodes"),
        (["half"], "rollout step 1: 'half' is neither a count of nodes"),
        ([4, 2], "rollout step 2: 2 is 2 node(s), fewer than the 4 switched by the steps before it"),
    ],
)
def test_bad_steps_are_refused_with_the_step_named(steps, message):
    with pytest.raises(AnsibleFilterError) as raised:
        rollout_plan(NODES, steps)
    assert message in str(raised.value)


def test_bad_nodes_or_parallelism_are_refused():
    with pytest.raises(AnsibleFilterError, match="without repeats"):
        rollout_plan(["n1", "n1"], [1])
    with pytest.raises(AnsibleFilterError, match="max_unavailable must be 1 or more"):
        rollout_plan(NODES, [1], 0)


LIMITS = {
    "min_requests": 20,
    "max_error_ratio": 0.01,
    "min_tokens_per_second_ratio": 0.8,
    "max_latency_p95_ratio": 1.5,
    "max_restarts": 0,
    "max_temperature": 80,
    "allow_throttling": False,
}
HEALTHY = {
    "requests": 120.0,
    "errors": 0.0,
    "tps": 95.0,
    "tps_baseline": 100.0,
    "p95": 1.1,
    "p95_baseline": 1.0,
}


def failed_checks(figures: dict, limits: dict = LIMITS) -> list[str]:
    return [c["check"] for c in rollout_gate(figures, limits)["checks"] if not c["passed"]]


def test_a_healthy_canary_passes_and_absent_pi_sources_are_no_evidence():
    verdict = rollout_gate(HEALTHY, LIMITS)
    assert verdict["passed"] is True
    notes = {c["check"]: c["note"] for c in verdict["checks"]}
    assert notes["temperature"] == "no Pi temperature source"
    assert notes["throttled"] == "no Pi throttling source"
    assert notes["tokens/s ratio"] == "canary 95, baseline 100"


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"tps": 40.0}, ["tokens/s ratio"]),  # a slower model: 0.4 of the baseline
        ({"p95": 2.0}, ["p95 latency ratio"]),
        ({"errors": 3.0}, ["error ratio"]),
        ({"requests": 5.0}, ["requests"]),
        # No traffic: the requests check fails alone; the ratios have nothing to judge.
        ({"requests": 0.0, "errors": 0.0, "tps": None, "p95": None}, ["requests"]),
        ({"restarts": 1.0}, ["restarts"]),
        ({"temperature": 85.0}, ["temperature"]),
        ({"throttled": 1.0}, ["throttled"]),
        ({"tps": float("nan")}, ["tokens/s ratio"]),  # 0/0 from Prometheus: no canary figure
    ],
)
def test_each_threshold_crossed_fails_its_check_alone(change, failed):
    assert failed_checks({**HEALTHY, **change}) == failed


def test_an_idle_canary_passes_only_when_no_traffic_is_required():
    idle = {
        "requests": 0.0,
        "errors": None,
        "tps": None,
        "tps_baseline": 100.0,
        "p95": None,
        "p95_baseline": 1.0,
    }
    assert rollout_gate(idle, {**LIMITS, "min_requests": 0})["passed"] is True
    assert failed_checks(idle) == ["requests"]
    # Traffic but no tokens counted: the canary is not shown sound.
    assert failed_checks({**HEALTHY, "tps": None}) == ["tokens/s ratio"]


def test_no_baseline_left_is_not_a_failure_and_a_disabled_check_is_skipped():
    verdict = rollout_gate({**HEALTHY, "tps_baseline": None, "p95_baseline": None}, LIMITS)
    assert verdict["passed"] is True
    limits = {**LIMITS, "min_tokens_per_second_ratio": None, "allow_throttling": True}
    checks = [c["check"] for c in rollout_gate({**HEALTHY, "tps": 1.0, "throttled": 1.0}, limits)["checks"]]
    assert "tokens/s ratio" not in checks
    assert "throttled" not in checks


def test_a_check_reads_as_one_line():
    checks = {c["check"]: c for c in rollout_gate({**HEALTHY, "tps": 40.0}, LIMITS)["checks"]}
    assert rollout_check_line(checks["tokens/s ratio"]) == (
        "tokens/s ratio 0.4 (limit 0.8): FAILED, canary 40, baseline 100"
    )
    assert rollout_check_line(checks["restarts"]) == "restarts 0 (limit 0): ok"
    assert (
        rollout_check_line(checks["temperature"])
        == "temperature no figure (limit 80): ok, no Pi temperature source"
    )


def test_the_summary_is_an_aligned_table_with_the_gates():
    switched = {"ttft_ms": 48.2, "tokens_per_second": 61.04, "seconds": 14.26, "recovery_seconds": None}
    rows = [
        {"node": "node1", "from": "1.0.0", "to": "1.1.0", "step": 1, "result": "switched", **switched},
        {"node": "node10", "from": "1.0.0", "to": "1.1.0", "step": "-", "result": "not reached"},
    ]
    gates = [{"step": 1, "canary": ["node1"], "baseline": ["node10"], **rollout_gate(HEALTHY, LIMITS)}]
    lines = rollout_summary(rows, gates)
    assert lines[0].startswith("node    from -> to")
    assert lines[0].split()[-3:] == ["recovery", "s", "result"]
    assert lines[1].split() == ["node1", "1.0.0", "->", "1.1.0", "1", "48", "61.0", "14.3", "-", "switched"]
    assert lines[2].split() == ["node10", "1.0.0", "->", "1.1.0", "-", "-", "-", "-", "-", "not", "reached"]
    assert lines[1].index("switched") == lines[2].index("not reached")
    assert lines[3] == "gate after step 1 (node1 against node10): passed"
    assert lines[4].startswith("  requests 120 (limit 20): ok")


def test_thresholds_given_as_strings_count_as_numbers():
    # -e model_rollout_gate_min_tokens_per_second_ratio=0.8 arrives as a string.
    limits = {key: str(value) for key, value in LIMITS.items()}
    assert failed_checks({**HEALTHY, "tps": 40.0}, limits) == ["tokens/s ratio"]
    with pytest.raises(AnsibleFilterError, match="the threshold max_restarts is not a number: 'none'"):
        rollout_gate(HEALTHY, {**LIMITS, "max_restarts": "none"})
