"""The farm's shared names and the rollout's plan (plugins/filter/farm.py)."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.pifarm.inference.plugins.filter.farm import edge_backend, edge_server, rollout_plan

NODES = [f"n{i}" for i in range(1, 9)]


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
