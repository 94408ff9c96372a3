# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Raspberry Pi 5 hardware knowledge: the one place that decodes it.

Revision codes, ``vcgencmd`` outputs, bootloader EEPROM settings and boot
orders, and what a Pi 5 shows under /proc, /sys and /dev. Pure functions on
text, plus readers that take a ``root`` so the same code runs on a live board
(``root="/"``) and on a recorded tree in unit tests. No Ansible imports: the
farm exporter uses this file as it is.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

# --- Board revision codes -------------------------------------------------
# https://www.raspberrypi.com/documentation/computers/raspberry-pi.html#new-style-revision-codes

MEMORY_MB = {0: 256, 1: 512, 2: 1024, 3: 2048, 4: 4096, 5: 8192, 6: 16384}
MANUFACTURERS = {
    0: "Sony UK",
    1: "Egoman",
    2: "Embest",
    3: "Sony Japan",
    4: "Embest",
    5: "Stadium",
}
PROCESSORS = {0: "bcm2835", 1: "bcm2836", 2: "bcm2837", 3: "bcm2711", 4: "bcm2712"}
BOARD_TYPES = {
    0x00: "Pi 1 A",
    0x01: "Pi 1 B",
    0x02: "Pi 1 A+",
    0x03: "Pi 1 B+",
    0x04: "Pi 2 B",
    0x06: "CM1",
    0x08: "Pi 3 B",
    0x09: "Pi Zero",
    0x0A: "CM3",
    0x0C: "Pi Zero W",
    0x0D: "Pi 3 B+",
    0x0E: "Pi 3 A+",
    0x10: "CM3+",
    0x11: "Pi 4 B",
    0x12: "Pi Zero 2 W",
    0x13: "Pi 400",
    0x14: "CM4",
    0x15: "CM4S",
    0x17: "Pi 5",
    0x18: "CM5",
    0x19: "Pi 500",
    0x1A: "CM5 Lite",
}
PI5_BOARD_TYPE = 0x17
PI5_COMPATIBLE = "raspberrypi,5-model-b"
PI5_MODEL_PREFIX = "Raspberry Pi 5 Model B"

_NEW_STYLE_FLAG = 1 << 23


def decode_revision(code: int) -> dict[str, Any]:
    """Decode a board revision code (the hex number of /proc/cpuinfo's Revision line).

    Old-style codes (bit 23 clear, Pi 1 era) carry no fields worth decoding
    here: they come back with ``new_style`` False and every field None.
    """
    if not code & _NEW_STYLE_FLAG:
        return {
            "new_style": False,
            "memory_mb": None,
            "manufacturer": None,
            "processor": None,
            "soc": None,
            "type": None,
            "type_name": None,
            "board_revision": None,
            "is_pi5": False,
        }
    processor = (code >> 12) & 0xF
    board_type = (code >> 4) & 0xFF
    return {
        "new_style": True,
        "memory_mb": MEMORY_MB.get((code >> 20) & 0x7),
        "manufacturer": MANUFACTURERS.get((code >> 16) & 0xF),
        "processor": processor,
        "soc": PROCESSORS.get(processor),
        "type": board_type,
        "type_name": BOARD_TYPES.get(board_type),
        "board_revision": code & 0xF,
        "is_pi5": board_type == PI5_BOARD_TYPE,
    }


_CPUINFO_REVISION = re.compile(r"^Revision\s*:\s*([0-9a-fA-F]+)\s*$", re.MULTILINE)


def parse_cpuinfo_revision(text: str) -> str | None:
    """The hex string of the ``Revision`` line of /proc/cpuinfo (``"d04170"``), or None."""
    match = _CPUINFO_REVISION.search(text or "")
    return match.group(1).lower() if match else None


# --- vcgencmd get_throttled -----------------------------------------------

