"""eeprom_config against a stand-in rpi-eeprom-config that keeps the "EEPROM" in a state file."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible_collections.pifarm.inference.plugins.modules import eeprom_config
from module_harness import ModuleExitError, ModuleFailError, module_result, no_bin_path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi5" / "eeprom"
DEFAULT = (FIXTURES / "rpi-eeprom-config-default.txt").read_text()
COMMENTED = (FIXTURES / "rpi-eeprom-config-nvme-first-commented.txt").read_text()
NVME_FIRST = DEFAULT.replace("BOOT_ORDER=0xf461", "BOOT_ORDER=0xf416")


class StandIn:
    """rpi-eeprom-config: prints the state file; --apply copies the file there and logs it."""

    def __init__(self, directory: Path, config: str, apply_rc: int = 0, read_rc: int = 0):
        self.state = directory / "eeprom.conf"
        self.calls = directory / "calls.log"
        self.applies = directory / "apply.log"
        self.path = directory / "rpi-eeprom-config"
        self.state.write_text(config)
        self.path.write_text(
            "#!/bin/sh\n"
            "set -eu\n"
            f'echo "$*" >> "{self.calls}"\n'
            'case "${1:-}" in\n'
            f'  "") cat "{self.state}"; exit {read_rc} ;;\n'
            "  --apply)\n"
            f"    if [ {apply_rc} -ne 0 ]; then\n"
            '      echo "--edit/--apply must be run as root" >&2\n'
            f"      exit {apply_rc}\n"
            "    fi\n"
            f'    cp "$2" "{self.state}"\n'
            f'    echo "apply" >> "{self.applies}"\n'
            '    echo "EEPROM update staged"\n'
            "    ;;\n"
            '  *) echo "unsupported: $*" >&2; exit 2 ;;\n'
            "esac\n"
        )
        self.path.chmod(0o755)

    def call_log(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def apply_count(self) -> int:
        return len(self.applies.read_text().splitlines()) if self.applies.exists() else 0


@pytest.fixture
def module_tmp(tmp_path):
    path = tmp_path / "moduletmp"
    path.mkdir()
    return str(path)


def run(stand_in: StandIn | None, module_tmp: str, expect=ModuleExitError, **args) -> dict:
    if stand_in is not None:
        args.setdefault("command", str(stand_in.path))
    args["_ansible_tmpdir"] = module_tmp
    return module_result(eeprom_config, expect, args)


def test_change_is_staged_with_apply(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    result = run(stand_in, module_tmp, settings={"BOOT_ORDER": "0xf416"})
    assert result["changed"] is True
    assert result["reboot_required"] is True
    assert result["current"] == {"BOOT_UART": "1", "POWER_OFF_ON_HALT": "0", "BOOT_ORDER": "0xf461"}
    assert result["desired"] == {"BOOT_UART": "1", "POWER_OFF_ON_HALT": "0", "BOOT_ORDER": "0xf416"}
    assert stand_in.state.read_text() == NVME_FIRST
    assert stand_in.apply_count() == 1
    assert stand_in.call_log()[0] == ""
    assert stand_in.call_log()[1].startswith(f"--apply {module_tmp}/")


def test_second_run_is_idempotent(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    settings = {"BOOT_ORDER": "0xf416", "PCIE_PROBE": 1}
    assert run(stand_in, module_tmp, settings=settings)["changed"] is True
    again = run(stand_in, module_tmp, settings=settings)
    assert again["changed"] is False
    assert again["reboot_required"] is False
    assert again["current"] == again["desired"]
    assert stand_in.apply_count() == 1


def test_matching_settings_change_nothing(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    result = run(
        stand_in, module_tmp, settings={"BOOT_ORDER": "0xF461", "BOOT_UART": 1, "POWER_OFF_ON_HALT": False}
    )
    assert result["changed"] is False
    assert stand_in.apply_count() == 0
    assert stand_in.call_log() == [""]


def test_whitespace_only_difference_is_no_change(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, "[all]\nBOOT_UART = 1 \nBOOT_ORDER=0xf416\n")
    assert run(stand_in, module_tmp, settings={"BOOT_UART": "1"})["changed"] is False
    assert stand_in.apply_count() == 0


def test_check_mode_reports_the_change_and_does_not_apply(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    result = run(stand_in, module_tmp, settings={"BOOT_ORDER": "0xf416"}, _ansible_check_mode=True)
    assert result["changed"] is True
    assert result["desired"]["BOOT_ORDER"] == "0xf416"
    assert stand_in.state.read_text() == DEFAULT
    assert stand_in.call_log() == [""]
    assert stand_in.apply_count() == 0


def test_diff_shows_the_config_text(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, COMMENTED)
    result = run(
        stand_in,
        module_tmp,
        settings={"BOOT_ORDER": "0xf461", "NET_INSTALL_AT_POWER_ON": 1},
        _ansible_diff=True,
        _ansible_check_mode=True,
    )
    after = COMMENTED.replace("BOOT_ORDER=0xf416\n", "BOOT_ORDER=0xf461\n").replace(
        "PSU_MAX_CURRENT=5000\n", "PSU_MAX_CURRENT=5000\nNET_INSTALL_AT_POWER_ON=1\n"
    )
    assert result["diff"] == {
        "before": COMMENTED,
        "after": after,
        "before_header": "rpi-eeprom-config (current)",
        "after_header": "rpi-eeprom-config (desired)",
    }


def test_no_diff_without_diff_mode(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    assert "diff" not in run(stand_in, module_tmp, settings={"BOOT_ORDER": "0xf416"})


def test_applied_config_keeps_comments_and_conditional_sections(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, COMMENTED)
    run(stand_in, module_tmp, settings={"PSU_MAX_CURRENT": 3000})
    assert stand_in.state.read_text() == COMMENTED.replace("PSU_MAX_CURRENT=5000", "PSU_MAX_CURRENT=3000")


def test_unquoted_yaml_boot_order_is_written_in_hex(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT)
    run(stand_in, module_tmp, settings={"BOOT_ORDER": 0xF416})
    assert stand_in.state.read_text() == NVME_FIRST


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"BOOT_ORDER": "0xz1"}, "settings.BOOT_ORDER '0xz1' is not a boot order: "),
        ({"BOOT_ORDER": "0xf416", "boot_uart": 1}, "settings key 'boot_uart' is not an EEPROM setting name"),
    ],
)
def test_invalid_settings_fail_before_any_call(tmp_path, module_tmp, settings, message):
    stand_in = StandIn(tmp_path, DEFAULT)
    failed = run(stand_in, module_tmp, ModuleFailError, settings=settings)
    assert failed["msg"].startswith(message)
    assert stand_in.call_log() == []
    assert stand_in.state.read_text() == DEFAULT


def test_missing_command_names_the_package(module_tmp, monkeypatch):
    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", no_bin_path)
    failed = run(None, module_tmp, ModuleFailError, settings={"BOOT_ORDER": "0xf416"})
    assert failed["msg"].startswith("rpi-eeprom-config not found on the PATH: ")
    assert "rpi-eeprom package from Raspberry Pi's apt repository" in failed["msg"]


def test_absent_command_path_names_the_package(tmp_path, module_tmp):
    absent = tmp_path / "usr/bin/rpi-eeprom-config"
    failed = run(None, module_tmp, ModuleFailError, settings={"BOOT_ORDER": "0xf416"}, command=str(absent))
    assert failed["msg"] == (
        f"rpi-eeprom-config {absent} is not an executable file: install the rpi-eeprom package "
        "from Raspberry Pi's apt repository (archive.raspberrypi.com)"
    )


def test_apply_failure_reports_rc_and_stderr(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT, apply_rc=1)
    failed = run(stand_in, module_tmp, ModuleFailError, settings={"BOOT_ORDER": "0xf416"})
    assert failed["rc"] == 1
    assert failed["stderr"].strip() == "--edit/--apply must be run as root"
    assert failed["msg"].endswith("exit 1: --edit/--apply must be run as root")
    assert stand_in.state.read_text() == DEFAULT


def test_read_failure_reports_rc(tmp_path, module_tmp):
    stand_in = StandIn(tmp_path, DEFAULT, read_rc=3)
    failed = run(stand_in, module_tmp, ModuleFailError, settings={"BOOT_ORDER": "0xf416"})
    assert failed["rc"] == 3
    assert "could not read the bootloader configuration" in failed["msg"]
    assert stand_in.apply_count() == 0
