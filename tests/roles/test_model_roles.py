"""model_store, model_cache and publish_model.yml: their checks, and their programs against a real S3 server.

Bad input fails before the host is touched (the unreachable host of
tests/playbook_harness.py), with a message naming the variable and never a credential.
The store's own programs (the moto launcher with IAM enforced, the setup
program) and publish_model.yml run here against moto's S3 server on loopback,
with the role's real policies (the fixtures of tests/store_fixtures.py): the
node key reads and cannot write.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import minisign
import pytest
from minio.error import S3Error
from playbook_harness import (
    ARGSPEC,
    LOCALHOST,
    assert_refused_before_the_host,
    first_failed_task,
    recap,
    run_playbook,
    run_role,
)
from store_fixtures import STORE_CREDENTIALS, client, client_root, store_setup

REPO = Path(__file__).resolve().parents[2]
PUBLISH = REPO / "playbooks" / "publish_model.yml"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def keypair() -> minisign.KeyPair:
    return minisign.KeyPair.generate()


@pytest.fixture(scope="module")
def public_key(keypair) -> str:
    return bytes(keypair.public_key).decode() + "\n"


@pytest.fixture
def node_vars(public_key) -> dict:
    return {
        "farm_store_node_access_key": "pifarm-node",
        "farm_store_node_secret_key": "Node-secret-9e3b5c",
        "farm_model_signing_public_key": public_key,
        "model_cache_store_endpoint": "http://storage1:9000",
        "model_cache_models": [{"name": "gemma3-270m"}],
    }


# -- model_store: checks before the host ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra_vars", "failing_task", "named"),
    [
        pytest.param({"model_store_backend": "ceph"}, ARGSPEC, "model_store_backend", id="unknown-backend"),
        pytest.param(
            {"farm_store_node_secret_key": "Zq-shrt"},
            "Assert the store's credentials are set",
            "farm_store_node_secret_key",
            id="secret-too-short",
        ),
        pytest.param(
            {"farm_store_root_password": "Zq has spaces in it"},
            "Assert the store's credentials are set",
            "farm_store_root_password",
            id="secret-with-whitespace",
        ),
        pytest.param(
            {"farm_store_node_access_key": "pifarm-publisher"},
            "Assert the root, publisher and node keys are three different users",
            "the node key is read-only only if",
            id="node-key-is-publisher-key",
        ),
        pytest.param(
            {"model_store_backend": "moto", "model_store_tls": True, "farm_store_scheme": "https"},
            "Assert TLS and the scheme nodes use agree",
            "the minio backend",
            id="tls-on-moto",
        ),
        pytest.param(
            {"farm_store_scheme": "https"},
            "Assert TLS and the scheme nodes use agree",
            "farm_store_scheme=https",
            id="https-without-tls",
        ),
        pytest.param(
            {"model_store_minio_binary_src": "/nonexistent/minio"},
            "Assert a supplied MinIO binary exists",
            "model_store_minio_binary_src=/nonexistent/minio",
            id="supplied-binary-missing",
        ),
    ],
)
def test_model_store_refuses_bad_input_before_touching_the_host(
    tmp_path, ansible_env, extra_vars, failing_task, named
):
    result = run_role("model_store", tmp_path, ansible_env, {**STORE_CREDENTIALS, **extra_vars})
    assert_refused_before_the_host(result, failing_task, named)
    for secret in ("Zq-shrt", "Zq has spaces"):
        assert secret not in result.stdout, "a credential was printed"


def test_model_store_refuses_missing_credentials(tmp_path, ansible_env):
    result = run_role("model_store", tmp_path, ansible_env, {})
    assert recap(result)["unreachable"] == 0
    assert "Assert the store's credentials are set" in first_failed_task(result)
    assert "farm_store_root_user, farm_store_root_password, farm_store_publisher_access_key" in result.stdout


def test_model_store_refuses_an_architecture_without_a_pinned_checksum(tmp_path, ansible_env):
    """On this machine, in check mode: the architecture comes from its facts."""
    extra = {**STORE_CREDENTIALS, "model_store_minio_sha256": {"riscv64": "0" * 64}}
    result = run_role("model_store", tmp_path, ansible_env, extra, inventory=LOCALHOST, check=True)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert "Assert MinIO's checksum is pinned for this architecture" in first_failed_task(result)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    assert f"set model_store_minio_sha256.{arch} to the checksum" in result.stdout


@pytest.mark.parametrize("backend", ["minio", "moto"])
def test_model_store_good_input_reaches_the_host(tmp_path, ansible_env, backend):
    extra = {**STORE_CREDENTIALS, "model_store_backend": backend}
    result = run_role("model_store", tmp_path, ansible_env, extra)
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
    for secret in ("Root-secret-4c2f9e", "Pub-secret-7d1a0b", "Node-secret-9e3b5c"):
        assert secret not in result.stdout


# -- model_cache: checks before the host ----------------------------------------------------


@pytest.mark.parametrize(
    ("override", "failing_task", "named"),
    [
        pytest.param(
            {"model_cache_models": [{"name": "gemma3-270m", "state": "loaded"}]},
            ARGSPEC,
            "model_cache_models",
            id="unknown-state",
        ),
        pytest.param(
            {"model_cache_models": [{"name": "Gemma3"}]},
            "Assert each declared model has a valid name and version",
            "model_cache_models[0] (Gemma3 latest)",
            id="bad-name",
        ),
        pytest.param(
            {"model_cache_models": [{"name": "gemma3-270m", "version": "1.0"}]},
            "Assert each declared model has a valid name and version",
            "model_cache_models[0] (gemma3-270m 1.0)",
            id="bad-version",
        ),
        pytest.param(
            {"model_cache_models": [{"name": "gemma3-270m"}, {"name": "gemma3-270m", "state": "present"}]},
            "Assert no model is declared twice",
            "declares gemma3-270m more than once",
            id="declared-twice",
        ),
        pytest.param(
            {"farm_store_node_secret_key": ""},
            "Assert the node's store credentials are set",
            "farm_store_node_secret_key must be set",
            id="no-node-secret",
        ),
        pytest.param(
            {"farm_model_signing_public_key": "RWR7LBCesVx4J3wDN6CvBY"},
            "Assert the model signing public key is a minisign public key",
            "farm_model_signing_public_key must hold the content",
            id="not-a-public-key",
        ),
        pytest.param(
            {"model_cache_store_endpoint": None},
            "Assert the store can be found",
            "the inventory group pifarm_storage has no host",
            id="no-store",
        ),
        pytest.param(
            {"model_cache_store_endpoint": "storage1:9000"},
            "Assert the store endpoint is scheme://host:port",
            "storage1:9000 is not scheme://host:port",
            id="endpoint-without-scheme",
        ),
    ],
)
def test_model_cache_refuses_bad_input_before_touching_the_host(
    tmp_path, ansible_env, node_vars, override, failing_task, named
):
    result = run_role("model_cache", tmp_path, ansible_env, {**node_vars, **override})
    assert_refused_before_the_host(result, failing_task, named)
    assert "Node-secret-9e3b5c" not in result.stdout


@pytest.mark.parametrize(
    ("store_a", "endpoint"),
    [
        ("store-a ansible_host=192.0.2.10", "http://192.0.2.10:9100"),
        # The farm's own network wins over the one Ansible connects over, as Prometheus scrapes it.
        ("store-a ansible_host=192.0.2.10 farm_address=10.0.10.5", "http://10.0.10.5:9100"),
    ],
)
def test_model_cache_finds_the_store_in_the_inventory(tmp_path, ansible_env, node_vars, store_a, endpoint):
    """Without an endpoint, the first pifarm_storage host on farm_store_port: the contract's default."""
    inventory = (
        "pifarm-no-such-host ansible_connection=community.docker.docker\n"
        f"[pifarm_storage]\n{store_a}\nstore-b\n"
    )
    extra = {**node_vars, "model_cache_store_endpoint": None, "farm_store_port": 9100}
    # -v shows the fact the role decides.
    verbose = {**ansible_env, "ANSIBLE_VERBOSITY": "1"}
    result = run_role("model_cache", tmp_path, verbose, extra, inventory=inventory)
    counts = recap(result)
    assert counts["failed"] == 0
    assert counts["unreachable"] == 1
    assert endpoint in result.stdout
    assert "Node-secret-9e3b5c" not in result.stdout