THROTTLED_BITS = {
    "under_voltage": 0,
    "freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}

_THROTTLED_LINE = re.compile(r"^\s*throttled=(0x[0-9a-fA-F]+)\s*$")


def parse_get_throttled(text: str) -> int:
    """The number in ``vcgencmd get_throttled`` output (``"throttled=0x50005\\n"``)."""
    match = _THROTTLED_LINE.match(text or "")
    if not match:
        raise ValueError(f"vcgencmd get_throttled printed {text!r}, not 'throttled=0x<hex>'")
    return int(match.group(1), 16)


def decode_throttled(raw: int) -> dict[str, Any]:
    """Name the bits of a get_throttled value: bits 0-3 now, bits 16-19 since boot."""
    decoded: dict[str, Any] = {"raw": hex(raw)}
    for name, bit in THROTTLED_BITS.items():
        decoded[name] = bool(raw & (1 << bit))
    return decoded


# --- vcgencmd bootloader_version ------------------------------------------

# First bootloader release that boots from NVMe without PCIE_PROBE or a
# dtparam, and the first one Raspberry Pi promoted to default for it.
NVME_BOOT_MIN_BOOTLOADER_DATE = "2023-12-06"

_BOOTLOADER_DATE = re.compile(r"^(\d{4})/(\d{2})/(\d{2}) \d{2}:\d{2}:\d{2}$")
_BOOTLOADER_VERSION = re.compile(r"^version ([0-9a-f]+)\b")
_BOOTLOADER_TIMESTAMP = re.compile(r"^timestamp (\d+)$")


def parse_bootloader_version(text: str) -> dict[str, Any]:
    """``{date: "YYYY-MM-DD", timestamp, version}`` from ``vcgencmd bootloader_version``."""
    found: dict[str, Any] = {}
    for raw_line in (text or "").splitlines():
        line = raw_line.strip()
        if match := _BOOTLOADER_DATE.match(line):
            found.setdefault("date", "-".join(match.groups()))
        elif match := _BOOTLOADER_VERSION.match(line):
            found.setdefault("version", match.group(1))
        elif match := _BOOTLOADER_TIMESTAMP.match(line):
            found.setdefault("timestamp", int(match.group(1)))
    missing = [key for key in ("date", "version", "timestamp") if key not in found]
    if missing:
        raise ValueError(
            f"vcgencmd bootloader_version printed {text!r}, which lacks the {', '.join(missing)} line(s)"
        )
    return {"date": found["date"], "timestamp": found["timestamp"], "version": found["version"]}


def bootloader_supports_nvme_boot(bootloader: dict[str, Any]) -> bool:
    """Whether a parsed bootloader version is new enough to boot from NVMe."""
    return bool(bootloader) and bootloader["date"] >= NVME_BOOT_MIN_BOOTLOADER_DATE


# --- BOOT_ORDER -----------------------------------------------------------
# https://www.raspberrypi.com/documentation/computers/raspberry-pi.html#BOOT_ORDER
# The bootloader reads the value right to left: the lowest nibble is tried first.

BOOT_MODES = {
    0x0: "sd-detect",
    0x1: "sd",
    0x2: "network",
    0x3: "rpiboot",
    0x4: "usb",
    0x5: "bcm-usb",
    0x6: "nvme",
    0x7: "http",
    0xE: "stop",
    0xF: "restart",
}
_BOOT_ORDER = re.compile(r"^0[xX]([0-9a-fA-F]+)$")
_KNOWN_MODES = ", ".join(f"{mode:#x} {name}" for mode, name in BOOT_MODES.items())


def validate_boot_order(value: str) -> str:
    """Normalise a BOOT_ORDER (``"0xF416"`` -> ``"0xf416"``) or raise ValueError naming it."""
    match = _BOOT_ORDER.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{value!r} is not a boot order: expected 0x and 1 to 8 hex digits, e.g. 0xf416")
    digits = match.group(1).lower().lstrip("0") or "0"
    if len(digits) > 8:
        raise ValueError(f"{value!r} is not a boot order: it has {len(digits)} modes, the bootloader reads 8")
    unknown = sorted({digit for digit in digits if int(digit, 16) not in BOOT_MODES})
    if unknown:
        raise ValueError(
            f"{value!r} is not a boot order: mode(s) {', '.join('0x' + d for d in unknown)} unknown "
            f"(known: {_KNOWN_MODES})"
        )
    return "0x" + digits


def describe_boot_order(value: str) -> list[str]:
    """The boot modes of a BOOT_ORDER in the order the bootloader tries them."""
    digits = validate_boot_order(value)[2:]
    return [BOOT_MODES[int(digit, 16)] for digit in reversed(digits)]


# --- EEPROM configuration (rpi-eeprom-config output) ----------------------

_SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_CONFIG_SETTING = re.compile(r"^(\s*)([A-Za-z0-9_]+)(\s*=\s*)(.*?)(\s*)$")
_CONFIG_SECTION = re.compile(r"^\s*\[([^\]]*)\]\s*$")


def validate_setting_name(name: str) -> str:
    """Return ``name`` when it can be an EEPROM setting name, else raise ValueError."""
    if not isinstance(name, str) or not _SETTING_NAME.match(name):
        raise ValueError(
            f"settings key {name!r} is not an EEPROM setting name: "
            "use upper-case letters, digits and _ (e.g. BOOT_ORDER)"
        )
    return name


def render_setting_value(name: str, value: Any) -> str:
    """The text an EEPROM setting takes in the config file, validated for BOOT_ORDER."""
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, int) and name == "BOOT_ORDER":
        # YAML reads an unquoted 0xf416 as the integer 62486.
        text = f"0x{value:x}" if value >= 0 else str(value)
    elif isinstance(value, int | float | str):
        text = str(value)
    else:
        raise ValueError(f"settings.{name} {value!r} is not a string or a number")
    if "\n" in text or "\r" in text:
        raise ValueError(f"settings.{name} {value!r} spans several lines")
    if name == "BOOT_ORDER":
        try:
            return validate_boot_order(text)
        except ValueError as exc:
            raise ValueError(f"settings.BOOT_ORDER {exc}") from None
    return text.strip()


