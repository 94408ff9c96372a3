"""The model_sync module running the real pifarm-agent against moto with the real model.

The module runs in-process (exit_json/fail_json raise, so results are seen before Ansible's own
no_log masking) and starts the agent installed in this venv, as it starts /opt/pifarm/agent/bin/
pifarm-agent on a node. The shared store holds 1.0.0 (the real GGUF) and 1.1.0 (4 KiB longer);
``cache_root`` is a cache where 1.0.0 is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.modules import model_sync
from integration_helpers import (
    ACCESS_KEY,
    BUCKET,
    MODEL_SHA256,
    NAME,
    SECRET_KEY,
    MotoServer,
    agent_config,
    figure,
    manifest_for,
    tree_state,
)
from module_harness import fail_module, patch_module_exits, run_module

AGENT = Path(sys.executable).parent / "pifarm-agent"


@pytest.fixture(autouse=True)
def warnings(monkeypatch) -> list[str]:
    """exit_json and fail_json raise; returns the list module warnings go to."""
    return patch_module_exits(monkeypatch)


@pytest.fixture
def base(moto, store, key_files, cache_root, tmp_path) -> dict:
    """Module options as a play would give them, with an empty agent config file."""
    config = tmp_path / "agent.json"
    config.write_text("{}")
    return {
        "name": NAME,
        "agent": str(AGENT),
        "config": str(config),
        "endpoint": f"http://{moto.endpoint}",
        "bucket": BUCKET,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "public_key": str(key_files["public"]),
        "cache_root": str(cache_root),
    }


def checked(result: dict) -> dict:
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in repr(result)
    return result


def ok(**args) -> dict:
    return checked(run_module(model_sync, **args))


def failed(**args) -> dict:
    return checked(fail_module(model_sync, **args))


def line(version: str, sha256: str) -> str:
    return f"{NAME} {version} {sha256}\n"


def test_check_mode_reports_the_bytes_and_the_switch_and_writes_nothing(base, newer_model, tmp_path):
    base["cache_root"] = str(tmp_path / "empty-cache")
    result = ok(**base, _ansible_check_mode=True, _ansible_diff=True)
    sha = manifest_for(newer_model, "1.1.0").sha256
    assert result["changed"] is True
    assert result["status"] == "changed"
    assert result["would_fetch_bytes"] == newer_model.stat().st_size
    assert result["bytes_fetched"] == 0
    assert (result["active_version"], result["active_sha256"], result["previous_version"]) == (
        "1.1.0",
        sha,
        None,
    )
    assert result["diff"]["before"] == ""
    assert result["diff"]["after"] == line("1.1.0", sha)
    assert not (tmp_path / "empty-cache").exists()


def test_check_mode_counts_a_resumable_partial_download(base, cache_root, newer_model):
    sha = manifest_for(newer_model, "1.1.0").sha256
    size = newer_model.stat().st_size
    with newer_model.open("rb") as source:
        (cache_root / "models" / NAME / f"{sha}.partial").write_bytes(source.read(100_000_000))
    before = tree_state(cache_root)
    result = ok(**base, _ansible_check_mode=True)
    assert result["would_fetch_bytes"] == size - 100_000_000
    assert (result["active_version"], result["previous_version"]) == ("1.1.0", "1.0.0")
    assert tree_state(cache_root) == before


def test_active_switches_to_the_newest_then_is_idempotent(base, newer_model, capsys):
    sha = manifest_for(newer_model, "1.1.0").sha256
    result = ok(**base, _ansible_diff=True)
    assert result["changed"] is True
    assert result["bytes_fetched"] == newer_model.stat().st_size
    assert 0 < result["verify_seconds"] <= result["seconds"]
    assert (result["active_version"], result["active_sha256"], result["previous_version"]) == (
        "1.1.0",
        sha,
        "1.0.0",
    )
    assert result["diff"] == {
        "before": line("1.0.0", MODEL_SHA256),
        "after": line("1.1.0", sha),
        "before_header": f"{NAME} current (before)",
        "after_header": f"{NAME} current (after)",
    }
    again = ok(**base, _ansible_diff=True)
    assert (again["changed"], again["status"], again["bytes_fetched"]) == (False, "unchanged", 0)
    assert again["diff"]["before"] == again["diff"]["after"] == line("1.1.0", sha)
    check = ok(**base, _ansible_check_mode=True)
    assert (check["changed"], check["would_fetch_bytes"]) == (False, 0)
    figure(
        capsys,
        f"module: {result['bytes_fetched']} bytes fetched and verified in {result['seconds']:.1f}s "
        f"(hashing and signatures {result['verify_seconds']:.2f}s); re-run {again['seconds']:.2f}s, 0 bytes",
    )


def test_present_fetches_without_switching_and_active_then_fetches_nothing(base, cache_root, newer_model):
    sha = manifest_for(newer_model, "1.1.0").sha256
    check = ok(**base, version="1.1.0", state="present", _ansible_check_mode=True, _ansible_diff=True)
    assert check["would_fetch_bytes"] == newer_model.stat().st_size
    assert (check["changed"], check["active_version"]) == (True, "1.0.0")
    assert check["diff"]["before"] == check["diff"]["after"] == line("1.0.0", MODEL_SHA256)
    result = ok(**base, version="1.1.0", state="present")
    assert (result["changed"], result["bytes_fetched"]) == (True, newer_model.stat().st_size)
    assert (result["active_version"], result["active_sha256"]) == ("1.0.0", MODEL_SHA256)
    assert (cache_root / "models" / NAME / sha / "model.gguf").is_file()
    assert ok(**base, version="1.1.0", state="present")["changed"] is False
    result = ok(**base, version="1.1.0")
    assert (result["changed"], result["bytes_fetched"], result["active_version"]) == (True, 0, "1.1.0")


def test_keep_current_prefetches_and_keeps_the_current_version(base, cache_root, newer_model, tmp_path):
    sha = manifest_for(newer_model, "1.1.0").sha256
    check = ok(**base, keep_current=True, _ansible_check_mode=True)
    assert (check["kept_current"], check["active_version"], check["target_version"]) == (
        True,
        "1.0.0",
        "1.1.0",
    )
    result = ok(**base, keep_current=True)
    assert (result["changed"], result["kept_current"], result["target_version"]) == (True, True, "1.1.0")
    assert (result["active_version"], result["active_sha256"]) == ("1.0.0", MODEL_SHA256)
    assert (cache_root / "models" / NAME / sha / "model.gguf").is_file()
    # A node with nothing current yet takes the version as its first.
    fresh = ok(**{**base, "cache_root": str(tmp_path / "fresh")}, keep_current=True)
    assert (fresh["kept_current"], fresh["active_version"]) == (False, "1.1.0")


def test_cached_only_switches_back_without_the_store(base, newer_model):
    sha = manifest_for(newer_model, "1.1.0").sha256
    assert ok(**base)["active_version"] == "1.1.0"
    offline = {**base, "endpoint": "http://127.0.0.1:9"}  # nothing listens: the store is down
    refused = failed(**offline, version="1.0.0", cached_only=True)
    assert "older than the active version 1.1.0" in refused["msg"]
    check = ok(**offline, version="1.0.0", cached_only=True, allow_downgrade=True, _ansible_check_mode=True)
    assert (check["changed"], check["active_version"], check["previous_version"]) == (True, "1.0.0", "1.1.0")
    result = ok(**offline, version="1.0.0", cached_only=True, allow_downgrade=True, _ansible_diff=True)
    assert (result["changed"], result["active_version"], result["previous_version"]) == (
        True,
        "1.0.0",
        "1.1.0",
    )
    assert result["diff"]["before"] == line("1.1.0", sha)
    assert result["diff"]["after"] == line("1.0.0", MODEL_SHA256)
    again = ok(**offline, version="1.0.0", cached_only=True, allow_downgrade=True)
    assert again["changed"] is False
    missing = failed(**offline, version="9.9.9", cached_only=True)
    assert "9.9.9" in missing["msg"]
    assert "cached_only makes a named cached version current" in failed(**offline, cached_only=True)["msg"]


def test_an_older_version_needs_allow_downgrade(base):
    assert ok(**base)["active_version"] == "1.1.0"
    result = failed(**base, version="1.0.0")
    assert result["msg"] == (
        f"sync model {NAME}: refusing {NAME} 1.0.0: older than the active version 1.1.0 "
        "(roll back explicitly, or allow a downgrade)"
    )
    assert result["rc"] == 1
    result = ok(**base, version="1.0.0", allow_downgrade=True)
    assert (result["changed"], result["bytes_fetched"], result["active_version"]) == (True, 0, "1.0.0")


def test_absent_removes_a_version_or_the_whole_model_never_the_current_one_alone(base, cache_root):
    result = failed(**base, version="1.0.0", state="absent")
    assert result["msg"].startswith(
        f"remove model {NAME}: refusing to remove model {NAME} 1.0.0: it is the current"
    )
    ok(**base)  # 1.1.0 current, 1.0.0 previous
    before = tree_state(cache_root)
    check = ok(**base, version="1.0.0", state="absent", _ansible_check_mode=True)
    assert (check["changed"], check["removed_versions"], check["previous_version"]) == (True, ["1.0.0"], None)
    assert tree_state(cache_root) == before
    result = ok(**base, version="1.0.0", state="absent", _ansible_diff=True)
    assert (result["changed"], result["removed_versions"], result["previous_version"]) == (
        True,
        ["1.0.0"],
        None,
    )
    assert result["active_version"] == "1.1.0"
    assert result["diff"]["before"] == result["diff"]["after"]
    assert ok(**base, version="1.0.0", state="absent")["changed"] is False

    check = ok(**base, state="absent", _ansible_check_mode=True, _ansible_diff=True)
    assert (check["changed"], check["active_version"], check["diff"]["after"]) == (True, None, "")
    result = ok(**base, state="absent")
    assert (result["changed"], result["removed_versions"], result["active_sha256"]) == (True, ["1.1.0"], None)
    assert not (cache_root / "models" / NAME).exists()
    assert ok(**base, state="absent")["changed"] is False


def test_the_store_settings_can_come_from_the_agent_config(base, moto, key_files, cache_root, tmp_path):
    """As the model_cache role sets it up: the config file has the store, the play the credentials."""
    config = agent_config(
        tmp_path / "role-agent.json",
        moto.endpoint,
        key_files["public"],
        cache_root,
        access_key=None,
        secret_key=None,
    )
    result = ok(name=NAME, agent=str(AGENT), config=str(config), access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    assert (result["changed"], result["active_version"]) == (True, "1.1.0")


def test_bad_credentials_fail_with_the_stores_reason_and_never_show(base, tmp_path):
    server = MotoServer(tmp_path, check_credentials=True).start()
    try:
        wrong = {"access_key": "AKIA-wrong-key-9QZ", "secret_key": "wrong-secret-Pq8rT"}
        result = failed(**{**base, "endpoint": f"http://{server.endpoint}", **wrong})
    finally:
        server.stop()
    assert "InvalidAccessKeyId" in result["msg"]
    assert result["msg"].startswith(f"sync model {NAME}: list models/{NAME}/ on 127.0.0.1:")
    for secret in ("AKIA-wrong-key-9QZ", "wrong-secret-Pq8rT"):
        assert secret not in repr(result)


def test_an_unreachable_store_keeps_the_cached_model_with_a_warning(base, tmp_path, warnings):
    server = MotoServer(tmp_path).start()
    server.stop()
    result = ok(**{**base, "endpoint": f"http://{server.endpoint}"})
    assert (result["changed"], result["status"], result["active_sha256"]) == (
        False,
        "served-from-cache",
        MODEL_SHA256,
    )
    assert len(warnings) == 1
    assert warnings[0].startswith(f"store unreachable, serving cached model {NAME} 1.0.0")
