# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""NIC interrupt affinity and RPS/XPS masks, found by interface and queue name.

IRQ numbers change between boots and kernels (the Pi 5's onboard eth0 is 106
on one board, 107 on the next, 112 under another kernel), so interrupts are
found by the action names /proc/interrupts lists for them: ``eth0`` itself or
a queue of it (``enp3s0-TxRx-0``, ``eno2-rx-1``, ``eth0:rx-0``). Their CPUs
are /proc/irq/<n>/smp_affinity_list; receive and transmit packet steering
are /sys/class/net/<if>/queues/{rx,tx}-<n>/{rps,xps}_cpus hex masks.

Pure functions on text, plus readers and one writer that work under a
``root`` so the same code runs on a live host (``root="/"``) and on a
recorded tree in unit tests. No Ansible imports: the ``irq_affinity`` module
uses it, and the net_tuning role's boot-time unit runs this file as a script
(``python3 irq_affinity.py --config <json>``) to pin again after each boot.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Linux has no more than 8192 CPUs (CONFIG_NR_CPUS); a bigger number is a typo.
MAX_CPUS = 8192
# dev_valid_name(): at most IFNAMSIZ - 1 bytes, no "/", ":" or whitespace, not "." or "..".
IFNAMSIZ = 16

PROC_INTERRUPTS = "/proc/interrupts"
CPU_ONLINE = "/sys/devices/system/cpu/online"
NET_CLASS = "/sys/class/net"


class IrqAffinityError(Exception):
    """Something an operator has to fix; the message says what and where."""


# --- CPU lists and masks --------------------------------------------------