def render_eeprom_settings(settings: dict[str, Any]) -> dict[str, str]:
    """Validate every setting name and value; return the values as config text."""
    return {
        validate_setting_name(name): render_setting_value(name, value) for name, value in settings.items()
    }


def _config_lines(text: str) -> list[tuple[str, str]]:
    """Each line of a config with its scope: "all" (board-wide) or "other" (a conditional section)."""
    scoped: list[tuple[str, str]] = []
    scope = "all"  # settings above the first section header apply to every board
    for line in text.splitlines(keepends=True):
        section = _CONFIG_SECTION.match(line)
        if section:
            scope = "all" if section.group(1).strip().lower() == "all" else "other"
        scoped.append((line, scope))
    return scoped


def _setting_match(line: str) -> re.Match[str] | None:
    return _CONFIG_SETTING.match(line.rstrip("\r\n"))


def parse_eeprom_config(text: str) -> dict[str, str]:
    """The settings of the [all] section (and the lines above any section), in file order.

    Later lines win, as they do for the bootloader. Settings under conditional
    sections ([pi5], [gpio4=0], [none], ...) are not board-wide and are left out.
    """
    settings: dict[str, str] = {}
    for line, scope in _config_lines(text or ""):
        match = _setting_match(line)
        if scope == "all" and match:
            settings[match.group(2)] = match.group(4)
    return settings


def _same_value(name: str, current: str, desired: str) -> bool:
    if name == "BOOT_ORDER":
        try:
            return validate_boot_order(current) == validate_boot_order(desired)
        except ValueError:
            return False
    return current == desired


def _line_ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def merge_eeprom_config(text: str, settings: dict[str, Any]) -> str:
    """Set ``settings`` in config ``text`` and keep every other byte as it was.

    An existing board-wide key gets its new value in place (all its board-wide
    lines do); a missing one is appended after the last board-wide setting, or
    after the [all] header, or at the end - under a new [all] header when the
    file has only conditional sections. Raises ValueError for invalid settings.
    """
    rendered = render_eeprom_settings(settings)
    lines = _config_lines(text or "")
    out = [line for line, _scope in lines]
    present: set[str] = set()
    last_setting = last_all_header = None
    for index, (line, scope) in enumerate(lines):
        if scope != "all":
            continue
        match = _setting_match(line)
        if _CONFIG_SECTION.match(line):
            last_all_header = index
        elif match:
            last_setting = index
            name = match.group(2)
            if name in rendered:
                present.add(name)
                if not _same_value(name, match.group(4), rendered[name]):
                    lead, _key, separator, _value, trail = match.groups()
                    out[index] = f"{lead}{name}{separator}{rendered[name]}{trail}{_line_ending(line)}"
    missing = [f"{name}={value}" for name, value in rendered.items() if name not in present]
    if missing:
        anchor = last_setting if last_setting is not None else last_all_header
        _insert_lines(out, anchor, missing)
    return "".join(out)


def _insert_lines(out: list[str], anchor: int | None, new_lines: list[str]) -> None:
    """Insert ``new_lines`` after line ``anchor``, or at the end when it is None."""
    ending = next((_line_ending(line) for line in out if _line_ending(line)), "\n")
    if anchor is None:
        if any(_CONFIG_SECTION.match(line) for line in out):
            new_lines = ["[all]", *new_lines]
        anchor = len(out) - 1
    if anchor >= 0 and not _line_ending(out[anchor]):
        out[anchor] += ending
    out.insert(anchor + 1, "".join(line + ending for line in new_lines))


