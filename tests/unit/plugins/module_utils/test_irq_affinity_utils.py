"""irq_affinity on CPU lists, masks, /proc/interrupts and recorded trees (tests/unit/fixtures/net)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.module_utils import irq_affinity as irq

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "net"
MODULE_UTILS_FILE = Path(irq.__file__)
SINGLE_TX_QUEUE = (
    "has a single transmit queue, so XPS does not apply to it; its transmit steering is left as it is"
)


def recording(tree: str) -> str:
    return (FIXTURES / tree / "proc" / "interrupts").read_text()


def rows_by_irq(tree: str) -> dict[int, irq.InterruptLine]:
    return {row.irq: row for row in irq.parse_proc_interrupts(recording(tree))}


@pytest.fixture
def copy_tree(tmp_path):
    """Copies a recorded tree to tmp_path so a test may write to it."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(FIXTURES / name, target)
        return target

    return copy


def read(tree: Path, path: str) -> str:
    return (tree / path.lstrip("/")).read_text()


# --- CPU lists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", {0}),
        ("0-1", {0, 1}),
        ("0,2-3", {0, 2, 3}),
        ("0-3\n", {0, 1, 2, 3}),
        (" 3,1 ", {1, 3}),
        ("2-2", {2}),
        ("0-1,1-2", {0, 1, 2}),
    ],
)
def test_cpu_lists_parse_to_their_cpus(text, cpus):
    assert irq.parse_cpu_list(text) == frozenset(cpus)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("a", "'a', which is neither"),
        ("0-", "'0-', which is neither"),
        ("-1", "'-1', which is neither"),
        ("0,,1", "'', which is neither"),
        ("0-7:2/4", "'0-7:2/4', which is neither"),
        ("3-1", "the range 3-1, which runs backwards"),
        ("0-8192", "names CPU 8192"),
    ],
)
def test_bad_cpu_lists_are_refused_naming_the_bad_part(text, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        irq.parse_cpu_list(text)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [({0}, "0"), ({0, 1}, "0-1"), ({0, 2, 3}, "0,2-3"), ({0, 1, 2, 3, 5, 7, 8}, "0-3,5,7-8"), (set(), "")],
)
def test_cpu_sets_format_as_the_kernel_spells_them(cpus, text):
    assert irq.format_cpu_list(cpus) == text


def test_same_cpu_list_compares_cpus_not_spelling():
    assert irq.same_cpu_list("0-1", "0,1")
    assert irq.same_cpu_list("0-3", "3,2,1,0")
    assert not irq.same_cpu_list("0-3", "0-2")
    assert not irq.same_cpu_list("0-3", "garbage")


# --- Masks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu_list", "mask", "hex_text"),
    [
        ("0", 0x1, "1"),  # one core
        ("3", 0x8, "8"),
        ("0-1", 0x3, "3"),  # two cores
        ("2-3", 0xC, "c"),
        ("0,2", 0x5, "5"),
        ("0-3", 0xF, "f"),  # four cores: the whole Pi 5
        ("0-7", 0xFF, "ff"),
    ],
)
def test_cpu_lists_and_masks_round_trip(cpu_list, mask, hex_text):
    cpus = irq.parse_cpu_list(cpu_list)
    assert irq.cpus_to_mask(cpus) == mask
    assert irq.mask_to_cpus(mask) == cpus
    assert irq.format_cpu_list(irq.mask_to_cpus(mask)) == cpu_list
    assert irq.format_hex_mask(mask) == hex_text
    assert irq.parse_hex_mask(hex_text) == mask