_CPU_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a kernel CPU list such as ``"0"``, ``"0-1"`` or ``"0,2-3"``.

    Raises ValueError, naming the bad part, for anything else (an empty list
    included: no CPU is never what a caller means here).
    """
    stripped = (text or "").strip()
    if not stripped:
        raise ValueError("is empty; give CPU numbers and ranges like 0,2-3")
    cpus: set[int] = set()
    for part in stripped.split(","):
        match = _CPU_RANGE.match(part.strip())
        if not match:
            raise ValueError(f"has {part.strip()!r}, which is neither a CPU number nor a range like 0-3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"has the range {part.strip()}, which runs backwards")
        if last >= MAX_CPUS:
            raise ValueError(f"names CPU {last}; Linux numbers CPUs below {MAX_CPUS}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's own spelling of a CPU set: ascending, runs as ranges (``"0-1,3"``)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = previous = None
    for cpu in [*ordered, None]:
        if cpu is not None and previous is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(parts)


def same_cpu_list(first: str, second: str) -> bool:
    """Whether two CPU lists name the same CPUs (``"0-1"`` and ``"0,1"`` do)."""
    try:
        return parse_cpu_list(first) == parse_cpu_list(second)
    except ValueError:
        return False


def cpus_to_mask(cpus: Iterable[int]) -> int:
    """The bit mask of a CPU set: bit n is CPU n."""
    mask = 0
    for cpu in cpus:
        mask |= 1 << cpu
    return mask


def mask_to_cpus(mask: int) -> frozenset[int]:
    """The CPUs whose bits are set in ``mask``."""
    return frozenset(bit for bit in range(mask.bit_length()) if mask >> bit & 1)


_HEX_MASK = re.compile(r"^[0-9a-fA-F]+(?:,[0-9a-fA-F]+)*$")


def parse_hex_mask(text: str) -> int:
    """The number of a sysfs CPU mask: ``"f"``, ``"00"`` or ``"00000000,00000001"`` (32-bit groups)."""
    stripped = (text or "").strip()
    if not _HEX_MASK.match(stripped):
        raise ValueError(f"{stripped!r} is not a hex CPU mask")
    return int(stripped.replace(",", ""), 16)


def format_hex_mask(mask: int, like: str | None = None) -> str:
    """``mask`` in hex, as wide as the mask ``like`` (the one the kernel shows now).

    The kernel prints one hex digit per four possible CPUs and a comma every
    32 CPUs (``"00"`` for 8, ``"00000000,00000001"`` for 64); writing the
    same width keeps the file reading the way it always does. Without
    ``like`` the shortest form (``"f"``) is returned.
    """
    digits = f"{mask:x}"
    template = (like or "").strip()
    if not template or not _HEX_MASK.match(template):
        return digits
    width = len(template.replace(",", ""))
    digits = digits.rjust(width, "0")
    if "," not in template:
        return digits
    groups = []
    while digits:
        groups.insert(0, digits[-8:].rjust(8, "0"))
        digits = digits[:-8]
    return ",".join(groups)


# --- /proc/interrupts -------------------------------------------------------


@dataclass(frozen=True)
class InterruptLine:
    """One numbered row of /proc/interrupts."""

    irq: int
    counts: tuple[int, ...]
    chip: str
    hwirq: str | None
    trigger: str | None
    actions: tuple[str, ...]


_NUMBERED_ROW = re.compile(r"^\s*(\d+):(.*)$")
# After the counts: the chip, then the hardware IRQ number with its flow
# handler glued on (x86: "0-edge", "1572864-edge") or followed by the trigger
# (arm64: "6 Level"), either of which some chips leave out, then the action
# names, comma-separated when the line is shared. Action names may contain
# spaces ("PCIe PME", "ext1 (queue 3)").
_ROW_TAIL = re.compile(
    r"^\s*(?P<chip>\S+)"
    r"(?:\s+(?P<hwirq>\d+)(?:-(?P<flow>\S+)|\s+(?P<level>Level|Edge))?(?=\s|$))?"
    r"(?:\s+(?P<actions>\S.*?))?\s*$"
)


def _cpu_header(line: str) -> int | None:
    """The number of CPU columns when ``line`` is the header (``CPU0 CPU1 ...``)."""
    names = line.split()
    if names and all(name.startswith("CPU") and name[3:].isdigit() for name in names):
        return len(names)
    return None


def parse_proc_interrupts(text: str) -> list[InterruptLine]:
    """The numbered rows of /proc/interrupts.

    The header has one column per online CPU, and every numbered row as many
    counts. Rows named by letters (arm64 ``IPI0``-``IPI7`` and ``Err``, x86
    ``NMI``, ``LOC``, ``ERR``, ``MIS`` ...) are per-CPU statistics, not
    interrupts one can move, and are skipped. Raises ValueError when the text
    has no CPU header.
    """
    lines = (text or "").splitlines()
    header_index = next((index for index, line in enumerate(lines) if line.strip()), None)
    ncpu = _cpu_header(lines[header_index]) if header_index is not None else None
    if ncpu is None:
        raise ValueError("has no CPU0 CPU1 ... header line")
    rows: list[InterruptLine] = []
    for line in lines[header_index + 1 :]:
        match = _NUMBERED_ROW.match(line)
        if not match:
            continue
        rest = match.group(2)
        counts: list[int] = []
        for _column in range(ncpu):
            token = re.match(r"\s*(\d+)(?=\s|$)", rest)
            if not token:
                break
            counts.append(int(token.group(1)))
            rest = rest[token.end() :]
        tail = _ROW_TAIL.match(rest)
        if not tail:
            continue
        actions = tail.group("actions") or ""
        rows.append(
            InterruptLine(
                irq=int(match.group(1)),
                counts=tuple(counts),
                chip=tail.group("chip"),
                hwirq=tail.group("hwirq"),
                trigger=tail.group("flow") or tail.group("level"),
                actions=tuple(name.strip() for name in actions.split(", ") if name.strip()),
            )
        )
    return rows


# --- Which interface an interrupt belongs to ----------------------------------

# What drivers put between the interface name and the queue: igb "enp3s0-TxRx-0",
# e1000e "eno1-rx-0", r8169 "eth0-0", some "eth0:rx-0" or "eth0_q0", cxgb4 "ext1 (queue 3)".
QUEUE_SEPARATORS = ("-", ":", "_", " ")


def action_names_interface(action: str, interface: str) -> bool:
    """Whether an interrupt action name is ``interface`` or one of its queues.

    ``eth0`` and ``eth0-TxRx-0`` name eth0; ``eth01``, ``veth0`` and
    ``eth0.100`` (a VLAN's name) do not.
    """
    if action == interface:
        return True
    rest = action[len(interface) :] if action.startswith(interface) else ""
    return len(rest) > 1 and rest[0] in QUEUE_SEPARATORS


def action_interface(action: str, interfaces: Iterable[str]) -> str | None:
    """The interface an action name belongs to: the longest of ``interfaces`` it names.

    With both ``eth0`` and ``eth0-mgmt`` on the host, ``eth0-mgmt-rx-0`` is eth0-mgmt's.
    """
    owners = [interface for interface in interfaces if action_names_interface(action, interface)]
    return max(owners, key=len) if owners else None


def validate_interface_name(name: str) -> str:
    """Return ``name`` when the kernel could have named an interface so, else raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"interface {name!r} is not an interface name")
    problems = []
    if len(name.encode()) >= IFNAMSIZ:
        problems.append(f"longer than {IFNAMSIZ - 1} bytes")
    if name in (".", ".."):
        problems.append("a directory name")
    if any(char in name for char in "/:") or any(char.isspace() for char in name):
        problems.append('contains "/", ":" or whitespace')
    if problems:
        raise ValueError(f"interface {name!r} is not an interface name: {', '.join(problems)}")
    return name