# --- Readers of a root file system ----------------------------------------


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _read_bytes(root: str, path: str) -> bytes | None:
    try:
        with open(_under(root, path), "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _read_text(root: str, path: str) -> str | None:
    data = _read_bytes(root, path)
    return None if data is None else data.decode("utf-8", errors="replace")


def read_model(root: str) -> str | None:
    """The board name from /proc/device-tree/model, without its trailing NUL."""
    data = _read_bytes(root, "/proc/device-tree/model")
    model = data.rstrip(b"\0").decode("utf-8", errors="replace").strip() if data else ""
    return model or None


def read_compatible(root: str) -> list[str]:
    """The NUL-separated /proc/device-tree/compatible list, most specific first."""
    data = _read_bytes(root, "/proc/device-tree/compatible") or b""
    return [item.decode("utf-8", errors="replace") for item in data.split(b"\0") if item]


def read_revision(root: str) -> str | None:
    """The board revision code of /proc/cpuinfo as a hex string."""
    return parse_cpuinfo_revision(_read_text(root, "/proc/cpuinfo") or "")


def read_temperature_c(root: str) -> float | None:
    """SoC temperature in °C (one decimal) from thermal_zone0, which counts millidegrees."""
    text = _read_text(root, "/sys/class/thermal/thermal_zone0/temp")
    try:
        millidegrees = Decimal(int((text or "").strip()))
    except ValueError:
        return None
    return float((millidegrees / 1000).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def is_pi5_board(model: str | None, compatible: list[str]) -> bool:
    """Whether the device tree names a Raspberry Pi 5 Model B (not a CM5 or Pi 500)."""
    if compatible:
        return PI5_COMPATIBLE in compatible
    return bool(model) and model.startswith(PI5_MODEL_PREFIX)


# --- Boot device ------------------------------------------------------------

_NETWORK_FSTYPES = ("nfs", "nfs4")


def _root_mount(root: str) -> tuple[str, str] | None:
    """Source and type of the last mount of "/" in /proc/mounts (the one on top)."""
    found = None
    for line in (_read_text(root, "/proc/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "/" and fields[2] != "rootfs":
            found = (fields[0], fields[2])
    return found


def _cmdline_root(root: str) -> str | None:
    for token in (_read_text(root, "/proc/cmdline") or "").split():
        if token.startswith("root="):
            return token[len("root=") :]
    return None


def _resolve_root_spec(root: str, spec: str) -> str | None:
    """A device path for a kernel ``root=`` value, via /dev/disk/by-* links under ``root``."""
    for prefix, directory in (("PARTUUID=", "by-partuuid"), ("UUID=", "by-uuid"), ("LABEL=", "by-label")):
        if spec.startswith(prefix):
            name = spec[len(prefix) :]
            # udev names by-partuuid links in lower case; a cmdline may not.
            for candidate in (name, name.lower()):
                link = _under(root, f"/dev/disk/{directory}/{candidate}")
                if os.path.islink(link):
                    return "/dev/" + os.path.basename(os.readlink(link))
            return None
    return spec if spec.startswith("/dev/") else None


def classify_block_device(device: str) -> str:
    """ "sd", "nvme", "usb" or "unknown" for a block device path such as /dev/nvme0n1p2."""
    name = os.path.basename(device)
    if name.startswith("mmcblk"):
        return "sd"
    if name.startswith("nvme"):
        return "nvme"
    if re.match(r"^sd[a-z]+\d*$", name):
        return "usb"
    return "unknown"


def boot_device(root: str) -> str:
    """Where "/" lives: "sd", "nvme", "usb", "network" or "unknown"."""
    mount = _root_mount(root)
    if mount is None:
        return "unknown"
    source, fstype = mount
    if fstype in _NETWORK_FSTYPES:
        return "network"
    if source == "/dev/root":
        spec = _cmdline_root(root)
        if spec == "/dev/nfs":
            return "network"
        resolved = _resolve_root_spec(root, spec) if spec else None
        return classify_block_device(resolved) if resolved else "unknown"
    return classify_block_device(source)


# --- PCIe -------------------------------------------------------------------

PCI_CLASS_NVME = "0x010802"
NPU_PCI_IDS = {
    ("0x1e60", "0x2864"): "hailo8",  # AI HAT+ 13/26 TOPS and AI Kit: Hailo-8 and -8L share the id
    ("0x1e60", "0x45c4"): "hailo10h",  # AI HAT+ 2
}
# hailo_pci names its nodes /dev/hailoN; hailo1x_pci (HailoRT >= 5.3, Hailo-10H) /dev/h1x-N.
NPU_DEVICE_NODE_GLOBS = ("/dev/hailo*", "/dev/h1x-*")
_PCI_ATTRIBUTES = ("vendor", "device", "class", "current_link_speed", "current_link_width")


def _pci_device_dir(root: str, entry: str) -> str:
    """The device directory; an absolute symlink target is taken under ``root`` too."""
    if os.path.islink(entry):
        target = os.readlink(entry)
        if os.path.isabs(target):
            return _under(root, target)
    return entry


def _read_attribute(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as handle:
            value = handle.read().strip()
    except OSError:
        return None
    return value or None


def pci_devices(root: str) -> list[dict[str, Any]]:
    """Every device under /sys/bus/pci/devices with its ids, class and link, by address."""
    base = _under(root, "/sys/bus/pci/devices")
    try:
        addresses = sorted(os.listdir(base))
    except OSError:
        return []
    devices = []
    for address in addresses:
        directory = _pci_device_dir(root, os.path.join(base, address))
        device: dict[str, Any] = {"address": address}
        for name in _PCI_ATTRIBUTES:
            device[name] = _read_attribute(directory, name)
        devices.append(device)
    return devices


def nvme_devices(pci: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The NVMe controllers (PCI class 0x010802) among ``pci``."""
    return [device for device in pci if device.get("class") == PCI_CLASS_NVME]


def _npu_device_node(root: str) -> str | None:
    prefix = root.rstrip("/")
    for pattern in NPU_DEVICE_NODE_GLOBS:
        nodes = sorted(glob.glob(os.path.join(glob.escape(root), pattern.lstrip("/"))))
        if nodes:
            return nodes[0][len(prefix) :] if prefix else nodes[0]
    return None


def detect_npu(pci: list[dict[str, Any]], root: str) -> dict[str, Any]:
    """The first Hailo NPU on PCIe and its /dev node (None while no driver has made one)."""
    for device in pci:
        pci_id = ((device.get("vendor") or "").lower(), (device.get("device") or "").lower())
        npu_type = NPU_PCI_IDS.get(pci_id)
        if npu_type:
            return {"type": npu_type, "pci_address": device["address"], "device_node": _npu_device_node(root)}
    return {"type": "none", "pci_address": None, "device_node": None}


# --- All facts ----------------------------------------------------------------


def empty_facts(model: str | None = None, compatible: list[str] | None = None) -> dict[str, Any]:
    """The facts of a host that is not a Raspberry Pi 5: only its device-tree identity, if any."""
    return {
        "is_pi5": False,
        "model": model,
        "compatible": list(compatible or []),
        "revision": None,
        "memory_mb": None,
        "throttled": {},
        "temperature_c": None,
        "boot_device": "unknown",
        "bootloader": {},
        "nvme_devices": [],
        "pcie_devices": [],
        "npu": {"type": "none", "pci_address": None, "device_node": None},
    }


def _decode_throttled_text(text: str) -> dict[str, Any]:
    return decode_throttled(parse_get_throttled(text))


def _decoded_or_empty(text: str | None, decode: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        return decode(text)
    except ValueError:
        return {}


def _bootloader_facts(bootloader_text: str | None) -> dict[str, Any]:
    """The parsed bootloader version plus whether it can boot from NVMe; {} when unknown."""
    bootloader = _decoded_or_empty(bootloader_text, parse_bootloader_version)
    if bootloader:
        bootloader["nvme_boot_min_date"] = NVME_BOOT_MIN_BOOTLOADER_DATE
        bootloader["nvme_boot_supported"] = bootloader_supports_nvme_boot(bootloader)
    return bootloader


def gather_pi_facts(
    root: str, throttled_text: str | None = None, bootloader_text: str | None = None
) -> dict[str, Any]:
    """The ``pifarm_pi`` facts of the system under ``root``; never raises on odd or missing files.

    ``throttled_text`` and ``bootloader_text`` are the outputs of ``vcgencmd
    get_throttled`` and ``vcgencmd bootloader_version``; unreadable ones give {}.
    """
    model = read_model(root)
    compatible = read_compatible(root)
    if not is_pi5_board(model, compatible):
        return empty_facts(model, compatible)
    revision = read_revision(root)
    pci = pci_devices(root)
    return {
        "is_pi5": True,
        "model": model,
        "compatible": compatible,
        "revision": revision,
        "memory_mb": decode_revision(int(revision, 16))["memory_mb"] if revision else None,
        "throttled": _decoded_or_empty(throttled_text, _decode_throttled_text),
        "temperature_c": read_temperature_c(root),
        "boot_device": boot_device(root),
        "bootloader": _bootloader_facts(bootloader_text),
        "nvme_devices": nvme_devices(pci),
        "pcie_devices": pci,
        "npu": detect_npu(pci, root),
    }