@pytest.mark.parametrize(
    ("mask", "like", "written"),
    [
        (0x1, "0", "1"),  # Pi 5: 4 possible CPUs, one digit
        (0xD, "00", "0d"),  # 8 possible CPUs, two digits
        (0xF, "00000000,00000000", "00000000,0000000f"),  # 64 possible CPUs
        (1 << 33, "00000000,00000000", "00000002,00000000"),
        (0x1FF, "00", "1ff"),  # wider than the template: never truncated
        (0x3, None, "3"),
        (0x3, "garbage", "3"),
    ],
)
def test_masks_are_written_as_wide_as_the_kernel_prints_them(mask, like, written):
    assert irq.format_hex_mask(mask, like=like) == written
    assert irq.parse_hex_mask(written) == mask


def test_hex_masks_parse_with_commas_and_newlines():
    assert irq.parse_hex_mask("00000002,00000000\n") == 1 << 33
    assert irq.parse_hex_mask("f\n") == 0xF
    assert irq.parse_hex_mask("00") == 0
    for bad in ("", "xyz", "0x1", "1,", "f f"):
        with pytest.raises(ValueError, match="is not a hex CPU mask"):
            irq.parse_hex_mask(bad)


# --- /proc/interrupts -------------------------------------------------------------


@pytest.mark.parametrize(("tree", "ncpu"), [("pi5-usb-2g5", 4), ("pi5-ubuntu-6.5", 4), ("x86-igb-8cpu", 8)])
def test_every_numbered_row_parses_with_one_count_per_cpu(tree, ncpu):
    text = recording(tree)
    numbered = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+):", text, re.MULTILINE)]
    rows = irq.parse_proc_interrupts(text)
    assert [row.irq for row in rows] == numbered
    assert all(len(row.counts) == ncpu for row in rows)
    assert all(row.actions for row in rows)
    # IPI0-7, Err, NMI, LOC, ERR, MIS ... are statistics, not interrupts one can move.
    assert (
        len(text.splitlines()) - 1 - len(rows)
        == {"pi5-usb-2g5": 9, "pi5-ubuntu-6.5": 8, "x86-igb-8cpu": 19}[tree]
    )


def test_pi5_rows_have_chip_hwirq_trigger_and_actions():
    rows = rows_by_irq("pi5-usb-2g5")
    assert rows[106] == irq.InterruptLine(106, (9183554, 0, 0, 0), "rp1_irq_chip", "6", "Level", ("eth0",))
    assert rows[131].actions == ("xhci-hcd:usb1",)
    assert rows[131].trigger == "Edge"
    assert rows[41].actions == ("PCIe PME", "aerdrv")  # a shared line
    assert rows[170].actions == ("vc4 hdmi hpd connected",)  # spaces inside a name
    # A chip whose name starts with digits is not taken for a count.
    assert rows[184] == irq.InterruptLine(184, (0, 0, 0, 0), "107d508500.gpio", "20", "Edge", ("pwr_button",))
    assert rows[167].chip == "interrupt-controller@7c502000"


def test_x86_rows_have_the_flow_handler_glued_to_the_hwirq():
    rows = rows_by_irq("x86-igb-8cpu")
    assert rows[139] == irq.InterruptLine(
        139, (0, 2210985, 0, 0, 0, 0, 0, 0), "IR-PCI-MSIX-0000:03:00.0", "3", "edge", ("enp3s0-TxRx-2",)
    )
    assert rows[9].trigger == "fasteoi"
    assert rows[126].actions == ("ahci[0000:00:17.0]",)
    assert rows[122].actions == ("PCIe PME", "aerdrv")