def test_model_cache_good_input_reaches_the_host(tmp_path, ansible_env, node_vars):
    result = run_role("model_cache", tmp_path, ansible_env, node_vars)
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
    assert "Node-secret-9e3b5c" not in result.stdout


# -- the store's programs and publish_model.yml against moto on loopback --------------------


def test_store_pins_come_from_pyproject(role_vars):
    pyproject = (REPO / "pyproject.toml").read_text()
    minio_pin, moto_pin = role_vars["pins"]
    assert minio_pin.startswith("minio==")
    assert moto_pin.startswith("moto[server]==")
    assert f'"{minio_pin}"' in pyproject
    assert f'"{moto_pin}"' in pyproject


def test_store_setup_creates_versioned_buckets_once(set_up_store, role_vars):
    root = client_root(set_up_store)
    for bucket in ("models", "artifacts"):
        assert root.get_bucket_versioning(bucket).status == "Enabled"
    rc, again, _ = store_setup(set_up_store, role_vars["policies"])
    assert rc == 0
    assert again["changed"] is False
    assert [u["status"] for u in again["users"]] == [["seeded"], ["seeded"]]


def test_node_key_reads_and_cannot_write_or_delete(set_up_store):
    publisher, node = client(set_up_store, "publisher"), client(set_up_store, "node")
    key = "models/probe/1.0.0/manifest.json"
    publisher.put_object("models", key, io.BytesIO(b"{}"), 2)
    assert node.get_object("models", key).read() == b"{}"
    with pytest.raises(S3Error) as put:
        node.put_object("models", "models/intruder/9.9.9/model.gguf", io.BytesIO(b"x"), 1)
    assert put.value.code == "AccessDenied"
    with pytest.raises(S3Error) as delete:
        node.remove_object("models", key)
    assert delete.value.code == "AccessDenied"
    with pytest.raises(S3Error) as publisher_delete:
        publisher.remove_object("models", key)
    assert publisher_delete.value.code == "AccessDenied"


