"""irq_affinity through AnsibleModule on copies of recorded trees: check mode, diff, idempotence, failures."""

from __future__ import annotations

import errno
import functools
import os
import shutil
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.module_utils import irq_affinity as irq_utils
from ansible_collections.pifarm.inference.plugins.modules import irq_affinity
from module_harness import fail_module, run_module

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "net"
# A fixed, old modification time: a write would move it.
OLD_MTIME_NS = 1_700_000_000_000_000_000


run = functools.partial(run_module, irq_affinity)

fail = functools.partial(fail_module, irq_affinity)


def copy_tree(tmp_path: Path, name: str) -> Path:
    """A copy of a recorded tree whose files all carry an old mtime."""
    tree = tmp_path / name
    shutil.copytree(FIXTURES / name, tree)
    for path in tree.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return tree


def snapshot(tree: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime: equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(tree)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in tree.rglob("*")
        if p.is_file()
    }


def read(tree: Path, path: str) -> str:
    return (tree / path.lstrip("/")).read_text()


@pytest.fixture
def pi5(tmp_path) -> Path:
    return copy_tree(tmp_path, "pi5-usb-2g5")


@pytest.fixture
def x86(tmp_path) -> Path:
    return copy_tree(tmp_path, "x86-igb-8cpu")


def test_check_mode_reports_eth0_and_writes_nothing(pi5):
    before = snapshot(pi5)
    result = run(interfaces=["eth0"], cpus="0", root=str(pi5), _ansible_check_mode=True, _ansible_diff=True)
    assert result["changed"] is True
    assert result["irqs"] == [
        {"irq": 106, "name": "eth0", "interface": "eth0", "before": "0-3", "after": "0"}
    ]
    assert (result["rps"], result["xps"], result["interfaces_without_irqs"]) == ([], [], [])
    assert result["diff"] == {
        "before": "irq 106 (eth0): 0-3\n",
        "after": "irq 106 (eth0): 0\n",
        "before_header": f"IRQ affinity and packet steering under {pi5}",
        "after_header": f"IRQ affinity and packet steering under {pi5}",
    }
    assert snapshot(pi5) == before


def test_check_mode_with_every_option_writes_nothing(x86):
    before = snapshot(x86)
    result = run(
        interfaces=["enp3s0", "eno1"],
        cpus="0-1",
        rps_cpus="2-3",
        xps=True,
        root=str(x86),
        _ansible_check_mode=True,
    )
    assert result["changed"] is True
    assert len(result["irqs"]) == 6
    assert len(result["rps"]) == 5
    assert len(result["xps"]) == 4
    assert snapshot(x86) == before


def test_apply_then_apply_again_changes_nothing(pi5):
    args = {"interfaces": ["eth0", "eth1"], "cpus": "0", "rps_cpus": "0", "root": str(pi5)}
    first = run(**args)
    assert first["changed"] is True
    assert read(pi5, "/proc/irq/106/smp_affinity_list") == "0\n"
    assert read(pi5, "/sys/class/net/eth0/queues/rx-0/rps_cpus") == "1\n"
    assert read(pi5, "/sys/class/net/eth1/queues/rx-0/rps_cpus") == "1\n"
    written = snapshot(pi5)

    second = run(**args, _ansible_diff=True)
    assert second["changed"] is False
    assert second["irqs"] == [{"irq": 106, "name": "eth0", "interface": "eth0", "before": "0", "after": "0"}]
    assert [(r["before"], r["after"]) for r in second["rps"]] == [("1", "1"), ("1", "1")]
    assert second["diff"]["before"] == second["diff"]["after"]
    assert snapshot(pi5) == written