@pytest.mark.parametrize(
    ("line", "chip", "hwirq", "trigger", "actions"),
    [
        # 2.6-era x86: the flow type is part of the chip name, no hwirq.
        ("  0:       6166          0   IO-APIC-edge      timer", "IO-APIC-edge", None, None, ("timer",)),
        (
            " 19:     498834          0   IO-APIC-fasteoi   uhci_hcd:usb3, ata_piix",
            "IO-APIC-fasteoi",
            None,
            None,
            ("uhci_hcd:usb3", "ata_piix"),
        ),
        (" 43:     371923          0   PCI-MSI-edge      eth0", "PCI-MSI-edge", None, None, ("eth0",)),
        # 4.x-6.1 x86: one IR-PCI-MSI domain, the hwirq encodes the PCI address.
        (
            " 30: 3551364829          1   IR-PCI-MSI 1572864-edge      eth0-0",
            "IR-PCI-MSI",
            "1572864",
            "edge",
            ("eth0-0",),
        ),
        # A chip that prints a hwirq and no trigger.
        (" 29:      10661          0  amd_gpio   90  ITE8227:00", "amd_gpio", "90", None, ("ITE8227:00",)),
        # cxgb4 names its queues with a space.
        (
            "252:          1          2 IR-PCI-MSIX-0000:08:00.4   18-edge      ext1 (queue 0)",
            "IR-PCI-MSIX-0000:08:00.4",
            "18",
            "edge",
            ("ext1 (queue 0)",),
        ),
        # Newer kernels print one space before the chip.
        (
            "168:          0          0 IR-PCI-MSIX-0000:08:00.0   1-edge      eno2-rx-0",
            "IR-PCI-MSIX-0000:08:00.0",
            "1",
            "edge",
            ("eno2-rx-0",),
        ),
    ],
)
def test_rows_of_other_kernels_and_drivers_parse(line, chip, hwirq, trigger, actions):
    (row,) = irq.parse_proc_interrupts("           CPU0       CPU1\n" + line + "\n")
    assert (row.chip, row.hwirq, row.trigger, row.actions) == (chip, hwirq, trigger, actions)
    assert len(row.counts) == 2


@pytest.mark.parametrize("text", ["", "\n\n", " 13:  1  2  GICv2  26 Level  arch_timer\n", "NMI: 1 2\n"])
def test_text_without_a_cpu_header_is_refused(text):
    with pytest.raises(ValueError, match="has no CPU0 CPU1"):
        irq.parse_proc_interrupts(text)


# --- Names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "interface", "names_it"),
    [
        ("eth0", "eth0", True),
        ("eth0-TxRx-0", "eth0", True),
        ("eth0-rx-0", "eth0", True),
        ("eth0-tx-1", "eth0", True),
        ("eth0:rx-0", "eth0", True),
        ("eth0_q3", "eth0", True),
        ("eth0-0", "eth0", True),
        ("ext1 (queue 3)", "ext1", True),
        ("eth01", "eth0", False),
        ("veth0", "eth0", False),
        ("eth0", "eth01", False),
        ("eth0.100", "eth0", False),
        ("eth0-", "eth0", False),
        ("eth1", "eth0", False),
        ("xhci-hcd:usb1", "eth1", False),
        ("enp3s0-TxRx-0", "enp3s0", True),
        ("enp3s0-TxRx-0", "enp3s", False),
    ],
)
def test_which_action_names_name_an_interface(action, interface, names_it):
    assert irq.action_names_interface(action, interface) is names_it


def test_an_action_belongs_to_the_longest_interface_it_names():
    interfaces = ["eth0", "eth0-mgmt", "veth0"]
    assert irq.action_interface("eth0-mgmt-rx-0", interfaces) == "eth0-mgmt"
    assert irq.action_interface("eth0-rx-0", interfaces) == "eth0"
    assert irq.action_interface("veth0", interfaces) == "veth0"
    assert irq.action_interface("eth01", interfaces) is None


