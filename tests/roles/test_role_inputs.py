"""Bad input to node_base fails before the host is touched, naming the variable."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# A docker container that does not exist: reaching it is "unreachable", never a change.
INVENTORY = "pifarm-no-such-host ansible_connection=community.docker.docker\n"


def run_node_base(tmp_path: Path, env: dict[str, str], extra_vars: dict) -> subprocess.CompletedProcess:
    inventory = tmp_path / "hosts"
    inventory.write_text(INVENTORY)
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            str(HERE / "playbooks" / "node_base.yml"),
            "-e",
            json.dumps(extra_vars),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def recap(result: subprocess.CompletedProcess) -> dict[str, int]:
    match = re.search(r"pifarm-no-such-host\s*:\s*(.*)", result.stdout)
    assert match, result.stdout
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.mark.parametrize(
    ("extra_vars", "failing_task", "named"),
    [
        pytest.param(
            {"node_base_cpu_governor": "turbo"},
            "Validating arguments against arg spec",
            "node_base_cpu_governor",
            id="unknown-governor",
        ),
        pytest.param(
            {"node_base_wifi_powersave_disabled": "sometimes"},
            "Validating arguments against arg spec",
            "node_base_wifi_powersave_disabled",
            id="not-a-bool",
        ),
        pytest.param(
            {"node_base_packages": {"chrony": True}},
            "Validating arguments against arg spec",
            "node_base_packages",
            id="dict-for-list",
        ),
        pytest.param(
            {"node_base_journald_system_max_use": "lots"},
            "Assert journald sizes are byte counts",
            "node_base_journald_system_max_use=lots",
            id="bad-journald-size",
        ),
        pytest.param(
            {"node_base_chrony_pools": [], "node_base_chrony_servers": []},
            "Assert chrony has at least one time source",
            "node_base_chrony_pools",
            id="no-time-source",
        ),
        pytest.param(
            {"node_base_ca_certificates": [{"content": "-----BEGIN CERTIFICATE-----"}]},
            "Assert each extra CA certificate has one source and a name",
            "node_base_ca_certificates[0]",
            id="ca-without-name",
        ),
        pytest.param(
            {"node_base_ca_certificates": [{"src": "/nonexistent/proxy-ca.crt"}]},
            "Assert each extra CA certificate has one source and a name",
            "node_base_ca_certificates[0]",
            id="ca-file-missing",
        ),
    ],
)
def test_bad_input_fails_before_touching_the_host(tmp_path, ansible_env, extra_vars, failing_task, named):
    result = run_node_base(tmp_path, ansible_env, extra_vars)
    assert result.returncode != 0
    counts = recap(result)
    assert counts["failed"] == 1
    assert counts["unreachable"] == 0, "the role reached the host before rejecting the input"
    assert counts["changed"] == 0
    first_failure = re.search(r"^(fatal|failed): \[", result.stdout, re.MULTILINE)
    assert first_failure, result.stdout
    failed_at = result.stdout[: first_failure.start()].rsplit("TASK [", 1)[1]
    assert failing_task in failed_at
    assert named in result.stdout


def test_good_input_passes_the_checks_and_reaches_the_host(tmp_path, ansible_env):
    """The control case: with valid input the run gets past every check to the host."""
    result = run_node_base(tmp_path, ansible_env, {"node_base_cpu_governor": "schedutil"})
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
