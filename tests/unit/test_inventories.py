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


def plays_of(playbook: Path) -> list[dict]:
    """The plays of a playbook, those of the playbooks it imports in their place."""
    plays = []
    for play in yaml.safe_load(playbook.read_text()):
        imported = play.get("ansible.builtin.import_playbook")
        plays += plays_of(playbook.parent / imported) if imported else [play]
    return plays


def test_site_playbook_targets_only_farm_groups():
    plays = plays_of(REPO / "playbooks/site.yml")
    assert "Model store on the storage host" in [play["name"] for play in plays]
    for play in plays:
        # A subscript picks hosts of a group (pifarm_storage[0]); the group must be the farm's.
        patterns = {re.sub(r"\[[0-9:-]+\]$", "", p) for p in play["hosts"].replace(",", ":").split(":")}
        assert patterns <= FARM_GROUPS, play["name"]


# --- the example secrets -----------------------------------------------------------------

EXAMPLE_VAULT_PASSWORD = REPO / "inventory" / "vault-password.example"
FARM_VARS = yaml.safe_load((REPO / "roles/farm/vars/main.yml").read_text())


class _VaultLoader(yaml.SafeLoader):
    """Reads `!vault |` values as their ciphertext."""


_VaultLoader.add_constructor("!vault", lambda loader, node: loader.construct_scalar(node))


def example_secrets(name: str) -> dict[str, str]:
    """The secrets of an example inventory, decrypted with the example vault password."""
    from ansible.parsing.vault import VaultLib, VaultSecret  # noqa: PLC0415 - only these tests need it

    vault = VaultLib([("default", VaultSecret(EXAMPLE_VAULT_PASSWORD.read_text().strip().encode()))])
    data = yaml.load((REPO / "inventory" / name / "group_vars" / "all.yml").read_text(), Loader=_VaultLoader)
    return {
        var: vault.decrypt(data[var]).decode() for var in FARM_VARS["__farm_secret_variables"] if var in data
    }


def test_the_farm_refuses_exactly_the_example_secrets():
    import hashlib  # noqa: PLC0415

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    known = {sha(EXAMPLE_VAULT_PASSWORD.read_text().strip())}
    for name in ("pi5-4node", "pi5-32node"):
        secrets = example_secrets(name)
        assert set(secrets) == set(FARM_VARS["__farm_secret_variables"]), name
        known |= {sha(value) for value in secrets.values()}
    assert set(FARM_VARS["__farm_example_secret_sha256"]) == known


@pytest.mark.parametrize(
    ("playbook", "limit"),
    [("site.yml", ["--limit", "pifarm_gateway"]), ("store.yml", [])],
    ids=["site", "store"],
)
def test_the_playbooks_refuse_a_farm_with_example_secrets(ansible_env, playbook, limit):
    inventory = REPO / "inventory" / "pi5-4node"
    argv = ["ansible-playbook", "-i", str(inventory), str(REPO / "playbooks" / playbook),
            "--vault-password-file", str(EXAMPLE_VAULT_PASSWORD), *limit]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True, env=ansible_env, check=False, timeout=300)
    assert refused.returncode != 0
    assert "still hold the example values" in refused.stdout
    for var in FARM_VARS["__farm_secret_variables"]:
        assert var in refused.stdout
    for value in example_secrets("pi5-4node").values():
        assert value not in refused.stdout + refused.stderr
    assert "unreachable=0" in refused.stdout  # refused before any host was touched
    allowed = subprocess.run(
        [*argv, "-e", "farm_example_secrets_allowed=true"],
        capture_output=True, text=True, env=ansible_env, check=False, timeout=300,
    )  # fmt: skip
    assert "still hold the example values" not in allowed.stdout