# --- Reading and writing under a root -----------------------------------------


def under(root: str, path: str) -> str:
    """``path`` (absolute, as on the host) inside the tree at ``root``."""
    return os.path.join(root, path.lstrip("/"))


def read_attribute(path: str) -> str:
    """The stripped text of a procfs/sysfs attribute; OSError as the kernel gives it."""
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read().strip()


def write_attribute(path: str, value: str) -> None:
    """Write ``value`` to a procfs/sysfs attribute such as /proc/irq/107/smp_affinity_list.

    These files are kernel entry points, not stored data: the kernel parses
    each write() and applies it or fails it (EINVAL, EIO) on the spot. There
    is no temporary file to rename over them (nothing can be created in
    /proc/irq/<n> or in sysfs), so atomic_move does not apply: one open for
    writing and a single unbuffered write of the whole value, whose error is
    the kernel's answer. In recorded trees they are plain files, which the
    same open truncates and rewrites.
    """
    with open(path, "wb", buffering=0) as handle:
        handle.write(value.encode("ascii") + b"\n")


def read_online_cpus(root: str) -> frozenset[int]:
    """The host's online CPUs from /sys/devices/system/cpu/online (``"0-3"``)."""
    path = under(root, CPU_ONLINE)
    try:
        text = read_attribute(path)
    except OSError as exc:
        raise IrqAffinityError(f"read online CPUs {path}: {exc.strerror or exc}") from None
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise IrqAffinityError(f"read online CPUs {path}: {text!r} {exc}") from None


def net_interfaces(root: str) -> list[str]:
    """The interfaces under /sys/class/net, sorted; [] when there is no such directory."""
    try:
        return sorted(os.listdir(under(root, NET_CLASS)))
    except OSError:
        return []


def interface_exists(root: str, interface: str) -> bool:
    """Whether /sys/class/net/<interface> exists (a symlink into /sys/devices on a live host)."""
    return os.path.isdir(under(root, f"{NET_CLASS}/{interface}"))


def interface_queues(root: str, interface: str, kind: str) -> list[str]:
    """The ``kind`` ("rx" or "tx") queues of ``interface``, in queue order: rx-0, rx-1, ..., rx-10."""
    try:
        names = os.listdir(under(root, f"{NET_CLASS}/{interface}/queues"))
    except OSError:
        return []
    pattern = re.compile(rf"^{kind}-(\d+)$")
    numbered = [(int(match.group(1)), name) for name in names if (match := pattern.match(name))]
    return [name for _number, name in sorted(numbered)]


def read_proc_interrupts(root: str) -> list[InterruptLine]:
    """The numbered rows of /proc/interrupts under ``root``."""
    path = under(root, PROC_INTERRUPTS)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise IrqAffinityError(f"read {path}: {exc.strerror or exc}") from None
    try:
        return parse_proc_interrupts(text)
    except ValueError as exc:
        raise IrqAffinityError(f"read {path}: {exc}") from None


# --- Plan and apply ---------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One value the module manages: an IRQ's CPU list or a queue's steering mask."""

    kind: str  # "irq", "rps" or "xps"
    path: str
    interface: str
    before: str
    after: str
    irq: int | None = None
    name: str | None = None  # the IRQ's action name
    queue: str | None = None  # rx-0, tx-1, ...

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def label(self) -> str:
        if self.kind == "irq":
            return f"irq {self.irq} ({self.name})"
        return f"{self.interface} {self.queue} {self.kind}_cpus"

    def line(self, value: str) -> str:
        return f"{self.label}: {value}"

    def result(self) -> dict[str, Any]:
        if self.kind == "irq":
            return {
                "irq": self.irq,
                "name": self.name,
                "interface": self.interface,
                "before": self.before,
                "after": self.after,
            }
        return {"interface": self.interface, "queue": self.queue, "before": self.before, "after": self.after}


