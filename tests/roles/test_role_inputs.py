"""Bad input to a role fails before the host is touched, with a message naming the variable."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from playbook_harness import (
    ARGSPEC,
    LOCALHOST,
    assert_refused_before_the_host,
    first_failed_task,
    recap,
    run_playbook,
    run_role,
)

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("role", "extra_vars", "failing_task", "named"),
    [
        pytest.param(
            "node_base",
            {"node_base_cpu_governor": "turbo"},
            ARGSPEC,
            "node_base_cpu_governor",
            id="unknown-governor",
        ),
        pytest.param(
            "node_base",
            {"node_base_wifi_powersave_disabled": "sometimes"},
            ARGSPEC,
            "node_base_wifi_powersave_disabled",
            id="not-a-bool",
        ),
        pytest.param(
            "node_base",
            {"node_base_packages": {"chrony": True}},
            ARGSPEC,
            "node_base_packages",
            id="dict-for-list",
        ),
        pytest.param(
            "node_base",
            {"node_base_journald_system_max_use": "lots"},
            "Assert journald sizes are byte counts",
            "node_base_journald_system_max_use=lots",
            id="bad-journald-size",
        ),
        pytest.param(
            "node_base",
            {"node_base_chrony_pools": [], "node_base_chrony_servers": []},
            "Assert chrony has at least one time source",
            "node_base_chrony_pools",
            id="no-time-source",
        ),
        pytest.param(
            "node_base",
            {"node_base_ca_certificates": [{"content": "-----BEGIN CERTIFICATE-----"}]},
            "Assert each extra CA certificate has one source and a name",
            "node_base_ca_certificates[0]",
            id="ca-without-name",
        ),
        pytest.param(
            "node_base",
            {"node_base_ca_certificates": [{"src": "/nonexistent/proxy-ca.crt"}]},
            "Assert each extra CA certificate has one source and a name",
            "node_base_ca_certificates[0]",
            id="ca-file-missing",
        ),
        pytest.param(
            "pi_boot",
            {"pi_boot_boot_order": "0xz1"},
            "Decode the boot order",
            "'0xz1'",
            id="malformed-boot-order",
        ),
        pytest.param(
            "pi_boot",
            {"pi_boot_npu": True, "pi_boot_nvme": True},
            "Assert an NPU and an NVMe drive do not compete",
            "pi_boot_pcie_switch: true",
            id="npu-and-nvme-without-switch",
        ),
        pytest.param(
            "pi_boot",
            {"pi_boot_model_disk_device": "sda"},
            "Assert the model disk is a device path",
            "pi_boot_model_disk_device=sda",
            id="model-disk-not-a-device",
        ),
        pytest.param(
            "npu",
            {"npu_enabled": True, "npu_package_versions": {"hailort": "4.20.0", "h10-hailort": "5.1.1"}},
            "Assert only one Hailo stack is requested",
            "cannot be installed together",
            id="both-npu-stacks",
        ),
        pytest.param(
            "npu",
            {"npu_enabled": True, "npu_stack": "hailo9"},
            ARGSPEC,
            "npu_stack",
            id="unknown-npu-stack",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_alert_for": "soon"},
            "Check monitoring variables before changing anything",
            "monitoring_alert_for and monitoring_alert_version_drift_for must be Prometheus durations",
            id="alert-for-not-a-duration",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_alert_version_drift_for": "a while"},
            "Check monitoring variables before changing anything",
            "monitoring_alert_version_drift_for must be Prometheus durations",
            id="version-drift-for-not-a-duration",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_alert_edge_min_healthy": "many"},
            ARGSPEC,
            "monitoring_alert_edge_min_healthy",
            id="min-healthy-not-a-number",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_alertmanager_webhook_url": "ftp://alerts.example.net/hook"},
            "Check monitoring variables before changing anything",
            "the webhook an http(s) URL",
            id="webhook-not-http",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_alert_job_backlog": 0},
            "Check monitoring variables before changing anything",
            "monitoring_alert_job_backlog at least 1",
            id="backlog-zero",
        ),
        pytest.param(
            "monitoring",
            {"monitoring_store_bearer_token": ""},
            "Check monitoring variables before changing anything",
            "monitoring_store_bearer_token unset or not empty",
            id="empty-store-token",
        ),
        pytest.param(
            "monitoring",
            {
                # The one host of the test inventory is a gateway; no stats password anywhere.
                "farm_inventory_groups": {
                    "nodes": "pifarm_nodes",
                    "nodes_cpu": "pifarm_nodes_cpu",
                    "nodes_npu": "pifarm_nodes_npu",
                    "gateway": "ungrouped",
                    "storage": "pifarm_storage",
                    "monitoring": "pifarm_monitoring",
                }
            },
            "Check monitoring variables before changing anything",
            "monitoring_gateway_stats_password (by default gateway_haproxy_stats_password) set",
            id="gateways-without-stats-password",
        ),
        pytest.param(
            "farm_exporter",
            {"farm_exporter_npu_utilization": "maybe"},
            ARGSPEC,
            "farm_exporter_npu_utilization",
            id="npu-utilization-not-a-bool",
        ),
    ],
)
def test_bad_input_fails_before_touching_the_host(
    tmp_path, ansible_env, role, extra_vars, failing_task, named
):
    result = run_role(role, tmp_path, ansible_env, extra_vars)
    assert_refused_before_the_host(result, failing_task, named)


@pytest.mark.parametrize(
    ("role", "extra_vars"),
    [
        ("node_base", {"node_base_cpu_governor": "schedutil"}),
        ("pi_boot", {"pi_boot_npu": True, "pi_boot_nvme": False, "pi_boot_boot_order": "0xf14"}),
        ("pi_boot", {"pi_boot_npu": True, "pi_boot_nvme": True, "pi_boot_pcie_switch": True}),
        ("npu", {"npu_enabled": True, "npu_package_versions": {"hailort": "4.20.0"}}),
        (
            "monitoring",
            {
                "monitoring_alert_for": "90s",
                "monitoring_alertmanager_webhook_url": "https://hooks.example.net/x",
            },
        ),
    ],
)
def test_good_input_passes_the_checks_and_reaches_the_host(tmp_path, ansible_env, role, extra_vars):
    """The control case: with valid input the run gets past every check to the host."""
    result = run_role(role, tmp_path, ansible_env, extra_vars)
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0


@pytest.mark.parametrize(
    "extra_vars",
    [
        pytest.param({}, id="no-target"),
        pytest.param({"pifarm_clone_target": "/dev/nvme0n1"}, id="no-confirmation"),
        pytest.param(
            {"pifarm_clone_target": "/dev/nvme0n1", "pifarm_clone_confirm": "/dev/sda"}, id="other-device"
        ),
        pytest.param(
            {"pifarm_clone_target": "/dev/mmcblk0", "pifarm_clone_confirm": "/dev/mmcblk0"}, id="sd-as-target"
        ),
    ],
)
def test_clone_never_runs_without_naming_the_target_twice(tmp_path, ansible_env, extra_vars):
    playbook = HERE.parents[1] / "playbooks" / "clone_sd_to_nvme.yml"
    result = run_playbook(playbook, tmp_path, ansible_env, {"pifarm_clone_hosts": "all", **extra_vars})
    counts = recap(result)
    assert counts["failed"] == 1
    assert counts["unreachable"] == 0
    assert "Refusing to clone: this ERASES the target drive" in result.stdout


FIXTURES = HERE.parent / "unit" / "fixtures" / "pi5"


@pytest.mark.parametrize(
    ("extra_vars", "failing_task", "message"),
    [
        pytest.param(
            {},
            "Assert Raspberry Pi's apt repository provides the stack",
            "hailo-h10-all has no install candidate",
            id="no-raspberry-pi-repository",
        ),
        pytest.param(
            {"npu_stack": "hailo8"},
            "Assert the requested stack matches the board",
            "a hailo10h at 0001:01:00.0, which needs hailo-h10-all",
            id="stack-does-not-match-board",
        ),
    ],
)
def test_npu_stops_before_installing_anything(tmp_path, ansible_env, extra_vars, failing_task, message):
    """The npu role on this (Debian, non-Pi) machine, reading a recorded Pi 5 with an AI HAT+ 2.

    Everything up to the refusal only reads (facts, dpkg, apt-cache policy), so it
    runs for real on the test host over a local connection; --check guarantees a
    host that does have Raspberry Pi's repository gets nothing installed either.
    """
    extra_vars = {"npu_enabled": True, "npu_root": str(FIXTURES / "pi5-16gb-hailo10h"), **extra_vars}
    result = run_role("npu", tmp_path, ansible_env, extra_vars, inventory=LOCALHOST, check=True)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert failing_task in first_failed_task(result)
    assert message in result.stdout


@pytest.mark.parametrize(
    ("extra_vars", "failing_task", "message"),
    [
        pytest.param(
            {"farm_cpu_network_cores": "0-1", "farm_cpu_inference_cores": "1-3"},
            "Assert network and inference cores do not overlap",
            "share CPUs 1",
            id="overlapping-cpu-budget",
        ),
        pytest.param(
            {"farm_cpu_network_cores": "0", "farm_cpu_inference_cores": "1-63"},
            "Assert the CPU budget fits the host",
            "farm_cpu_inference_cores=1-63",
            id="cpus-the-host-lacks",
        ),
        pytest.param(
            {"farm_cpu_network_cores": "zero"},
            "Expand the CPU budget",
            "'zero'",
            id="cpu-list-garbage",
        ),
        pytest.param(
            {"farm_cpu_inference_cores": "1", "net_tuning_interfaces": ["pifarm-no-nic0"]},
            "Assert the interfaces exist",
            "net_tuning_interfaces names pifarm-no-nic0",
            id="missing-interface",
        ),
        pytest.param(
            {"farm_cpu_inference_cores": "1", "net_tuning_congestion_control": "pifarm-no-cc"},
            "Assert the congestion control algorithm is available",
            "net_tuning_congestion_control=pifarm-no-cc is not available",
            id="congestion-control-unavailable",
        ),
    ],
)
def test_net_tuning_refuses_on_this_host_before_any_change(
    tmp_path, ansible_env, extra_vars, failing_task, message
):
    """net_tuning in check mode on this machine: its checks read the real /sys and /proc."""
    result = run_role("net_tuning", tmp_path, ansible_env, extra_vars, inventory=LOCALHOST, check=True)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert failing_task in first_failed_task(result)
    assert message in result.stdout


NETWORK_BOND = {"network_bond_enabled": True, "network_bond_members": ["eth0", "eth1"]}


def first_unreachable_task(result: subprocess.CompletedProcess) -> str:
    """The header of the task the run first lost the host in."""
    unreachable = re.search(r"^fatal: \[[^]]+\]: UNREACHABLE!", result.stdout, re.MULTILINE)
    assert unreachable, result.stdout
    return result.stdout[: unreachable.start()].rsplit("TASK [", 1)[1]


@pytest.mark.parametrize(
    ("extra_vars", "failing_task", "named"),
    [
        pytest.param(
            {"network_bond_members": ["eth0"]},
            "Assert the bond has two or more distinct members",
            "network_bond_members=['eth0']",
            id="bond-one-member",
        ),
        pytest.param(
            {"network_bond_members": ["eth0", "eth0"]},
            "Assert the bond has two or more distinct members",
            "network_bond_members=['eth0', 'eth0']",
            id="bond-same-member-twice",
        ),
        pytest.param(
            {"network_bond_members": ["eth0", "bond0"]},
            "Assert the bond is not one of its own members",
            "network_bond_name=bond0 is also listed in network_bond_members",
            id="bond-member-of-itself",
        ),
        pytest.param(
            {"network_bond_members": ["eth0", "eth1:0"]},
            "Assert the interface names are valid",
            "'eth1:0'",
            id="bond-member-not-an-interface-name",
        ),
        pytest.param(
            {"network_bond_mode": "balance-rr"},
            ARGSPEC,
            "network_bond_mode",
            id="bond-unknown-mode",
        ),
        pytest.param(
            {"network_bond_xmit_hash_policy": "layer5"},
            ARGSPEC,
            "network_bond_xmit_hash_policy",
            id="bond-unknown-hash-policy",
        ),
        pytest.param(
            {"network_bond_ipv4": {"method": "manual"}},
            ARGSPEC,
            "network_bond_ipv4",
            id="bond-unknown-ipv4-method",
        ),
        pytest.param(
            {"network_bond_mtu": 70000},
            "Assert the MTU and the link monitoring interval are sane",
            "network_bond_mtu=70000",
            id="bond-mtu-out-of-range",
        ),
        pytest.param(
            {"network_bond_ipv4": {"method": "static"}},
            "Assert the IPv4 settings are complete and well formed",
            "method static needs an address",
            id="bond-static-without-address",
        ),
        pytest.param(
            {"network_bond_ipv4": {"method": "static", "address": "192.168.10.21"}},
            "Assert the IPv4 settings are complete and well formed",
            "192.168.10.21",
            id="bond-static-address-without-prefix",
        ),
        pytest.param(
            {"network_bond_ipv4": {"method": "dhcp", "address": "192.168.10.21/24"}},
            "Assert the IPv4 settings are complete and well formed",
            "belong to method static only",
            id="bond-dhcp-with-address",
        ),
        pytest.param(
            {"network_bond_ipv6": {"method": "static", "address": "fd00:10::21"}},
            "Assert the IPv6 settings are complete and well formed",
            "fd00:10::21",
            id="bond-static-ipv6-without-prefix",
        ),
        pytest.param(
            {"network_bond_dns": ["dns.example"]},
            "Assert the DNS servers are addresses",
            "network_bond_dns entry 'dns.example'",
            id="bond-dns-not-an-address",
        ),
        pytest.param(
            {"network_bond_confirm_timeout": 120},
            "Assert the confirmation fits before the revert",
            "network_bond_confirm_timeout=120",
            id="bond-confirm-not-before-revert",
        ),
        pytest.param(
            {"network_bond_mac_address": "2c:cf:67"},
            "Assert the MAC address is one",
            "network_bond_mac_address=2c:cf:67",
            id="bond-bad-mac",
        ),
    ],
)
def test_network_bond_refuses_bad_input_before_touching_the_host(
    tmp_path, ansible_env, extra_vars, failing_task, named
):
    result = run_role("network_bond", tmp_path, ansible_env, {**NETWORK_BOND, **extra_vars})
    assert_refused_before_the_host(result, failing_task, named)


@pytest.mark.parametrize(
    "extra_vars",
    [
        pytest.param({}, id="bond-dhcp"),
        pytest.param(
            {
                "network_bond_mode": "active-backup",
                "network_bond_mtu": 9000,
                "network_bond_ipv4": {
                    "method": "static",
                    "address": "192.168.10.21/24",
                    "gateway": "192.168.10.1",
                },
                "network_bond_ipv6": {"method": "static", "address": "fd00:10::21/64"},
                "network_bond_dns": ["192.168.10.1", "fd00:10::1"],
            },
            id="bond-static-jumbo-active-backup",
        ),
    ],
)
def test_network_bond_good_input_reaches_the_host(tmp_path, ansible_env, extra_vars):
    """The control case: valid input passes every controller-side check and goes on to the host."""
    result = run_role("network_bond", tmp_path, ansible_env, {**NETWORK_BOND, **extra_vars})
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
    assert "Ask whether an earlier change is still on trial" in first_unreachable_task(result)


def test_network_bond_is_opt_in(tmp_path, ansible_env):
    """Without network_bond_enabled the role says so and never reaches the host."""
    result = run_role("network_bond", tmp_path, ansible_env, {"network_bond_members": ["eth0", "eth1"]})
    assert result.returncode == 0, result.stdout
    counts = recap(result)
    assert counts["unreachable"] == 0
    assert counts["changed"] == 0
    assert "SKIPPED network_bond on pifarm-no-such-host: network_bond_enabled is false" in result.stdout


def test_network_bond_refuses_a_member_this_host_lacks_before_any_change(tmp_path, ansible_env):
    """network_bond in check mode on this machine: the member check reads its real links."""
    extra_vars = {**NETWORK_BOND, "network_bond_members": ["lo", "pifarm-no-nic0"]}
    result = run_role("network_bond", tmp_path, ansible_env, extra_vars, inventory=LOCALHOST, check=True)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert "Assert every member exists on the host" in first_failed_task(result)
    assert "network_bond_members names pifarm-no-nic0, which localhost does not have" in result.stdout