def test_diff_lists_every_managed_value_before_and_after(x86):
    result = run(
        interfaces=["enp3s0", "veth3a9c1f2"],
        cpus="0,1",
        rps_cpus="0",
        xps=True,
        root=str(x86),
        _ansible_check_mode=True,
        _ansible_diff=True,
    )
    queue_lines = [
        *(f"enp3s0 rx-{q} rps_cpus: {{}}" for q in range(4)),
        *(f"enp3s0 tx-{q} xps_cpus: {{xps}}" for q in range(4)),
        "veth3a9c1f2 rx-0 rps_cpus: {}",
        "veth3a9c1f2 tx-0 xps_cpus: {xps}",
    ]
    irq_lines = ["irq 136 (enp3s0): {}", *(f"irq {137 + q} (enp3s0-TxRx-{q}): {{}}" for q in range(4))]
    assert result["diff"]["before"] == "".join(line.format("0-7") + "\n" for line in irq_lines) + "".join(
        line.format("00", xps="00") + "\n" for line in queue_lines
    )
    assert result["diff"]["after"] == "".join(line.format("0-1") + "\n" for line in irq_lines) + "".join(
        line.format("01", xps="03") + "\n" for line in queue_lines
    )


def test_no_diff_without_diff_mode(pi5):
    assert "diff" not in run(interfaces=["eth0"], cpus="0", root=str(pi5), _ansible_check_mode=True)


def test_usb_nic_is_reported_without_irqs_and_gets_steering_only(pi5):
    result = run(interfaces=["eth1"], cpus="1", rps_cpus="2-3", root=str(pi5))
    assert result["changed"] is True
    assert result["irqs"] == []
    assert result["interfaces_without_irqs"] == ["eth1"]
    assert result["rps"] == [{"interface": "eth1", "queue": "rx-0", "before": "0", "after": "c"}]
    # The xHCI controller's interrupt serves every USB device: it is not the NIC's to move.
    assert read(pi5, "/proc/irq/131/smp_affinity_list") == "0-3\n"
    assert read(pi5, "/proc/irq/106/smp_affinity_list") == "0-3\n"


def test_same_board_under_another_kernel_is_pinned_by_name(tmp_path):
    tree = copy_tree(tmp_path, "pi5-ubuntu-6.5")
    result = run(interfaces=["eth0"], cpus="3", root=str(tree))
    assert [(i["irq"], i["name"]) for i in result["irqs"]] == [(112, "eth0")]
    assert read(tree, "/proc/irq/112/smp_affinity_list") == "3\n"


def test_x86_queues_virtual_nics_and_xps(x86, module_exits):
    result = run(interfaces=["enp3s0", "docker0", "veth3a9c1f2"], cpus="0-1", xps=True, root=str(x86))
    assert [i["name"] for i in result["irqs"]] == ["enp3s0", *(f"enp3s0-TxRx-{q}" for q in range(4))]
    assert result["interfaces_without_irqs"] == ["docker0", "veth3a9c1f2"]
    assert [(x["interface"], x["queue"], x["after"]) for x in result["xps"]] == [
        *(("enp3s0", f"tx-{q}", "03") for q in range(4)),
        ("veth3a9c1f2", "tx-0", "03"),
    ]
    assert module_exits == [
        "xps: docker0 has a single transmit queue, so XPS does not apply to it; "
        "its transmit steering is left as it is"
    ]
    for q in range(4):
        assert read(x86, f"/sys/class/net/enp3s0/queues/tx-{q}/xps_cpus") == "03\n"
    # eno1 was not asked for, nor the NVMe queues.
    assert read(x86, "/proc/irq/141/smp_affinity_list") == "0-7\n"
    assert read(x86, "/proc/irq/128/smp_affinity_list") == "0\n"