@dataclass
class Plan:
    """What the host shows now and what it should show, before anything is written."""

    settings: list[Setting] = field(default_factory=list)
    interfaces_without_irqs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(setting.changed for setting in self.settings)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [setting.result() for setting in self.settings if setting.kind == kind]

    def changes(self) -> list[str]:
        """``"irq 107 (eth0): 0-3 -> 0"`` for each value that differs."""
        return [f"{s.label}: {s.before} -> {s.after}" for s in self.settings if s.changed]

    def diff(self, root: str) -> dict[str, str]:
        """Every managed value, one line each, before and after."""
        where = f"IRQ affinity and packet steering under {root}"
        return {
            "before": "".join(setting.line(setting.before) + "\n" for setting in self.settings),
            "after": "".join(setting.line(setting.after) + "\n" for setting in self.settings),
            "before_header": where,
            "after_header": where,
        }


def _wanted_cpus(option: str, text: str, online: frozenset[int]) -> frozenset[int]:
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        raise IrqAffinityError(f"{option} {text!r}: {exc}") from None
    offline = cpus - online
    if offline:
        which = f"CPUs {format_cpu_list(offline)} are" if len(offline) > 1 else f"CPU {min(offline)} is"
        raise IrqAffinityError(
            f"{option} {text!r}: {which} not online on this host, whose online CPUs are "
            f"{format_cpu_list(online)}"
        )
    return cpus


def _irq_settings(root: str, interfaces: Sequence[str], cpus: frozenset[int], plan: Plan) -> None:
    known = set(net_interfaces(root)) | set(interfaces)
    found: set[str] = set()
    for row in read_proc_interrupts(root):
        owned = [(action, action_interface(action, known)) for action in row.actions]
        mine = [(action, owner) for action, owner in owned if owner is not None and owner in interfaces]
        if not mine:
            continue
        action, owner = mine[0]
        found.update(name for _action, name in mine)
        path = under(root, f"/proc/irq/{row.irq}/smp_affinity_list")
        try:
            before = read_attribute(path)
        except OSError as exc:
            raise IrqAffinityError(
                f"read affinity of irq {row.irq} ({action}) {path}: {exc.strerror or exc}"
            ) from None
        after = before if same_cpu_list(before, format_cpu_list(cpus)) else format_cpu_list(cpus)
        plan.settings.append(Setting("irq", path, owner, before, after, irq=row.irq, name=action))
        others = [name for name, owner in owned if owner not in interfaces]
        if others:
            plan.warnings.append(
                f"irq {row.irq} ({action}) is shared with {', '.join(others)}; "
                f"pinning it moves their interrupts to CPU {format_cpu_list(cpus)} too"
            )
    plan.interfaces_without_irqs.extend(interface for interface in interfaces if interface not in found)


def _mask_settings(root: str, interface: str, kind: str, cpus: frozenset[int], plan: Plan) -> None:
    queue_kind, attribute = ("rx", "rps_cpus") if kind == "rps" else ("tx", "xps_cpus")
    wanted = cpus_to_mask(cpus)
    for queue in interface_queues(root, interface, queue_kind):
        path = under(root, f"{NET_CLASS}/{interface}/queues/{queue}/{attribute}")
        try:
            before = read_attribute(path)
        except FileNotFoundError:
            if kind == "xps":
                # The kernel answers ENOENT for xps_cpus of a device with a single
                # transmit queue (netif_is_multiqueue): there is nothing to steer.
                plan.warnings.append(
                    f"xps: {interface} has a single transmit queue, so XPS does not apply to it; "
                    "its transmit steering is left as it is"
                )
                return
            raise IrqAffinityError(f"read {attribute} of {interface} {queue} {path}: not found") from None
        except OSError as exc:
            raise IrqAffinityError(
                f"read {attribute} of {interface} {queue} {path}: {exc.strerror or exc}"
            ) from None
        try:
            current = parse_hex_mask(before)
        except ValueError as exc:
            raise IrqAffinityError(f"read {attribute} of {interface} {queue} {path}: {exc}") from None
        after = before if current == wanted else format_hex_mask(wanted, like=before)
        plan.settings.append(Setting(kind, path, interface, before, after, queue=queue))


