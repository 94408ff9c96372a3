"""The example inventories use the farm's group names, and only those."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FARM_GROUPS = set(
    yaml.safe_load((REPO / "roles/farm/defaults/main.yml").read_text())["farm_inventory_groups"].values()
)
INVENTORIES = sorted(p.name for p in (REPO / "inventory").iterdir() if p.is_dir())


def inventory_groups(name: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        ["ansible-inventory", "-i", str(REPO / "inventory" / name), "--list"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out)


def hosts_of(inventory: dict, group: str) -> set[str]:
    entry = inventory.get(group, {})
    hosts = set(entry.get("hosts", []))
    for child in entry.get("children", []):
        hosts |= hosts_of(inventory, child)
    return hosts


@pytest.mark.parametrize("name", INVENTORIES)
def test_inventory_uses_only_farm_group_names(name: str, ansible_env):
    inventory = inventory_groups(name, ansible_env)
    groups = set(inventory) - {"_meta", "all", "ungrouped"}
    # ansible-inventory leaves out empty groups (the local farm has no NPU node).
    assert FARM_GROUPS - {"pifarm_nodes_npu"} <= groups
    extra = groups - FARM_GROUPS
    assert extra <= {"pifarm_local_farm"}, f"groups outside the farm's names: {extra}"


@pytest.mark.parametrize(
    ("name", "nodes", "npu_nodes"),
    [("pi5-4node", 4, 1), ("pi5-32node", 32, 4), ("local", 2, 0)],
)
def test_inventory_sizes(name: str, nodes: int, npu_nodes: int, ansible_env):
    inventory = inventory_groups(name, ansible_env)
    assert len(hosts_of(inventory, "pifarm_nodes")) == nodes
    assert len(hosts_of(inventory, "pifarm_nodes_npu")) == npu_nodes
    assert hosts_of(inventory, "pifarm_nodes") == hosts_of(inventory, "pifarm_nodes_cpu") | hosts_of(
        inventory, "pifarm_nodes_npu"
    )
    assert hosts_of(inventory, "pifarm_storage"), "a farm needs a storage host"
    assert hosts_of(inventory, "pifarm_gateway"), "a farm needs a gateway"


def test_site_playbook_targets_only_farm_groups():
    plays = yaml.safe_load((REPO / "playbooks/site.yml").read_text())
    for play in plays:
        # A subscript picks hosts of a group (pifarm_storage[0]); the group must be the farm's.
        patterns = {re.sub(r"\[[0-9:-]+\]$", "", p) for p in play["hosts"].replace(",", ":").split(":")}
        assert patterns <= FARM_GROUPS, play["name"]
