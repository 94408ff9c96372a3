"""boot_config through AnsibleModule: real config.txt files, check mode, diff, backup, failures."""

from __future__ import annotations

import difflib
import functools
import os
import stat
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.modules import boot_config
from module_harness import fail_module, run_module

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "config_txt"
BOOKWORM = (FIXTURES / "bookworm-config.txt").read_bytes()
HAND_EDITED = (FIXTURES / "pi5-hand-edited-config.txt").read_bytes()
# A fixed, old modification time: a write would move it.
OLD_MTIME_NS = 1_700_000_000_000_000_000


run = functools.partial(run_module, boot_config)

fail = functools.partial(fail_module, boot_config)


def added_and_removed(before: bytes, after: bytes) -> list[str]:
    diff = difflib.unified_diff(before.decode().split("\n"), after.decode().split("\n"), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


@pytest.fixture
def config_txt(tmp_path: Path) -> Path:
    """A copy of the shipped bookworm config.txt with an old mtime."""
    path = tmp_path / "firmware" / "config.txt"
    path.parent.mkdir()
    path.write_bytes(BOOKWORM)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return path


@pytest.fixture
def untouchable(monkeypatch):
    """Makes reading the file an error: for checks that must fail before any read."""

    def read_config(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(boot_config, "read_config", read_config)


PCIE = {"dtparams": {"pciex1": None, "pciex1_gen": 3}}


def test_pcie_adds_exactly_two_lines_and_reports_a_reboot(config_txt):
    result = run(path=str(config_txt), _ansible_diff=True, **PCIE)
    after = config_txt.read_bytes()
    assert added_and_removed(BOOKWORM, after) == ["+dtparam=pciex1", "+dtparam=pciex1_gen=3"]
    assert after == BOOKWORM + b"dtparam=pciex1\ndtparam=pciex1_gen=3\n"
    assert result["changed"] is True
    assert result["reboot_required"] is True
    assert result["diff"] == {
        "before": BOOKWORM.decode(),
        "after": after.decode(),
        "before_header": str(config_txt),
        "after_header": str(config_txt),
    }
    assert "backup_file" not in result


def test_a_second_run_changes_nothing(config_txt):
    run(path=str(config_txt), **PCIE)
    edited = config_txt.read_bytes()
    os.utime(config_txt, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    result = run(path=str(config_txt), **PCIE)
    assert result == {"changed": False, "reboot_required": False}
    assert config_txt.read_bytes() == edited
    assert config_txt.stat().st_mtime_ns == OLD_MTIME_NS


def test_check_mode_reports_the_change_and_writes_nothing(config_txt):
    result = run(path=str(config_txt), _ansible_check_mode=True, _ansible_diff=True, **PCIE)
    assert result["changed"] is True
    assert result["reboot_required"] is True
    assert result["diff"]["after"].endswith("[all]\ndtparam=pciex1\ndtparam=pciex1_gen=3\n")
    assert config_txt.read_bytes() == BOOKWORM
    assert config_txt.stat().st_mtime_ns == OLD_MTIME_NS
    assert sorted(p.name for p in config_txt.parent.iterdir()) == ["config.txt"]


def test_no_diff_unless_asked(config_txt):
    assert "diff" not in run(path=str(config_txt), **PCIE)


def test_a_missing_section_is_created_at_the_end(config_txt):
    run(
        path=str(config_txt),
        section="pi5",
        dtoverlays=["pciex1-compat-pi5,no-mip"],
        settings={"arm_freq": 2800},
    )
    assert (
        config_txt.read_bytes() == BOOKWORM + b"\n[pi5]\narm_freq=2800\ndtoverlay=pciex1-compat-pi5,no-mip\n"
    )


def test_cm4_edits_stay_inside_cm4(config_txt):
    run(path=str(config_txt), section="cm4", settings={"otg_mode": False}, dtparams={"i2c_arm": True})
    after = config_txt.read_bytes()
    assert added_and_removed(BOOKWORM, after) == ["-otg_mode=1", "+otg_mode=0", "+dtparam=i2c_arm=on"]
    assert b"is not required.\notg_mode=0\ndtparam=i2c_arm=on\n\n[cm5]\n" in after


def test_absent_removes_only_the_requested_lines(config_txt):
    result = run(path=str(config_txt), section="cm5", dtoverlays=["dwc2,dr_mode=host"], state="absent")
    assert result["changed"] is True
    assert added_and_removed(BOOKWORM, config_txt.read_bytes()) == ["-dtoverlay=dwc2,dr_mode=host"]


def test_absent_of_lines_outside_the_block_is_no_change(config_txt):
    result = run(path=str(config_txt), dtparams={"audio": None}, settings={"arm_boost": None}, state="absent")
    assert result == {"changed": False, "reboot_required": False}
    assert config_txt.stat().st_mtime_ns == OLD_MTIME_NS


def test_the_hand_edited_file_keeps_its_layout(config_txt):
    config_txt.write_bytes(HAND_EDITED)
    run(
        path=str(config_txt),
        section="pi5",
        dtparams={"pciex1_gen": 3},
        dtoverlays=["pciex1-compat-pi5,no-mip"],
    )
    after = config_txt.read_bytes()
    assert added_and_removed(HAND_EDITED, after) == [
        "-dtparam=pciex1,pciex1_gen=2  ",
        "+dtparam=pciex1,pciex1_gen=3  ",
        "+dtoverlay=pciex1-compat-pi5,no-mip",
    ]
    assert after.endswith(b"\n[all]\ndtparam=audio=off,i2c_arm=on\nenable_uart=1")


def test_backup_keeps_the_old_content(config_txt):
    result = run(path=str(config_txt), backup=True, **PCIE)
    backup = Path(result["backup_file"])
    assert backup.parent == config_txt.parent
    assert backup.name.startswith("config.txt.")
    assert backup.read_bytes() == BOOKWORM
    assert config_txt.read_bytes() != BOOKWORM


def test_no_backup_when_nothing_changes(config_txt):
    result = run(path=str(config_txt), backup=True, section="cm4", settings={"otg_mode": 1})
    assert "backup_file" not in result
    assert sorted(p.name for p in config_txt.parent.iterdir()) == ["config.txt"]


def test_the_mode_is_kept(config_txt):
    config_txt.chmod(0o600)
    run(path=str(config_txt), **PCIE)
    assert stat.S_IMODE(config_txt.stat().st_mode) == 0o600
    assert sorted(p.name for p in config_txt.parent.iterdir()) == ["config.txt"]


def test_a_missing_file_is_created_when_present(tmp_path):
    path = tmp_path / "config.txt"
    old_umask = os.umask(0o022)
    try:
        result = run(path=str(path), section="pi5", **PCIE)
    finally:
        os.umask(old_umask)
    assert result["changed"] is True
    assert path.read_bytes() == b"[pi5]\ndtparam=pciex1\ndtparam=pciex1_gen=3\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_missing_file_with_nothing_to_write_is_not_created(tmp_path):
    path = tmp_path / "config.txt"
    assert run(path=str(path)) == {"changed": False, "reboot_required": False}
    assert not path.exists()


def test_a_missing_file_is_no_change_when_absent(tmp_path):
    path = tmp_path / "config.txt"
    assert run(path=str(path), state="absent", **PCIE) == {"changed": False, "reboot_required": False}
    assert not path.exists()


def test_a_missing_directory_fails(tmp_path):
    path = tmp_path / "firmware" / "config.txt"
    result = fail(path=str(path), **PCIE)
    assert result["msg"] == (
        f"create config.txt {path}: directory {path.parent} does not exist (is the boot partition mounted?)"
    )


def test_a_directory_is_refused(tmp_path):
    result = fail(path=str(tmp_path), **PCIE)
    assert result["msg"] == f"edit config.txt {tmp_path}: is a directory, give the path of the file"


@pytest.mark.usefixtures("untouchable")
def test_an_unknown_section_fails_before_reading(config_txt):
    result = fail(path=str(config_txt), section="pi6", **PCIE)
    assert result["msg"].startswith(
        f"edit config.txt {config_txt}: section 'pi6' is not a config.txt filter; "
        "use one of all, none, tryboot, pi0, "
    )
    assert "pi5" in result["msg"]
    assert "board-type=0x<type>" in result["msg"]
    assert config_txt.read_bytes() == BOOKWORM
    assert config_txt.stat().st_mtime_ns == OLD_MTIME_NS


@pytest.mark.usefixtures("untouchable")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"settings": {"arm boost": 1}}, "settings key 'arm boost' is not a config.txt key"),
        (
            {"settings": {"dtoverlay": "disable-bt"}},
            "settings key 'dtoverlay' has its own option: use dtoverlays",
        ),
        ({"settings": {"kernel": "[pi5]"}}, "settings value of 'kernel' starts with '['"),
        ({"settings": {"arm_freq": "2800\n[all]"}}, "settings value of 'arm_freq' contains a line break"),
        ({"dtparams": {"pciex1=on": None}}, "dtparams name 'pciex1=on' is not a device-tree parameter name"),
        ({"dtparams": {"pciex1_gen": "3,spi=on"}}, "dtparams value of 'pciex1_gen' contains ','"),
        ({"dtoverlays": ["disable bt"]}, "dtoverlays item 'disable bt' contains whitespace"),
        ({"dtoverlays": [""]}, "dtoverlays item '' must be a non-empty overlay spec"),
    ],
)
def test_bad_inputs_fail_before_reading(config_txt, args, message):
    result = fail(path=str(config_txt), **args)
    assert result["msg"].startswith(f"edit config.txt {config_txt}: {message}")
    assert config_txt.read_bytes() == BOOKWORM
    assert config_txt.stat().st_mtime_ns == OLD_MTIME_NS
