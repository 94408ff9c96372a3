"""pi_hardware decodes recorded Raspberry Pi 5 outputs and board trees (tests/unit/fixtures/pi5)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.module_utils import pi_hardware as hw

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pi5"
PI5_TREES = [
    "pi5-2gb-sd-boot",
    "pi5-4gb-usb-boot",
    "pi5-4gb-devroot-partuuid",
    "pi5-8gb-nvme-boot",
    "pi5-8gb-hailo8",
    "pi5-16gb-hailo10h",
]


def tree(name: str) -> str:
    return str(FIXTURES / name)


def recording(name: str) -> str:
    return (FIXTURES / name).read_text()


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


# --- revision codes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "revision", "memory_mb", "board_revision"),
    [
        ("pi5-2gb-sd-boot", "b04171", 2048, 1),
        ("pi5-4gb-usb-boot", "c04170", 4096, 0),
        ("pi5-8gb-nvme-boot", "d04170", 8192, 0),
        ("pi5-16gb-hailo10h", "e04171", 16384, 1),
    ],
)
def test_cpuinfo_revision_of_each_pi5_decodes_to_its_memory(name, revision, memory_mb, board_revision):
    found = hw.parse_cpuinfo_revision(recording(f"{name}/proc/cpuinfo"))
    assert found == revision
    decoded = hw.decode_revision(int(found, 16))
    assert decoded == {
        "new_style": True,
        "memory_mb": memory_mb,
        "manufacturer": "Sony UK",
        "processor": 4,
        "soc": "bcm2712",
        "type": 0x17,
        "type_name": "Pi 5",
        "board_revision": board_revision,
        "is_pi5": True,
    }


@pytest.mark.parametrize(
    ("code", "type_name", "soc", "memory_mb"),
    [
        (0xD04180, "CM5", "bcm2712", 8192),
        (0xD04190, "Pi 500", "bcm2712", 8192),
        (0xC041A0, "CM5 Lite", "bcm2712", 4096),
        (0xC03115, "Pi 4 B", "bcm2711", 4096),
        (0xA02082, "Pi 3 B", "bcm2837", 1024),
    ],
)
def test_other_boards_are_named_but_not_pi5(code, type_name, soc, memory_mb):
    decoded = hw.decode_revision(code)
    assert (decoded["type_name"], decoded["soc"], decoded["memory_mb"]) == (type_name, soc, memory_mb)
    assert decoded["is_pi5"] is False


def test_old_style_revision_has_no_memory():
    decoded = hw.decode_revision(0x000E)
    assert decoded["new_style"] is False
    assert decoded["memory_mb"] is None
    assert decoded["is_pi5"] is False


def test_cpuinfo_without_revision_line_gives_none():
    assert hw.parse_cpuinfo_revision(recording("non-pi-x86-aggregator/proc/cpuinfo")) is None
    assert hw.parse_cpuinfo_revision("") is None


# --- get_throttled ------------------------------------------------------------

ALL_CLEAR = {name: False for name in hw.THROTTLED_BITS}


@pytest.mark.parametrize(
    ("raw", "set_bits"),
    [
        ("0x0", []),
        ("0x50000", ["under_voltage_occurred", "throttled_occurred"]),
        ("0x50005", ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]),
        ("0x80008", ["soft_temp_limit", "soft_temp_limit_occurred"]),
    ],
)
def test_recorded_get_throttled_outputs_decode(raw, set_bits):
    value = hw.parse_get_throttled(recording(f"vcgencmd/get_throttled-{raw}.txt"))
    assert value == int(raw, 16)
    assert hw.decode_throttled(value) == {**ALL_CLEAR, **dict.fromkeys(set_bits, True), "raw": raw}


def test_freq_capped_bits_decode():
    decoded = hw.decode_throttled(0x20002)
    assert decoded["freq_capped"] is True
    assert decoded["freq_capped_occurred"] is True
    assert decoded["throttled"] is False


@pytest.mark.parametrize(
    "garbage",
    ["", "unknown\n", 'error=1 error_msg="Command not registered"\n', "throttled=\n", "throttled=50005\n"],
)
def test_get_throttled_garbage_is_refused_with_the_text(garbage):
    with pytest.raises(ValueError, match="get_throttled printed") as raised:
        hw.parse_get_throttled(garbage)
    assert repr(garbage) in str(raised.value)


# --- bootloader_version ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "nvme_boot"),
    [
        (
            "bootloader_version-2024.txt",
            {
                "date": "2024-09-23",
                "timestamp": 1727096576,
                "version": "2682625908f5585e5f4832bb82e74e7d757ec48f",
            },
            True,
        ),
        (
            "bootloader_version-2026.txt",
            {
                "date": "2026-05-26",
                "timestamp": 1779807685,
                "version": "086b83e3332dfc8927c56762771d082f3077a1ae",
            },
            True,
        ),
        (
            "bootloader_version-2023.txt",
            {
                "date": "2023-10-30",
                "timestamp": 1698684310,
                "version": "30de0ba5a3f8f0e4c1b9d72e6a5c0f18b4d3e927",
            },
            False,
        ),
    ],
)
def test_recorded_bootloader_versions_parse(name, expected, nvme_boot):
    parsed = hw.parse_bootloader_version(recording(f"vcgencmd/{name}"))
    assert parsed == expected
    assert hw.bootloader_supports_nvme_boot(parsed) is nvme_boot


def test_nvme_boot_minimum_is_inclusive():
    assert hw.NVME_BOOT_MIN_BOOTLOADER_DATE == "2023-12-06"
    assert hw.bootloader_supports_nvme_boot({"date": "2023-12-06", "timestamp": 0, "version": "x"})
    assert not hw.bootloader_supports_nvme_boot({"date": "2023-12-05", "timestamp": 0, "version": "x"})
    assert not hw.bootloader_supports_nvme_boot({})


def test_bootloader_version_unknown_is_refused():
    with pytest.raises(ValueError, match="lacks the date, version, timestamp"):
        hw.parse_bootloader_version(recording("vcgencmd/bootloader_version-unknown.txt"))


def test_bootloader_version_without_timestamp_is_refused():
    text = "2024/09/23 14:02:56\nversion 2682625908f5585e5f4832bb82e74e7d757ec48f (release)\n"
    with pytest.raises(ValueError, match="lacks the timestamp"):
        hw.parse_bootloader_version(text)


# --- BOOT_ORDER -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normalised", "modes"),
    [
        ("0xf416", "0xf416", ["nvme", "sd", "usb", "restart"]),
        ("0xf461", "0xf461", ["sd", "nvme", "usb", "restart"]),
        ("0xF416", "0xf416", ["nvme", "sd", "usb", "restart"]),
        (" 0xf14 ", "0xf14", ["usb", "sd", "restart"]),
        ("0x0f416", "0xf416", ["nvme", "sd", "usb", "restart"]),
        ("0xf25641", "0xf25641", ["sd", "usb", "nvme", "bcm-usb", "network", "restart"]),
        ("0xe7320", "0xe7320", ["sd-detect", "network", "rpiboot", "http", "stop"]),
        ("0x0", "0x0", ["sd-detect"]),
        ("0x12345671", "0x12345671", ["sd", "http", "nvme", "bcm-usb", "usb", "rpiboot", "network", "sd"]),
    ],
)
def test_boot_orders_normalise_and_read_lowest_nibble_first(value, normalised, modes):
    assert hw.validate_boot_order(value) == normalised
    assert hw.describe_boot_order(value) == modes


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ("0xz1", "expected 0x and 1 to 8 hex digits"),
        ("", "expected 0x and 1 to 8 hex digits"),
        ("f416", "expected 0x and 1 to 8 hex digits"),
        ("0x", "expected 0x and 1 to 8 hex digits"),
        ("0xf416 0x1", "expected 0x and 1 to 8 hex digits"),
        ("0x123456781", "it has 9 modes"),
        ("0xf816", "mode(s) 0x8 unknown"),
        ("0xdc1", "mode(s) 0xc, 0xd unknown"),
    ],
)
def test_malformed_boot_orders_are_refused_by_name(value, cause):
    with pytest.raises(ValueError, match=re.escape(cause)) as raised:
        hw.validate_boot_order(value)
    assert str(raised.value).startswith(f"{value!r} is not a boot order: ")


def test_boot_order_must_be_text():
    with pytest.raises(ValueError, match="62486 is not a boot order"):
        hw.validate_boot_order(62486)


# --- EEPROM configuration ---------------------------------------------------------

DEFAULT = "eeprom/rpi-eeprom-config-default.txt"
COMMENTED = "eeprom/rpi-eeprom-config-nvme-first-commented.txt"
NET_INSTALL = "eeprom/rpi-eeprom-config-net-install.txt"


def test_parse_default_config():
    assert hw.parse_eeprom_config(recording(DEFAULT)) == {
        "BOOT_UART": "1",
        "POWER_OFF_ON_HALT": "0",
        "BOOT_ORDER": "0xf461",
    }


def test_parse_keeps_only_board_wide_settings():
    # The [gpio4=0] section's BOOT_ORDER applies only while GPIO 4 is low.
    assert hw.parse_eeprom_config(recording(COMMENTED)) == {
        "BOOT_UART": "1",
        "POWER_OFF_ON_HALT": "0",
        "BOOT_ORDER": "0xf416",
        "PCIE_PROBE": "1",
        "PSU_MAX_CURRENT": "5000",
    }


def test_parse_reads_top_level_and_later_all_sections():
    text = "BOOT_UART=0\n# note\n[pi4]\nX=1\n[all]\nBOOT_UART = 1 \n[none]\nY=2\n"
    assert hw.parse_eeprom_config(text) == {"BOOT_UART": "1"}


def test_merge_replaces_in_place_and_appends_missing_keys():
    merged = hw.merge_eeprom_config(recording(DEFAULT), {"BOOT_ORDER": "0xF416", "PCIE_PROBE": 1})
    assert merged == "[all]\nBOOT_UART=1\nPOWER_OFF_ON_HALT=0\nBOOT_ORDER=0xf416\nPCIE_PROBE=1\n"


def test_merge_appends_before_a_conditional_section_and_keeps_comments():
    original = recording(COMMENTED)
    merged = hw.merge_eeprom_config(original, {"BOOT_ORDER": "0xf461", "NET_INSTALL_AT_POWER_ON": 1})
    assert merged == original.replace("BOOT_ORDER=0xf416\n", "BOOT_ORDER=0xf461\n").replace(
        "PSU_MAX_CURRENT=5000\n", "PSU_MAX_CURRENT=5000\nNET_INSTALL_AT_POWER_ON=1\n"
    )
    # the conditional override is not a board-wide setting and stays
    assert merged.endswith("[gpio4=0]\nBOOT_ORDER=0xf461\n")
    assert merged.count("# ") == original.count("# ")


def test_merge_with_current_values_is_byte_for_byte():
    for name in (DEFAULT, COMMENTED, NET_INSTALL):
        original = recording(name)
        assert hw.merge_eeprom_config(original, hw.parse_eeprom_config(original)) == original


def test_merge_keeps_an_equivalent_boot_order_spelling():
    text = "[all]\nBOOT_ORDER=0xF416\n"
    assert hw.merge_eeprom_config(text, {"BOOT_ORDER": "0xf416"}) == text


def test_merge_keeps_crlf_and_spacing_of_replaced_lines():
    text = "[all]\r\nBOOT_UART = 1\r\n"
    assert hw.merge_eeprom_config(text, {"BOOT_UART": 0, "PCIE_PROBE": True}) == (
        "[all]\r\nBOOT_UART = 0\r\nPCIE_PROBE=1\r\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "PCIE_PROBE=1\n"),
        ("# only a comment", "# only a comment\nPCIE_PROBE=1\n"),
        ("[all]\n", "[all]\nPCIE_PROBE=1\n"),
        ("[pi4]\nBOOT_UART=1", "[pi4]\nBOOT_UART=1\n[all]\nPCIE_PROBE=1\n"),
        ("BOOT_UART=1\n[pi5]\nX=1\n", "BOOT_UART=1\nPCIE_PROBE=1\n[pi5]\nX=1\n"),
    ],
)
def test_merge_places_new_keys_in_the_board_wide_part(text, expected):
    assert hw.merge_eeprom_config(text, {"PCIE_PROBE": 1}) == expected


def test_merge_writes_an_integer_boot_order_in_hex():
    # YAML reads an unquoted 0xf416 as 62486
    assert hw.merge_eeprom_config(recording(DEFAULT), {"BOOT_ORDER": 62486}).endswith("BOOT_ORDER=0xf416\n")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"BOOT_ORDER": "0xz1"}, "settings.BOOT_ORDER '0xz1' is not a boot order: "),
        ({"boot_order": "0xf416"}, "settings key 'boot_order' is not an EEPROM setting name"),
        ({"1BOOT": "1"}, "settings key '1BOOT' is not an EEPROM setting name"),
        ({"PSU_MAX_CURRENT": [5000]}, "settings.PSU_MAX_CURRENT [5000] is not a string or a number"),
        ({"BOOT_UART": "1\nBOOT_ORDER=0x1"}, "spans several lines"),
    ],
)
def test_merge_refuses_invalid_settings(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hw.merge_eeprom_config(recording(DEFAULT), settings)


# --- readers --------------------------------------------------------------------


@pytest.mark.parametrize("name", PI5_TREES)
def test_device_tree_of_each_pi5(name):
    assert hw.read_model(tree(name)).startswith("Raspberry Pi 5 Model B Rev 1.")
    assert hw.read_compatible(tree(name)) == ["raspberrypi,5-model-b", "brcm,bcm2712"]


@pytest.mark.parametrize(
    ("name", "celsius"),
    [
        ("pi5-8gb-nvme-boot", 51.2),  # 51150 millidegrees rounds half up
        ("pi5-2gb-sd-boot", 47.2),
        ("pi5-4gb-devroot-partuuid", 50.0),
        ("pi5-16gb-hailo10h", 62.4),
        ("non-pi-x86-aggregator", 27.8),
    ],
)
def test_temperature(name, celsius):
    assert hw.read_temperature_c(tree(name)) == celsius


def test_readers_on_a_root_without_files(tmp_path):
    write(tmp_path / "sys/class/thermal/thermal_zone0/temp", "N/A\n")
    root = str(tmp_path)
    assert hw.read_model(root) is None
    assert hw.read_compatible(root) == []
    assert hw.read_revision(root) is None
    assert hw.read_temperature_c(root) is None
    assert hw.boot_device(root) == "unknown"
    assert hw.pci_devices(root) == []


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("pi5-8gb-nvme-boot", "nvme"),
        ("pi5-2gb-sd-boot", "sd"),
        ("pi5-4gb-usb-boot", "usb"),
        ("pi5-16gb-hailo10h", "sd"),
        ("pi5-4gb-devroot-partuuid", "sd"),  # /dev/root -> root=PARTUUID=9c3a51d4-02 -> mmcblk0p2
    ],
)
def test_boot_device_of_each_tree(name, device):
    assert hw.boot_device(tree(name)) == device


def mounts_and_cmdline(tmp_path: Path, mount: str, cmdline: str = "") -> str:
    write(tmp_path / "proc/mounts", f"{mount}\nproc /proc proc rw,relatime 0 0\n")
    write(tmp_path / "proc/cmdline", cmdline + "\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("mount", "cmdline", "device"),
    [
        ("192.168.8.2:/srv/nfs/pi5-07 / nfs rw,relatime,vers=3,addr=192.168.8.2 0 0", "", "network"),
        ("192.168.8.2:/srv/nfs/pi5-07 / nfs4 rw,relatime,vers=4.2 0 0", "", "network"),
        (
            "/dev/root / ext4 rw,noatime 0 0",
            "console=tty1 root=/dev/nfs nfsroot=192.168.8.2:/srv/nfs/pi5-07",
            "network",
        ),
        ("/dev/root / ext4 rw,noatime 0 0", "console=tty1 root=/dev/nvme0n1p2 rootfstype=ext4", "nvme"),
        ("/dev/root / ext4 rw,noatime 0 0", "console=tty1 root=PARTUUID=4e639091-02 rootwait", "unknown"),
        ("/dev/root / ext4 rw,noatime 0 0", "console=tty1 rootwait", "unknown"),
        (
            "overlay / overlay rw,relatime,lowerdir=/media/root-ro,upperdir=/media/root-rw/overlay 0 0",
            "",
            "unknown",
        ),
    ],
)
def test_boot_device_other_root_layouts(tmp_path, mount, cmdline, device):
    assert hw.boot_device(mounts_and_cmdline(tmp_path, mount, cmdline)) == device


def test_boot_device_takes_the_mount_on_top(tmp_path):
    root = mounts_and_cmdline(
        tmp_path, "rootfs / rootfs rw 0 0\n/dev/sda2 / ext4 rw 0 0\n/dev/nvme0n1p2 / ext4 rw 0 0"
    )
    assert hw.boot_device(root) == "nvme"


def test_boot_device_resolves_an_upper_case_partuuid(tmp_path):
    root = mounts_and_cmdline(tmp_path, "/dev/root / ext4 rw 0 0", "root=PARTUUID=9C3A51D4-02")
    (tmp_path / "dev/disk/by-partuuid").mkdir(parents=True)
    os.symlink("../../sda2", tmp_path / "dev/disk/by-partuuid/9c3a51d4-02")
    assert hw.boot_device(root) == "usb"


@pytest.mark.parametrize(
    ("device", "kind"),
    [
        ("/dev/mmcblk0p2", "sd"),
        ("/dev/nvme1n1p2", "nvme"),
        ("/dev/sdb2", "usb"),
        ("/dev/mapper/cryptroot", "unknown"),
        ("/dev/vda", "unknown"),
    ],
)
def test_classify_block_device(device, kind):
    assert hw.classify_block_device(device) == kind


BRIDGE_1 = {
    "address": "0001:00:00.0",
    "vendor": "0x14e4",
    "device": "0x2712",
    "class": "0x060400",
    "current_link_speed": "5.0 GT/s PCIe",
    "current_link_width": "1",
}
NVME = {
    "address": "0001:01:00.0",
    "vendor": "0x15b7",
    "device": "0x5017",
    "class": "0x010802",
    "current_link_speed": "5.0 GT/s PCIe",
    "current_link_width": "1",
}
RP1_BUS = [
    {
        "address": "0002:00:00.0",
        "vendor": "0x14e4",
        "device": "0x2712",
        "class": "0x060400",
        "current_link_speed": "5.0 GT/s PCIe",
        "current_link_width": "4",
    },
    {
        "address": "0002:01:00.0",
        "vendor": "0x1de4",
        "device": "0x0001",
        "class": "0x020000",
        "current_link_speed": "5.0 GT/s PCIe",
        "current_link_width": "4",
    },
]


def test_pci_devices_of_the_nvme_board():
    devices = hw.pci_devices(tree("pi5-8gb-nvme-boot"))
    assert devices == [BRIDGE_1, NVME, *RP1_BUS]
    assert hw.nvme_devices(devices) == [NVME]


def test_pci_devices_without_external_pcie_show_only_rp1():
    assert hw.pci_devices(tree("pi5-2gb-sd-boot")) == RP1_BUS


def test_pci_device_without_link_attributes():
    host_bridge = hw.pci_devices(tree("non-pi-x86-aggregator"))[0]
    assert host_bridge == {
        "address": "0000:00:00.0",
        "vendor": "0x8086",
        "device": "0x3ec4",
        "class": "0x060000",
        "current_link_speed": None,
        "current_link_width": None,
    }


def test_pci_devices_follow_sysfs_symlinks(tmp_path):
    """Real sysfs: /sys/bus/pci/devices/* are links into /sys/devices."""
    device_dir = tmp_path / "sys/devices/platform/axi/1000110000.pcie/pci0001:00/0001:00:00.0/0001:01:00.0"
    for name, value in NVME.items():
        if name != "address":
            write(device_dir / name, value + "\n")
    bus = tmp_path / "sys/bus/pci/devices"
    bus.mkdir(parents=True)
    relative = "../../../devices/platform/axi/1000110000.pcie/pci0001:00/0001:00:00.0/0001:01:00.0"
    os.symlink(relative, bus / "0001:01:00.0")
    # a link recorded with an absolute target resolves under root, not on the host
    os.symlink("/sys/" + relative.replace("../", ""), bus / "0001:01:00.1")
    devices = hw.pci_devices(str(tmp_path))
    assert devices[0] == NVME
    assert devices[1] == {**NVME, "address": "0001:01:00.1"}


@pytest.mark.parametrize(
    ("name", "npu"),
    [
        ("pi5-8gb-hailo8", {"type": "hailo8", "pci_address": "0001:01:00.0", "device_node": "/dev/hailo0"}),
        (
            "pi5-16gb-hailo10h",
            {"type": "hailo10h", "pci_address": "0001:01:00.0", "device_node": "/dev/h1x-0"},
        ),
        ("pi5-8gb-nvme-boot", {"type": "none", "pci_address": None, "device_node": None}),
    ],
)
def test_detect_npu(name, npu):
    assert hw.detect_npu(hw.pci_devices(tree(name)), tree(name)) == npu


def test_npu_without_a_driver_has_no_device_node(tmp_path):
    pci = [{"address": "0001:01:00.0", "vendor": "0x1e60", "device": "0x2864", "class": "0x0b4000"}]
    assert hw.detect_npu(pci, str(tmp_path)) == {
        "type": "hailo8",
        "pci_address": "0001:01:00.0",
        "device_node": None,
    }


def test_npu_device_node_is_the_first_hailo_node_without_root(tmp_path):
    for node in ("hailo1", "hailo0", "h1x-0"):
        write(tmp_path / "dev" / node, b"")
    pci = [{"address": "0001:01:00.0", "vendor": "0x1e60", "device": "0x45c4", "class": "0x0b4000"}]
    assert hw.detect_npu(pci, str(tmp_path) + "/")["device_node"] == "/dev/hailo0"


# --- all facts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "pi5-8gb-nvme-boot",
            {"revision": "d04170", "memory_mb": 8192, "boot_device": "nvme", "nvme": 1, "npu": "none"},
        ),
        (
            "pi5-2gb-sd-boot",
            {"revision": "b04171", "memory_mb": 2048, "boot_device": "sd", "nvme": 0, "npu": "none"},
        ),
        (
            "pi5-4gb-usb-boot",
            {"revision": "c04170", "memory_mb": 4096, "boot_device": "usb", "nvme": 0, "npu": "none"},
        ),
        (
            "pi5-8gb-hailo8",
            {"revision": "d04170", "memory_mb": 8192, "boot_device": "sd", "nvme": 0, "npu": "hailo8"},
        ),
        (
            "pi5-16gb-hailo10h",
            {"revision": "e04171", "memory_mb": 16384, "boot_device": "sd", "nvme": 0, "npu": "hailo10h"},
        ),
    ],
)
def test_gather_pi_facts_of_each_tree(name, expected):
    facts = hw.gather_pi_facts(tree(name))
    assert facts["is_pi5"] is True
    assert facts["model"] == hw.read_model(tree(name))
    assert facts["compatible"] == ["raspberrypi,5-model-b", "brcm,bcm2712"]
    assert facts["revision"] == expected["revision"]
    assert facts["memory_mb"] == expected["memory_mb"]
    assert facts["boot_device"] == expected["boot_device"]
    assert len(facts["nvme_devices"]) == expected["nvme"]
    assert facts["npu"]["type"] == expected["npu"]
    assert facts["pcie_devices"] == hw.pci_devices(tree(name))
    assert facts["throttled"] == {}
    assert facts["bootloader"] == {}


FACT_KEYS = {
    "is_pi5",
    "model",
    "compatible",
    "revision",
    "memory_mb",
    "throttled",
    "temperature_c",
    "boot_device",
    "bootloader",
    "nvme_devices",
    "pcie_devices",
    "npu",
}


def test_gather_pi_facts_schema_keys():
    """Roles and the exporter read these exact keys."""
    assert set(hw.gather_pi_facts(tree("pi5-8gb-nvme-boot"))) == FACT_KEYS
    assert set(hw.empty_facts()) == FACT_KEYS
    assert set(hw.gather_pi_facts(tree("pi5-8gb-nvme-boot"))["npu"]) == {"type", "pci_address", "device_node"}


def test_gather_pi_facts_with_vcgencmd_outputs():
    facts = hw.gather_pi_facts(
        tree("pi5-8gb-nvme-boot"),
        throttled_text=recording("vcgencmd/get_throttled-0x50005.txt"),
        bootloader_text=recording("vcgencmd/bootloader_version-2024.txt"),
    )
    assert facts["throttled"]["raw"] == "0x50005"
    assert facts["throttled"]["under_voltage"] is True
    assert facts["bootloader"] == {
        "date": "2024-09-23",
        "timestamp": 1727096576,
        "version": "2682625908f5585e5f4832bb82e74e7d757ec48f",
        "nvme_boot_min_date": "2023-12-06",
        "nvme_boot_supported": True,
    }


def test_gather_pi_facts_ignores_unreadable_vcgencmd_outputs():
    facts = hw.gather_pi_facts(
        tree("pi5-8gb-nvme-boot"),
        throttled_text='error=1 error_msg="Command not registered"\n',
        bootloader_text=recording("vcgencmd/bootloader_version-unknown.txt"),
    )
    assert facts["throttled"] == {}
    assert facts["bootloader"] == {}
    assert facts["is_pi5"] is True


def test_gather_pi_facts_on_an_x86_host_is_empty():
    facts = hw.gather_pi_facts(
        tree("non-pi-x86-aggregator"), throttled_text=recording("vcgencmd/get_throttled-0x50005.txt")
    )
    # its NVMe root and PCIe devices are not reported: nothing here is a Pi 5
    assert facts == hw.empty_facts()
    assert facts["is_pi5"] is False
    assert facts["boot_device"] == "unknown"


def test_gather_pi_facts_on_a_missing_root_does_not_raise(tmp_path):
    assert hw.gather_pi_facts(str(tmp_path / "absent")) == hw.empty_facts()


def test_gather_pi_facts_on_a_pi4_names_it_but_is_not_pi5(tmp_path):
    write(tmp_path / "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.5\0")
    write(tmp_path / "proc/device-tree/compatible", b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    write(tmp_path / "proc/cpuinfo", "Revision\t: c03115\n")
    facts = hw.gather_pi_facts(str(tmp_path))
    assert facts == hw.empty_facts(
        "Raspberry Pi 4 Model B Rev 1.5", ["raspberrypi,4-model-b", "brcm,bcm2711"]
    )


def test_is_pi5_board_falls_back_to_the_model_without_compatible():
    assert hw.is_pi5_board("Raspberry Pi 5 Model B Rev 1.1", [])
    assert not hw.is_pi5_board("Raspberry Pi Compute Module 5 Rev 1.0", [])
    assert not hw.is_pi5_board(
        "Raspberry Pi 5 Model B Rev 1.0", ["raspberrypi,5-compute-module", "brcm,bcm2712"]
    )
    assert not hw.is_pi5_board(None, [])
