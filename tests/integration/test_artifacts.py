"""``pifarm-agent artifact`` against a real S3 server, run the way the roles run it.

Publish on the builder with the publisher key; resolve, look up and fetch on nodes with the node
key. The store is moto's S3 server on loopback with IAM enforced, seeded with the model_store
role's real users and policies, so the node key's refusal to publish is the role's policy at work.
Each call is the installed console script with the settings, credentials included, on stdin
(``--config /dev/stdin --json``), as runtime_builder and llama_server pass them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import urllib3

# The IAM-enforced store (the set_up_store fixture) and its credentials are the role tests' own,
# from tests/store_fixtures.py: one definition of the users, their policies and the buckets.
from store_fixtures import STORE_CREDENTIALS, run_json

AGENT = Path(sys.executable).parent / "pifarm-agent"
BUCKET = "artifacts"
NAME = "llama.cpp-g0c1e570-x86_64-5b693e48fd98"
INFO = json.dumps({"llama_server_version": "version: 0.5.0-dev"})
EXIT_OK, EXIT_FAILED, EXIT_CHANGED = 0, 1, 2


def settings(endpoint: str, who: str) -> dict:
    """An agent configuration as the roles hand it over; its bucket is the models bucket."""
    return {
        "endpoint": f"http://{endpoint}",
        "bucket": "models",
        "access_key": STORE_CREDENTIALS[f"farm_store_{who}_access_key"],
        "secret_key": STORE_CREDENTIALS[f"farm_store_{who}_secret_key"],
        "secure": False,
    }


def artifact(config: dict, command: str, prefix: str, *args: str) -> tuple[int, dict, str]:
    """Exit code, the JSON answer and everything printed, of one ``pifarm-agent artifact`` call."""
    options = ["--config", "/dev/stdin", "--json", "--bucket", BUCKET, "--prefix", prefix]
    return run_json([str(AGENT), "artifact", command, *options, *args], config)


@pytest.fixture(scope="module")
def published(set_up_store, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("artifacts")
    tarball = work / f"{NAME}.tar.gz"
    tarball.write_bytes(os.urandom(200_000))
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    (work / f"{NAME}.tar.gz.sha256").write_text(f"{digest}  {tarball.name}\n")
    publisher = settings(set_up_store, "publisher")
    node = settings(set_up_store, "node")
    publish = ("publish", "llama.cpp", str(tarball), "--arch", "x86_64", "--info", INFO)
    rc, checked, _output = artifact(publisher, *publish, "--check")
    assert rc == EXIT_CHANGED, checked
    assert checked["changed"] is True
    assert checked["check"] is True
    rc, looked_up, _output = artifact(node, "exists", "llama.cpp", "--name", NAME)
    assert rc == EXIT_OK, looked_up
    assert looked_up["published"] is False, "--check published the artifact"
    rc, first, output = artifact(publisher, *publish)
    assert rc == EXIT_CHANGED, output
    return {"tarball": tarball, "sha256": digest, "publisher": publisher, "node": node, "first": first}


def test_publish_uploads_once_then_changes_nothing(published):
    assert published["first"]["changed"] is True
    assert published["first"]["uploaded"] is True
    assert published["first"]["index"] == "llama.cpp/x86_64.json"
    assert published["first"]["index_changed"] is True
    assert published["first"]["size"] == 200_000
    rc, again, _output = artifact(
        published["publisher"],
        "publish",
        "llama.cpp",
        str(published["tarball"]),
        "--arch",
        "x86_64",
        "--info",
        INFO,
    )
    assert rc == EXIT_OK
    assert again["changed"] is False
    assert again["uploaded"] is False
    assert again["index_changed"] is False


def test_exists_answers_for_published_and_unknown_names(published):
    rc, found, _output = artifact(published["node"], "exists", "llama.cpp", "--name", NAME)
    assert rc == EXIT_OK
    assert found["published"] is True
    assert found["sha256"] == published["sha256"]
    rc, missing, _output = artifact(published["node"], "exists", "agent", "--name", NAME)
    assert rc == EXIT_OK
    assert missing["published"] is False
    assert missing["sha256"] is None


def test_a_published_name_is_immutable(published, tmp_path):
    other = tmp_path / f"{NAME}.tar.gz"
    other.write_bytes(b"another build")
    rc, answer, output = artifact(published["publisher"], "publish", "llama.cpp", str(other))
    assert rc == EXIT_FAILED
    assert answer["status"] == "failed"
    assert f"already published with sha256 {published['sha256']}" in answer["message"]
    assert STORE_CREDENTIALS["farm_store_publisher_secret_key"] not in output


def test_node_resolves_the_index_and_fetches_the_verified_artifact(published, tmp_path):
    rc, resolved, _output = artifact(published["node"], "resolve", "llama.cpp", "--arch", "x86_64")
    assert rc == EXIT_OK
    assert resolved["name"] == NAME
    assert resolved["sha256"] == published["sha256"]
    dest = tmp_path / "artifact.tar.gz"
    rc, fetched, _output = artifact(
        published["node"],
        "fetch",
        "llama.cpp",
        "--name",
        resolved["name"],
        "--dest",
        str(dest),
        "--sha256",
        resolved["sha256"],
    )
    assert rc == EXIT_CHANGED, fetched
    assert fetched["path"] == str(dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == published["sha256"]
    assert sorted(tmp_path.iterdir()) == [dest], "a partial download was left behind"


def test_fetch_refuses_a_sha256_mismatch_naming_both_values(published, tmp_path):
    dest = tmp_path / "artifact.tar.gz"
    pinned = "0" * 64
    rc, answer, _output = artifact(
        published["node"],
        "fetch",
        "llama.cpp",
        "--name",
        NAME,
        "--dest",
        str(dest),
        "--sha256",
        pinned,
    )
    assert rc == EXIT_FAILED
    assert f"has sha256 {published['sha256']}, expected {pinned}" in answer["message"]
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == [], "a partial download was left behind"


def test_node_key_cannot_publish(published):
    rc, answer, output = artifact(published["node"], "publish", "agent", str(published["tarball"]))
    assert rc == EXIT_FAILED
    assert "AccessDenied" in answer["message"]
    assert STORE_CREDENTIALS["farm_store_node_secret_key"] not in output


def test_resolve_names_the_missing_index(published):
    rc, answer, _output = artifact(published["node"], "resolve", "llama.cpp", "--arch", "riscv64")
    assert rc == EXIT_FAILED
    assert "llama.cpp/riscv64.json is missing" in answer["message"]
    assert "run the runtime_builder role" in answer["message"]


def test_signed_downloads_let_a_host_without_credentials_download(published):
    """What model_cache does: the controller signs offline, the node GETs with no key and no agent."""
    node = {**published["node"], "region": "us-east-1"}
    rc, signed, output = artifact(node, "sign-download", "llama.cpp", "--name", NAME)
    assert rc == EXIT_OK, output
    assert signed["key"] == f"llama.cpp/{NAME}.tar.gz"
    assert published["node"]["secret_key"] not in output
    # The signature names the key's id (that is how S3 checks it), so the answer must not redact it.
    assert node["access_key"] in signed["headers"]["Authorization"]
    got = urllib3.request("GET", signed["url"], headers=signed["headers"])
    assert got.status == 200, got.data[:300]
    assert got.data == published["tarball"].read_bytes()
    line = urllib3.request("GET", signed["sha256_url"], headers=signed["sha256_headers"]).data.decode()
    assert line == f"{published['sha256']}  {NAME}.tar.gz\n"
    # Signed for one object: the same headers do not open another.
    assert urllib3.request("GET", signed["sha256_url"], headers=signed["headers"]).status == 403


def test_sign_download_names_an_unpublished_artifact_only_when_used(published):
    node = {**published["node"], "region": "us-east-1"}
    rc, signed, output = artifact(node, "sign-download", "agent", "--name", "pifarm-agent-9.9.9-x86_64")
    assert rc == EXIT_OK, output
    assert urllib3.request("GET", signed["sha256_url"], headers=signed["sha256_headers"]).status == 404


def test_sign_download_needs_the_region_to_sign_offline(published):
    rc, answer, output = artifact(published["node"], "sign-download", "llama.cpp", "--name", NAME)
    assert rc == EXIT_FAILED, output
    assert "the store's region is not set" in answer["message"]
    assert "headers" not in answer