@pytest.mark.parametrize("name", ["eth0", "enp3s0", "enx0a1b2c3d4e5f", "br-lan", "veth3a9c1f2"])
def test_interface_names_the_kernel_allows(name):
    assert irq.validate_interface_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is not an interface name"),
        ("eth0/../../x", '"/", ":" or whitespace'),
        ("eth0:1", '"/", ":" or whitespace'),
        ("eth 0", '"/", ":" or whitespace'),
        ("x" * 16, "longer than 15 bytes"),
        ("..", "a directory name"),
    ],
)
def test_names_no_interface_can_have_are_refused(name, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        irq.validate_interface_name(name)


# --- Readers ----------------------------------------------------------------


def test_readers_of_a_recorded_tree():
    pi5 = str(FIXTURES / "pi5-usb-2g5")
    x86 = str(FIXTURES / "x86-igb-8cpu")
    assert irq.read_online_cpus(pi5) == frozenset(range(4))
    assert irq.read_online_cpus(x86) == frozenset(range(8))
    assert irq.net_interfaces(pi5) == ["eth0", "eth1", "lo"]
    assert irq.interface_exists(pi5, "eth1")
    assert not irq.interface_exists(pi5, "eth2")
    assert irq.interface_queues(x86, "enp3s0", "rx") == ["rx-0", "rx-1", "rx-2", "rx-3"]
    assert irq.interface_queues(x86, "enp3s0", "tx") == ["tx-0", "tx-1", "tx-2", "tx-3"]
    assert irq.interface_queues(pi5, "eth0", "tx") == ["tx-0"]
    assert irq.interface_queues(pi5, "eth9", "rx") == []


def test_queues_sort_by_number_not_text(tmp_path):
    for queue in ("rx-0", "rx-1", "rx-2", "rx-10", "tx-0", "rps"):
        (tmp_path / "sys/class/net/ens1/queues" / queue).mkdir(parents=True)
    assert irq.interface_queues(str(tmp_path), "ens1", "rx") == ["rx-0", "rx-1", "rx-2", "rx-10"]


def test_missing_online_file_names_the_path(tmp_path):
    with pytest.raises(
        irq.IrqAffinityError, match=r"read online CPUs .*/sys/devices/system/cpu/online: No such"
    ):
        irq.read_online_cpus(str(tmp_path))


# --- Plans on recorded trees ----------------------------------------------------------


def test_pi5_eth0_is_pinned_and_the_usb_nic_has_no_irq_of_its_own():
    plan = irq.plan_affinity(str(FIXTURES / "pi5-usb-2g5"), ["eth0", "eth1"], "0", rps_cpus="1")
    assert plan.of_kind("irq") == [
        {"irq": 106, "name": "eth0", "interface": "eth0", "before": "0-3", "after": "0"}
    ]
    assert plan.interfaces_without_irqs == ["eth1"]
    assert plan.of_kind("rps") == [
        {"interface": "eth0", "queue": "rx-0", "before": "0", "after": "2"},
        {"interface": "eth1", "queue": "rx-0", "before": "0", "after": "2"},
    ]
    assert plan.of_kind("xps") == []
    assert plan.changed
    assert plan.warnings == []
    assert plan.changes() == [
        "irq 106 (eth0): 0-3 -> 0",
        "eth0 rx-0 rps_cpus: 0 -> 2",
        "eth1 rx-0 rps_cpus: 0 -> 2",
    ]


@pytest.mark.parametrize(("tree", "number"), [("pi5-usb-2g5", 106), ("pi5-ubuntu-6.5", 112)])
def test_the_same_nic_is_found_by_name_whatever_its_number(tree, number):
    plan = irq.plan_affinity(str(FIXTURES / tree), ["eth0"], "1")
    assert [(s["irq"], s["name"]) for s in plan.of_kind("irq")] == [(number, "eth0")]


def test_x86_multi_queue_nic_every_queue_vector_and_the_main_one():
    plan = irq.plan_affinity(
        str(FIXTURES / "x86-igb-8cpu"), ["enp3s0", "eno1", "docker0", "veth3a9c1f2"], "0-1", xps=True
    )
    assert [(s["irq"], s["name"], s["interface"]) for s in plan.of_kind("irq")] == [
        (136, "enp3s0", "enp3s0"),
        (137, "enp3s0-TxRx-0", "enp3s0"),
        (138, "enp3s0-TxRx-1", "enp3s0"),
        (139, "enp3s0-TxRx-2", "enp3s0"),
        (140, "enp3s0-TxRx-3", "enp3s0"),
        (141, "eno1", "eno1"),
    ]
    assert {s["before"] for s in plan.of_kind("irq")} == {"0-7"}
    assert {s["after"] for s in plan.of_kind("irq")} == {"0-1"}
    assert plan.interfaces_without_irqs == ["docker0", "veth3a9c1f2"]
    # 8 possible CPUs: two hex digits, as the kernel prints them.
    assert [(s["interface"], s["queue"], s["after"]) for s in plan.of_kind("xps")] == [
        ("enp3s0", "tx-0", "03"),
        ("enp3s0", "tx-1", "03"),
        ("enp3s0", "tx-2", "03"),
        ("enp3s0", "tx-3", "03"),
        ("veth3a9c1f2", "tx-0", "03"),
    ]
    # e1000e and the bridge have one transmit queue: the kernel hides xps_cpus.
    assert plan.warnings == [f"xps: eno1 {SINGLE_TX_QUEUE}", f"xps: docker0 {SINGLE_TX_QUEUE}"]
    assert plan.of_kind("rps") == []


def test_interfaces_given_twice_are_planned_once():
    plan = irq.plan_affinity(str(FIXTURES / "pi5-usb-2g5"), ["eth0", "eth0"], "0", rps_cpus="0")
    assert len(plan.of_kind("irq")) == 1
    assert len(plan.of_kind("rps")) == 1


def test_no_interfaces_plan_nothing():
    plan = irq.plan_affinity(str(FIXTURES / "pi5-usb-2g5"), [], "0")
    assert (plan.settings, plan.interfaces_without_irqs, plan.changed) == ([], [], False)


def test_values_already_right_in_another_spelling_are_left_alone(copy_tree):
    tree = copy_tree("x86-igb-8cpu")
    (tree / "proc/irq/137/smp_affinity_list").write_text("1,0\n")
    (tree / "sys/class/net/enp3s0/queues/rx-2/rps_cpus").write_text("d\n")
    plan = irq.plan_affinity(str(tree), ["enp3s0"], "0-1", rps_cpus="0,2-3")
    by_irq = {s["irq"]: s for s in plan.of_kind("irq")}
    assert by_irq[137] == {
        "irq": 137,
        "name": "enp3s0-TxRx-0",
        "interface": "enp3s0",
        "before": "1,0",
        "after": "1,0",
    }
    assert by_irq[138]["after"] == "0-1"
    rps = {s["queue"]: (s["before"], s["after"]) for s in plan.of_kind("rps")}
    assert rps == {"rx-0": ("00", "0d"), "rx-1": ("00", "0d"), "rx-2": ("d", "d"), "rx-3": ("00", "0d")}


def test_a_shared_line_is_pinned_with_a_warning(copy_tree):
    tree = copy_tree("pi5-usb-2g5")
    interrupts = tree / "proc/interrupts"
    interrupts.write_text(
        interrupts.read_text().replace("Level     eth0\n", "Level     eth0, 1f00074000.i2c\n")
    )
    plan = irq.plan_affinity(str(tree), ["eth0"], "0")
    assert [s["irq"] for s in plan.of_kind("irq")] == [106]
    assert plan.warnings == [
        "irq 106 (eth0) is shared with 1f00074000.i2c; pinning it moves their interrupts to CPU 0 too"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interfaces": ["eth0", "eth9"]}, "interface eth9: not found under "),
        ({"cpus": "4"}, "cpus '4': CPU 4 is not online on this host, whose online CPUs are 0-3"),
        ({"cpus": "2-5"}, "cpus '2-5': CPUs 4-5 are not online on this host, whose online CPUs are 0-3"),
        ({"rps_cpus": "0,7"}, "rps_cpus '0,7': CPU 7 is not online"),
        ({"cpus": "0-"}, "cpus '0-': has '0-', which is neither a CPU number nor a range like 0-3"),
        ({"rps_cpus": ""}, "rps_cpus '': is empty"),
        ({"interfaces": ["../../etc"]}, "interface '../../etc' is not an interface name"),
    ],
)
def test_bad_options_are_refused_by_the_plan(kwargs, message):
    args = {"interfaces": ["eth0"], "cpus": "0", **kwargs}
    with pytest.raises(irq.IrqAffinityError, match=re.escape(message)):
        irq.plan_affinity(str(FIXTURES / "pi5-usb-2g5"), args.pop("interfaces"), args.pop("cpus"), **args)