def plan_affinity(
    root: str,
    interfaces: Sequence[str],
    cpus: str,
    rps_cpus: str | None = None,
    xps: bool = False,
) -> Plan:
    """Read what ``root`` shows and work out every value to set; writes nothing.

    Everything an operator can get wrong is checked here, before any write:
    interface names, the CPU lists and whether they are online, and whether
    each interface exists. Raises IrqAffinityError with a message naming the
    value and the cause.
    """
    wanted_interfaces = list(dict.fromkeys(interfaces))
    for name in wanted_interfaces:
        try:
            validate_interface_name(name)
        except ValueError as exc:
            raise IrqAffinityError(str(exc)) from None
    online = read_online_cpus(root)
    irq_cpus = _wanted_cpus("cpus", cpus, online)
    steer_cpus = _wanted_cpus("rps_cpus", rps_cpus, online) if rps_cpus is not None else None
    missing = [name for name in wanted_interfaces if not interface_exists(root, name)]
    if missing:
        present = ", ".join(net_interfaces(root)) or "none"
        raise IrqAffinityError(
            f"interface {', '.join(missing)}: not found under {under(root, NET_CLASS)} "
            f"(this host has: {present})"
        )
    plan = Plan()
    if not wanted_interfaces:
        return plan
    _irq_settings(root, wanted_interfaces, irq_cpus, plan)
    for interface in wanted_interfaces:
        if steer_cpus is not None:
            _mask_settings(root, interface, "rps", steer_cpus, plan)
        if xps:
            _mask_settings(root, interface, "xps", irq_cpus, plan)
    return plan


_WRITE_HINTS = {
    errno.EIO: "the kernel manages this interrupt's affinity itself (a managed IRQ) and refuses changes",
    errno.EINVAL: "the kernel refused the value (an interrupt controller that cannot move interrupts, "
    "such as RP1's before the fix for raspberrypi/linux#6077, refuses any CPU list)",
    errno.EACCES: "permission denied; run as root (become: true)",
    errno.EPERM: "not permitted; run as root (become: true)",
    errno.EROFS: "read-only file system (a container's /proc/irq or /sys)",
}


class ApplyError(IrqAffinityError):
    """A write failed; ``applied`` are the settings written before it."""

    def __init__(self, message: str, applied: list[Setting]) -> None:
        super().__init__(message)
        self.applied = applied


def apply_plan(plan: Plan) -> list[Setting]:
    """Write every setting that differs, in plan order; return those written.

    Raises ApplyError on the first write the kernel refuses.
    """
    applied: list[Setting] = []
    for setting in plan.settings:
        if not setting.changed:
            continue
        try:
            write_attribute(setting.path, setting.after)
        except OSError as exc:
            hint = _WRITE_HINTS.get(exc.errno or 0)
            cause = f"{exc.strerror or exc}" + (f": {hint}" if hint else "")
            raise ApplyError(
                f"set {setting.label} to {setting.after} ({setting.path}): {cause}", applied
            ) from None
        applied.append(setting)
    return applied


# --- Boot-time command ------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``irq_affinity.py --config FILE [--root DIR] [--check]``: pin and steer as the module does.

    FILE is JSON with the module's options: ``{"interfaces": ["eth0"], "cpus": "0",
    "rps_cpus": "0" or null, "xps": true}``. Prints one line per change and
    warnings to stderr; exits 1 with the reason when something is wrong.
    """
    # This runs as a command (the boot-time unit), never inside a module: it talks to the
    # journal and systemd through stdout, stderr and its exit status, not through JSON.
    # pylint: disable=ansible-bad-function
    parser = argparse.ArgumentParser(description="Pin NIC interrupts and RPS/XPS masks by interface name.")
    parser.add_argument("--config", required=True, help="JSON file with interfaces, cpus, rps_cpus, xps")
    parser.add_argument("--root", default="/", help="tree holding proc and sys (default /)")
    parser.add_argument("--check", action="store_true", help="report the changes without writing them")
    args = parser.parse_args(argv)
    try:
        with open(args.config, encoding="utf-8") as handle:
            config = json.load(handle)
        if not isinstance(config, dict):
            raise ValueError(f"{args.config} holds {type(config).__name__}, not a JSON object")
        plan = plan_affinity(
            args.root,
            list(config.get("interfaces") or []),
            str(config.get("cpus") or ""),
            rps_cpus=None if config.get("rps_cpus") is None else str(config["rps_cpus"]),
            xps=bool(config.get("xps", False)),
        )
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if plan.interfaces_without_irqs:
            print(f"no IRQ of their own: {', '.join(plan.interfaces_without_irqs)}", file=sys.stderr)
        for change in plan.changes():
            print(change)
        if not args.check:
            apply_plan(plan)
    except (OSError, ValueError, IrqAffinityError) as exc:
        print(f"irq_affinity: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The net_tuning role's boot-time unit runs this file as a command; its exit status is the result.
    sys.exit(main())  # pylint: disable=ansible-bad-function
