"""What role and playbook tests share: ansible-playbook against a one-host inventory, and its recap.

Role tests (tests/roles) and the store fixtures (tests/store_fixtures.py) both import it; tests/ is
on sys.path through tests/conftest.py. By default the host is one that does not exist, so a run
that gets past a role's checks ends "unreachable" and never changes anything.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A docker container that does not exist: reaching it is "unreachable", never a change.
INVENTORY = "pifarm-no-such-host ansible_connection=community.docker.docker\n"
LOCALHOST = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
ROLE_PLAYBOOK = HERE / "roles" / "playbooks" / "role.yml"
ARGSPEC = "Validating arguments against arg spec"


def run_playbook(
    playbook: Path,
    tmp_path: Path,
    env: dict[str, str],
    extra_vars: dict,
    *,
    inventory: str = INVENTORY,
    check: bool = False,
    options: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """ansible-playbook against a one-host inventory (by default the unreachable host)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(inventory)
    command = ["ansible-playbook", "-i", str(hosts), str(playbook), "-e", json.dumps(extra_vars), *options]
    if check:
        command.append("--check")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def run_role(
    role: str, tmp_path: Path, env: dict[str, str], extra_vars: dict, **options
) -> subprocess.CompletedProcess:
    """Apply pifarm.inference.<role> through tests/roles/playbooks/role.yml."""
    return run_playbook(
        ROLE_PLAYBOOK, tmp_path, env, {"role_under_test": f"pifarm.inference.{role}", **extra_vars}, **options
    )


def recap(result: subprocess.CompletedProcess, host: str = "pifarm-no-such-host") -> dict[str, int]:
    """The PLAY RECAP counters of one host."""
    match = re.search(rf"^{re.escape(host)}\s+:\s+(ok=.*)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def first_failed_task(result: subprocess.CompletedProcess) -> str:
    """The header of the task the run first failed in."""
    first_failure = re.search(r"^(fatal|failed): \[", result.stdout, re.MULTILINE)
    assert first_failure, result.stdout
    return result.stdout[: first_failure.start()].rsplit("TASK [", 1)[1]


def assert_refused_before_the_host(
    result: subprocess.CompletedProcess, failing_task: str, named: str
) -> None:
    """The run failed at ``failing_task``, naming ``named``, before reaching or changing the host."""
    assert result.returncode != 0
    counts = recap(result)
    assert counts["failed"] == 1
    assert counts["unreachable"] == 0, "the role reached the host before rejecting the input"
    assert counts["changed"] == 0
    assert failing_task in first_failed_task(result)
    assert named in result.stdout