def test_values_right_in_another_spelling_are_not_rewritten(x86):
    (x86 / "proc/irq/137/smp_affinity_list").write_text("0,1\n")
    (x86 / "sys/class/net/enp3s0/queues/rx-0/rps_cpus").write_text("3\n")
    for path in ("proc/irq/137/smp_affinity_list", "sys/class/net/enp3s0/queues/rx-0/rps_cpus"):
        os.utime(x86 / path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    result = run(interfaces=["enp3s0"], cpus="0-1", rps_cpus="0,1", root=str(x86))
    assert result["changed"] is True
    assert {i["irq"]: (i["before"], i["after"]) for i in result["irqs"]}[137] == ("0,1", "0,1")
    assert result["rps"][0] == {"interface": "enp3s0", "queue": "rx-0", "before": "3", "after": "3"}
    assert (x86 / "proc/irq/137/smp_affinity_list").stat().st_mtime_ns == OLD_MTIME_NS
    assert (x86 / "sys/class/net/enp3s0/queues/rx-0/rps_cpus").stat().st_mtime_ns == OLD_MTIME_NS
    assert read(x86, "/proc/irq/138/smp_affinity_list") == "0-1\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"interfaces": ["eth0", "enp1s0"]},
            "interface enp1s0: not found under {root}/sys/class/net (this host has: eth0, eth1, lo)",
        ),
        ({"cpus": "4"}, "cpus '4': CPU 4 is not online on this host, whose online CPUs are 0-3"),
        ({"cpus": "0-7"}, "cpus '0-7': CPUs 4-7 are not online on this host, whose online CPUs are 0-3"),
        ({"rps_cpus": "3-4"}, "rps_cpus '3-4': CPU 4 is not online on this host, whose online CPUs are 0-3"),
        ({"cpus": "0-1,"}, "cpus '0-1,': has '', which is neither a CPU number nor a range like 0-3"),
        ({"cpus": "two"}, "cpus 'two': has 'two', which is neither a CPU number nor a range like 0-3"),
        (
            {"interfaces": ["eth0:1"]},
            'interface \'eth0:1\' is not an interface name: contains "/", ":" or whitespace',
        ),
    ],
)
def test_bad_input_fails_before_any_write(pi5, args, message):
    before = snapshot(pi5)
    result = fail(
        **{"interfaces": ["eth0"], "cpus": "0", "rps_cpus": "0", "xps": True, "root": str(pi5), **args}
    )
    assert result["msg"] == message.format(root=pi5)
    assert snapshot(pi5) == before


def test_missing_interface_fails_before_reading_interrupts(pi5):
    (pi5 / "proc/interrupts").unlink()
    result = fail(interfaces=["eth7"], cpus="0", root=str(pi5))
    assert result["msg"].startswith("interface eth7: not found under ")


def test_root_without_proc_interrupts_fails_naming_it(pi5):
    (pi5 / "proc/interrupts").unlink()
    assert fail(interfaces=["eth0"], cpus="0", root=str(pi5))["msg"] == (
        f"read {pi5}/proc/interrupts: No such file or directory"
    )


def test_refused_write_fails_naming_the_irq_and_what_was_applied(x86, monkeypatch):
    real_write = irq_utils.write_attribute

    def write(path, value):
        if path.endswith("/irq/137/smp_affinity_list"):
            raise OSError(errno.EIO, "Input/output error")
        real_write(path, value)

    monkeypatch.setattr(irq_utils, "write_attribute", write)
    result = fail(interfaces=["enp3s0"], cpus="2", root=str(x86))
    assert result["msg"] == (
        f"set irq 137 (enp3s0-TxRx-0) to 2 ({x86}/proc/irq/137/smp_affinity_list): Input/output error: "
        "the kernel manages this interrupt's affinity itself (a managed IRQ) and refuses changes"
    )
    assert result["changed"] is True
    assert result["applied"] == ["irq 136 (enp3s0)"]
    assert read(x86, "/proc/irq/136/smp_affinity_list") == "2\n"
    assert read(x86, "/proc/irq/138/smp_affinity_list") == "0-7\n"


def test_first_write_refused_reports_no_change(pi5, monkeypatch):
    def write(path, value):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(irq_utils, "write_attribute", write)
    result = fail(interfaces=["eth0"], cpus="0", root=str(pi5))
    assert result["changed"] is False
    assert result["applied"] == []
    assert result["msg"].endswith("Permission denied: permission denied; run as root (become: true)")
