"""pi_facts on recorded Raspberry Pi 5 trees, with a stand-in vcgencmd written per test."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible_collections.pifarm.inference.plugins.modules import pi_facts
from module_harness import no_bin_path, run_module

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi5"


run = functools.partial(run_module, pi_facts)


def stand_in_vcgencmd(tmp_path: Path, throttled: str, bootloader: str, rc: int = 0) -> tuple[str, Path]:
    """A vcgencmd that prints recorded outputs and logs each call."""
    log = tmp_path / "vcgencmd.log"
    script = tmp_path / "vcgencmd"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'case "$1" in\n'
        f'  get_throttled) cat "{FIXTURES / "vcgencmd" / throttled}" ;;\n'
        f'  bootloader_version) cat "{FIXTURES / "vcgencmd" / bootloader}" ;;\n'
        '  *) echo "unknown command $1" >&2; exit 2 ;;\n'
        "esac\n"
        f"exit {rc}\n"
    )
    script.chmod(0o755)
    return str(script), log


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pi5-8gb-nvme-boot", ("Raspberry Pi 5 Model B Rev 1.0", 8192, "nvme", ["0x15b7:0x5017"], "none")),
        ("pi5-2gb-sd-boot", ("Raspberry Pi 5 Model B Rev 1.1", 2048, "sd", [], "none")),
        ("pi5-4gb-usb-boot", ("Raspberry Pi 5 Model B Rev 1.0", 4096, "usb", [], "none")),
        ("pi5-4gb-devroot-partuuid", ("Raspberry Pi 5 Model B Rev 1.0", 4096, "sd", [], "none")),
        ("pi5-8gb-hailo8", ("Raspberry Pi 5 Model B Rev 1.0", 8192, "sd", [], "hailo8")),
        ("pi5-16gb-hailo10h", ("Raspberry Pi 5 Model B Rev 1.1", 16384, "sd", [], "hailo10h")),
    ],
)
def test_facts_of_each_recorded_pi5(name, expected):
    result = run(root=str(FIXTURES / name))
    facts = result["ansible_facts"]["pifarm_pi"]
    assert result["changed"] is False
    assert facts["is_pi5"] is True
    nvme = [f"{d['vendor']}:{d['device']}" for d in facts["nvme_devices"]]
    assert (facts["model"], facts["memory_mb"], facts["boot_device"], nvme, facts["npu"]["type"]) == expected
    # a recorded tree runs no vcgencmd unless one is given
    assert facts["throttled"] == {}
    assert facts["bootloader"] == {}


def test_npu_device_nodes_are_reported_as_on_the_board():
    hailo8 = run(root=str(FIXTURES / "pi5-8gb-hailo8"))["ansible_facts"]["pifarm_pi"]["npu"]
    hailo10h = run(root=str(FIXTURES / "pi5-16gb-hailo10h"))["ansible_facts"]["pifarm_pi"]["npu"]
    assert hailo8 == {"type": "hailo8", "pci_address": "0001:01:00.0", "device_node": "/dev/hailo0"}
    assert hailo10h == {"type": "hailo10h", "pci_address": "0001:01:00.0", "device_node": "/dev/h1x-0"}


def test_stand_in_vcgencmd_fills_throttled_and_bootloader(tmp_path):
    vcgencmd, log = stand_in_vcgencmd(tmp_path, "get_throttled-0x50005.txt", "bootloader_version-2024.txt")
    facts = run(root=str(FIXTURES / "pi5-8gb-nvme-boot"), vcgencmd=vcgencmd)["ansible_facts"]["pifarm_pi"]
    assert facts["throttled"] == {
        "raw": "0x50005",
        "under_voltage": True,
        "freq_capped": False,
        "throttled": True,
        "soft_temp_limit": False,
        "under_voltage_occurred": True,
        "freq_capped_occurred": False,
        "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }
    assert facts["bootloader"] == {
        "date": "2024-09-23",
        "timestamp": 1727096576,
        "version": "2682625908f5585e5f4832bb82e74e7d757ec48f",
        "nvme_boot_min_date": "2023-12-06",
        "nvme_boot_supported": True,
    }
    assert log.read_text().splitlines() == ["get_throttled", "bootloader_version"]


def test_unreadable_vcgencmd_output_warns_and_leaves_the_fact_empty(tmp_path, module_exits):
    vcgencmd, _log = stand_in_vcgencmd(tmp_path, "get_throttled-0x0.txt", "bootloader_version-unknown.txt")
    facts = run(root=str(FIXTURES / "pi5-2gb-sd-boot"), vcgencmd=vcgencmd)["ansible_facts"]["pifarm_pi"]
    assert facts["throttled"]["raw"] == "0x0"
    assert facts["bootloader"] == {}
    assert len(module_exits) == 1
    assert "bootloader_version printed 'unknown\\n'" in module_exits[0]


def test_failing_vcgencmd_warns_with_its_exit_code(tmp_path, module_exits):
    vcgencmd, _log = stand_in_vcgencmd(tmp_path, "get_throttled-0x0.txt", "bootloader_version-2024.txt", rc=1)
    facts = run(root=str(FIXTURES / "pi5-2gb-sd-boot"), vcgencmd=vcgencmd)["ansible_facts"]["pifarm_pi"]
    assert facts["throttled"] == {}
    assert facts["bootloader"] == {}
    assert module_exits[0] == "vcgencmd get_throttled exited 1: throttled=0x0"
    assert module_exits[1].startswith("vcgencmd bootloader_version exited 1: 2024/09/23 14:02:56\n")


def test_non_pi_tree_reports_is_pi5_false(tmp_path):
    vcgencmd, _log = stand_in_vcgencmd(tmp_path, "get_throttled-0x50005.txt", "bootloader_version-2024.txt")
    result = run(root=str(FIXTURES / "non-pi-x86-aggregator"), vcgencmd=vcgencmd)
    facts = result["ansible_facts"]["pifarm_pi"]
    assert result["changed"] is False
    assert facts["is_pi5"] is False
    assert facts["model"] is None
    assert facts["throttled"] == {}
    assert facts["nvme_devices"] == []
    assert facts["boot_device"] == "unknown"


def test_root_slash_uses_the_vcgencmd_on_the_path(tmp_path, monkeypatch):
    vcgencmd, log = stand_in_vcgencmd(tmp_path, "get_throttled-0x0.txt", "bootloader_version-2024.txt")
    looked_up = []

    def get_bin_path(self, name, required=False, opt_dirs=None):
        looked_up.append(name)
        return vcgencmd

    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", get_bin_path)
    result = run()
    assert looked_up == ["vcgencmd"]
    assert log.read_text().splitlines() == ["get_throttled", "bootloader_version"]
    assert result["changed"] is False


def test_recorded_root_does_not_look_for_vcgencmd(monkeypatch):
    def get_bin_path(self, name, required=False, opt_dirs=None):
        raise AssertionError(f"looked up {name} for a recorded tree")

    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", get_bin_path)
    run(root=str(FIXTURES / "pi5-8gb-nvme-boot"))


def test_root_slash_without_vcgencmd_is_fine(monkeypatch):
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", no_bin_path)
    facts = run(root="/")["ansible_facts"]["pifarm_pi"]
    assert facts["throttled"] == {}
    assert facts["bootloader"] == {}


def test_check_mode_gives_the_same_facts(tmp_path):
    vcgencmd, _log = stand_in_vcgencmd(tmp_path, "get_throttled-0x80008.txt", "bootloader_version-2023.txt")
    args = {"root": str(FIXTURES / "pi5-8gb-nvme-boot"), "vcgencmd": vcgencmd}
    assert run(**args, _ansible_check_mode=True) == run(**args)
