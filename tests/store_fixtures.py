"""The model_store role's store on loopback: moto with IAM enforced, the role's users, policies, buckets.

The role tests (tests/roles/test_model_roles.py) and the artifact tests (tests/integration/
test_artifacts.py) run against it. tests/conftest.py loads this module as a pytest plugin, so its
fixtures (``role_vars``, ``moto_store``, ``set_up_store``) reach every test; the helpers and
STORE_CREDENTIALS are imported by name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio
from playbook_harness import LOCALHOST, run_playbook

REPO = Path(__file__).resolve().parent.parent
STORE_FILES = REPO / "roles" / "model_store" / "files"

STORE_CREDENTIALS = {
    "farm_store_root_user": "pifarm-root",
    "farm_store_root_password": "Root-secret-4c2f9e",
    "farm_store_publisher_access_key": "pifarm-publisher",
    "farm_store_publisher_secret_key": "Pub-secret-7d1a0b",
    "farm_store_node_access_key": "pifarm-node",
    "farm_store_node_secret_key": "Node-secret-9e3b5c",
}


def run_json(command: list[str], settings: dict) -> tuple[int, dict, str]:
    """Run a program that takes its settings as JSON on stdin and answers in JSON, as the roles do:
    its exit code, its answer and everything it printed."""
    result = subprocess.run(
        command,
        input=json.dumps(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, json.loads(result.stdout), result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def role_vars(tmp_path_factory, ansible_env) -> dict:
    """The model_store role's policies and Python pins, rendered by Ansible from its vars file."""
    work = tmp_path_factory.mktemp("role-vars")
    playbook = work / "render.yml"
    out = work / "out.json"
    playbook.write_text(
        "- hosts: all\n"
        "  gather_facts: false\n"
        "  roles: [pifarm.inference.farm]\n"
        "  vars:\n"
        f"    role_path: {REPO}/roles/model_store\n"
        "  tasks:\n"
        "    - ansible.builtin.include_vars:\n"
        f"        file: {REPO}/roles/model_store/vars/main.yml\n"
        "    - ansible.builtin.copy:\n"
        "        content: >-\n"
        "          {{ {'policies': __model_store_policies,\n"
        "              'pins': [__model_store_pin_minio, __model_store_pin_moto]} | to_json }}\n"
        f"        dest: {out}\n"
        "        mode: '0600'\n"
    )
    result = run_playbook(playbook, work, ansible_env, {}, inventory=LOCALHOST)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def iam_users(policies: dict) -> list[dict]:
    users = [
        ("pifarm-store-admin", "farm_store_root_user", "farm_store_root_password"),
        ("pifarm-publisher", "farm_store_publisher_access_key", "farm_store_publisher_secret_key"),
        ("pifarm-node-read", "farm_store_node_access_key", "farm_store_node_secret_key"),
    ]
    return [
        {
            "name": policy,
            "access_key": STORE_CREDENTIALS[access],
            "secret_key": STORE_CREDENTIALS[secret],
            "policy_name": policy,
            "policy": policies[policy],
        }
        for policy, access, secret in users
    ]


@pytest.fixture(scope="module")
def moto_store(role_vars, tmp_path_factory) -> Iterator[str]:
    """The role's moto launcher with IAM enforced, seeded with the role's users and policies."""
    work = tmp_path_factory.mktemp("moto-store")
    iam = work / "iam.json"
    iam.write_text(json.dumps({"users": iam_users(role_vars["policies"])}))
    port = free_port()
    log = (work / "moto.log").open("wb")
    launcher = STORE_FILES / "pifarm_moto_server.py"
    process = subprocess.Popen(
        [sys.executable, str(launcher), "--iam", str(iam), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"the moto launcher did not listen: {(work / 'moto.log').read_text()}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    log.close()


def store_setup(endpoint: str, policies: dict, *check: str, **overrides) -> tuple[int, dict, str]:
    settings = {
        "endpoint": endpoint,
        "backend": "moto",
        "access_key": STORE_CREDENTIALS["farm_store_root_user"],
        "secret_key": STORE_CREDENTIALS["farm_store_root_password"],
        "buckets": [{"name": "models"}, {"name": "artifacts"}],
        "policies": {k: v for k, v in policies.items() if k != "pifarm-store-admin"},
        "users": [
            {
                "access_key": STORE_CREDENTIALS["farm_store_publisher_access_key"],
                "secret_key": STORE_CREDENTIALS["farm_store_publisher_secret_key"],
                "policy": "pifarm-publisher",
            },
            {
                "access_key": STORE_CREDENTIALS["farm_store_node_access_key"],
                "secret_key": STORE_CREDENTIALS["farm_store_node_secret_key"],
                "policy": "pifarm-node-read",
            },
        ],
        "probe_bucket": "models",
        "timeout": 10,
        **overrides,
    }
    return run_json([sys.executable, str(STORE_FILES / "pifarm_store_setup.py"), *check], settings)


def client(endpoint: str, who: str) -> Minio:
    return Minio(
        endpoint,
        STORE_CREDENTIALS[f"farm_store_{who}_access_key"],
        STORE_CREDENTIALS[f"farm_store_{who}_secret_key"],
        secure=False,
    )


@pytest.fixture(scope="module")
def set_up_store(moto_store, role_vars) -> str:
    """A check run on the empty store, then the real run: the buckets exist with versioning."""
    rc, checked, _output = store_setup(moto_store, role_vars["policies"], "--check")
    assert rc == 0, checked
    assert checked["changed"] is True
    assert [b["created"] for b in checked["buckets"]] == [True, True]
    admin_view = client_root(moto_store)
    assert not admin_view.bucket_exists("models"), "--check created a bucket"
    rc, first, _output = store_setup(moto_store, role_vars["policies"])
    assert rc == 0, first
    assert first["changed"] is True
    return moto_store


def client_root(endpoint: str) -> Minio:
    return Minio(
        endpoint,
        STORE_CREDENTIALS["farm_store_root_user"],
        STORE_CREDENTIALS["farm_store_root_password"],
        secure=False,
    )