def test_missing_interface_lists_what_the_host_has():
    with pytest.raises(irq.IrqAffinityError) as raised:
        irq.plan_affinity(str(FIXTURES / "pi5-usb-2g5"), ["wlan0"], "0")
    assert str(raised.value).endswith("pi5-usb-2g5/sys/class/net (this host has: eth0, eth1, lo)")


def test_unreadable_affinity_of_a_found_irq_names_it(copy_tree):
    tree = copy_tree("pi5-usb-2g5")
    (tree / "proc/irq/106/smp_affinity_list").unlink()
    with pytest.raises(irq.IrqAffinityError, match=r"read affinity of irq 106 \(eth0\) .*: No such file"):
        irq.plan_affinity(str(tree), ["eth0"], "0")


def test_unreadable_rps_mask_names_the_queue(copy_tree):
    tree = copy_tree("pi5-usb-2g5")
    (tree / "sys/class/net/eth1/queues/rx-0/rps_cpus").write_text("zz\n")
    with pytest.raises(
        irq.IrqAffinityError, match=r"read rps_cpus of eth1 rx-0 .*'zz' is not a hex CPU mask"
    ):
        irq.plan_affinity(str(tree), ["eth1"], "0", rps_cpus="0")


# --- Apply ------------------------------------------------------------------