def test_store_setup_fails_on_wrong_root_secret_without_printing_it(set_up_store, role_vars):
    rc, answer, output = store_setup(set_up_store, role_vars["policies"], secret_key="Wrong-root-secret-0000")
    assert rc == 1
    assert answer["failed"] is True
    assert "not the ones the store runs with" in answer["msg"]
    assert "Wrong-root-secret-0000" not in output


def test_store_setup_fails_when_the_store_does_not_know_a_user(set_up_store, role_vars):
    users = [
        {"access_key": "pifarm-stranger", "secret_key": "Stranger-secret-1", "policy": "pifarm-node-read"}
    ]
    rc, answer, output = store_setup(set_up_store, role_vars["policies"], users=users)
    assert rc == 1
    assert "refuses the keys of the user with policy pifarm-node-read" in answer["msg"]
    assert "Stranger-secret-1" not in output


@pytest.fixture(scope="module")
def publish_setup(set_up_store, keypair, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("publish")
    model = work / "tiny.gguf"
    model.write_bytes(os.urandom(3 * 1024 * 1024))
    secret = keypair.secret_key
    secret.encrypt("Minisign-pass-5b7e")
    (work / "model.key").write_bytes(bytes(secret) + b"\n")
    other = minisign.KeyPair.generate()
    host, port = set_up_store.split(":")
    return {
        "inventory": f"[pifarm_storage]\nstorage1 ansible_host={host}\n",
        "vars": {
            "farm_store_port": int(port),
            "farm_store_publisher_access_key": STORE_CREDENTIALS["farm_store_publisher_access_key"],
            "farm_store_publisher_secret_key": STORE_CREDENTIALS["farm_store_publisher_secret_key"],
            "farm_model_signing_public_key": bytes(keypair.public_key).decode() + "\n",
            "publish_model_agent": str(VENV_BIN / "pifarm-agent"),
            "publish_model_file": str(model),
            "publish_model_name": "tiny",
            "publish_model_version": "1.0.0",
            "publish_model_quantization": "Q4_K_M",
            "publish_model_context_length": 2048,
            "publish_model_memory_required_mb": 64,
            "publish_model_secret_key": str(work / "model.key"),
            "publish_model_secret_key_password": "Minisign-pass-5b7e",
        },
        "other_public_key": bytes(other.public_key).decode() + "\n",
    }


def publish(tmp_path, ansible_env, setup, **override) -> subprocess.CompletedProcess:
    extra = {**setup["vars"], **override}
    return run_playbook(PUBLISH, tmp_path, ansible_env, extra, inventory=setup["inventory"])


def test_publish_uploads_once_and_then_changes_nothing(tmp_path, ansible_env, publish_setup):
    first = publish(tmp_path, ansible_env, publish_setup)
    assert recap(first, "localhost")["changed"] == 1, first.stdout
    assert "model tiny 1.0.0" in first.stdout
    assert " published" in first.stdout
    second = publish(tmp_path, ansible_env, publish_setup)
    assert recap(second, "localhost")["changed"] == 0, second.stdout
    assert recap(second, "localhost")["failed"] == 0
    assert "already published" in second.stdout
    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        for secret in ("Pub-secret-7d1a0b", "Minisign-pass-5b7e"):
            assert secret not in output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param(
            {"publish_model_file": "/nonexistent/model.gguf"},
            "publish_model_file=/nonexistent/model.gguf: no such file",
            id="model-file-missing",
        ),
        pytest.param(
            {"publish_model_agent": "/nonexistent/pifarm-agent"},
            "Install it with `pip install",
            id="agent-missing",
        ),
        pytest.param(
            {"publish_model_secret_key_password": "wrong-password"},
            "decrypt secret key",
            id="wrong-password",
        ),
        pytest.param(
            {"publish_model_version": "1.0.1", "farm_model_signing_public_key": "OTHER"},
            "signature was made by another key than the trusted public key",
            id="key-the-nodes-do-not-trust",
        ),
        pytest.param(
            {"publish_model_version": "1.0.2", "farm_store_publisher_secret_key": "Not-the-publisher-key"},
            "SignatureDoesNotMatch",
            id="wrong-store-secret",
        ),
    ],
)
def test_publish_fails_clearly(tmp_path, ansible_env, publish_setup, override, message):
    if override.get("farm_model_signing_public_key") == "OTHER":
        override = {**override, "farm_model_signing_public_key": publish_setup["other_public_key"]}
    result = publish(tmp_path, ansible_env, publish_setup, **override)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert message in result.stdout
    for secret in ("Pub-secret-7d1a0b", "Minisign-pass-5b7e", "Not-the-publisher-key"):
        assert secret not in result.stdout + result.stderr