def test_apply_writes_what_differs_and_a_new_plan_finds_nothing_to_do(copy_tree):
    tree = copy_tree("x86-igb-8cpu")
    plan = irq.plan_affinity(str(tree), ["enp3s0"], "2-3", rps_cpus="2-3", xps=True)
    applied = irq.apply_plan(plan)
    assert len(applied) == 5 + 4 + 4
    assert read(tree, "/proc/irq/139/smp_affinity_list") == "2-3\n"
    assert read(tree, "/sys/class/net/enp3s0/queues/rx-3/rps_cpus") == "0c\n"
    assert read(tree, "/sys/class/net/enp3s0/queues/tx-0/xps_cpus") == "0c\n"
    # The NVMe and xHCI interrupts are not the NIC's and keep their CPUs.
    assert read(tree, "/proc/irq/131/smp_affinity_list") == "3\n"
    assert read(tree, "/proc/irq/125/smp_affinity_list") == "0-7\n"
    again = irq.plan_affinity(str(tree), ["enp3s0"], "2,3", rps_cpus="2,3", xps=True)
    assert not again.changed
    assert irq.apply_plan(again) == []


def test_apply_skips_values_already_right(copy_tree, monkeypatch):
    tree = copy_tree("x86-igb-8cpu")
    (tree / "proc/irq/137/smp_affinity_list").write_text("0\n")
    written = []
    monkeypatch.setattr(irq, "write_attribute", lambda path, value: written.append((path, value)))
    irq.apply_plan(irq.plan_affinity(str(tree), ["enp3s0"], "0"))
    assert [Path(path).parent.name for path, _value in written] == ["136", "138", "139", "140"]
    assert {value for _path, value in written} == {"0"}


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.EIO, "Input/output error: the kernel manages this interrupt's affinity itself"),
        (errno.EINVAL, "Invalid argument: the kernel refused the value"),
        (errno.EACCES, "Permission denied: permission denied; run as root (become: true)"),
        (errno.EROFS, "Read-only file system: read-only file system"),
    ],
)
def test_a_refused_write_names_the_interrupt_and_what_was_written_before(copy_tree, monkeypatch, code, hint):
    tree = copy_tree("x86-igb-8cpu")
    plan = irq.plan_affinity(str(tree), ["enp3s0"], "0")
    real_write = irq.write_attribute

    def write(path, value):
        if "/irq/138/" in path:
            raise OSError(code, os.strerror(code))
        real_write(path, value)

    monkeypatch.setattr(irq, "write_attribute", write)
    with pytest.raises(irq.ApplyError) as raised:
        irq.apply_plan(plan)
    assert str(raised.value).startswith(
        f"set irq 138 (enp3s0-TxRx-1) to 0 ({tree}/proc/irq/138/smp_affinity_list): "
    )
    assert hint in str(raised.value)
    assert [s.irq for s in raised.value.applied] == [136, 137]
    assert read(tree, "/proc/irq/139/smp_affinity_list") == "0-7\n"


def test_write_attribute_replaces_the_value_in_one_write(tmp_path):
    attribute = tmp_path / "smp_affinity_list"
    attribute.write_text("0-3\n")
    irq.write_attribute(str(attribute), "0")
    assert attribute.read_text() == "0\n"


# --- Boot-time command --------------------------------------------------------


def write_config(tmp_path: Path, **settings) -> str:
    config = tmp_path / "net-tuning.json"
    config.write_text(
        json.dumps({"interfaces": ["eth0", "eth1"], "cpus": "0", "rps_cpus": "0", "xps": True, **settings})
    )
    return str(config)


def test_command_pins_by_name_and_prints_each_change(copy_tree, tmp_path, capsys):
    tree = copy_tree("pi5-usb-2g5")
    assert irq.main(["--config", write_config(tmp_path), "--root", str(tree)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "irq 106 (eth0): 0-3 -> 0",
        "eth0 rx-0 rps_cpus: 0 -> 1",
        "eth1 rx-0 rps_cpus: 0 -> 1",
    ]
    assert "no IRQ of their own: eth1" in err
    assert "warning: xps: eth0 has a single transmit queue" in err
    assert read(tree, "/proc/irq/106/smp_affinity_list") == "0\n"
    assert irq.main(["--config", write_config(tmp_path), "--root", str(tree)]) == 0
    assert capsys.readouterr().out == ""


def test_command_check_writes_nothing(copy_tree, tmp_path, capsys):
    tree = copy_tree("pi5-usb-2g5")
    assert irq.main(["--config", write_config(tmp_path, rps_cpus=None), "--root", str(tree), "--check"]) == 0
    assert capsys.readouterr().out == "irq 106 (eth0): 0-3 -> 0\n"
    assert read(tree, "/proc/irq/106/smp_affinity_list") == "0-3\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"interfaces": ["eth0"], "cpus": "9"}', "irq_affinity: cpus '9': CPU 9 is not online"),
        ("[1, 2]", "holds list, not a JSON object"),
        ("{not json", "irq_affinity: Expecting property name"),
    ],
)
def test_command_refuses_bad_settings_with_exit_1(tmp_path, capsys, content, message):
    config = tmp_path / "net-tuning.json"
    config.write_text(content)
    assert irq.main(["--config", str(config), "--root", str(FIXTURES / "pi5-usb-2g5")]) == 1
    assert message in capsys.readouterr().err


def test_the_file_runs_as_a_script_as_the_boot_unit_runs_it(copy_tree, tmp_path):
    tree = copy_tree("x86-igb-8cpu")
    config = write_config(tmp_path, interfaces=["enp3s0"], cpus="1", rps_cpus=None, xps=False)
    done = subprocess.run(
        [sys.executable, str(MODULE_UTILS_FILE), "--config", config, "--root", str(tree)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0] == "irq 136 (enp3s0): 0-7 -> 1"
    assert len(done.stdout.splitlines()) == 5
    assert read(tree, "/proc/irq/140/smp_affinity_list") == "1\n"
