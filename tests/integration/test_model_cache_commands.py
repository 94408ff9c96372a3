"""``model sync --plan``, ``--no-activate``, ``--all`` and ``model remove`` against moto with the real model.

The shared store holds the real Gemma 3 270M GGUF as 1.0.0 and a 4 KiB longer artifact as 1.1.0;
``cache_root`` is a clone of a cache where 1.0.0 is current.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import minisign
import pytest
from integration_helpers import (
    ACCESS_KEY,
    MODEL_SHA256,
    NAME,
    SECRET_KEY,
    MotoServer,
    agent_config,
    figure,
    manifest_for,
    store_config,
    tree_state,
)
from minio.commonconfig import CopySource

from pifarm_agent.cli import main
from pifarm_agent.signing import sign_manifest
from pifarm_agent.store import ModelStore, object_key

AGENT = Path(sys.executable).parent / "pifarm-agent"


def agent(capsys, config: Path, *argv: str) -> tuple[int, dict]:
    code = main(["model", *argv, "--config", str(config), "--json"])
    captured = capsys.readouterr()
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in captured.out + captured.err
    return code, json.loads(captured.out)


@pytest.fixture
def config(moto, store, key_files, cache_root, tmp_path) -> Path:
    return agent_config(tmp_path / "agent.json", moto.endpoint, key_files["public"], cache_root)


def newer_sha(newer_model: Path) -> str:
    return manifest_for(newer_model, "1.1.0").sha256


def test_a_plan_on_an_empty_node_counts_the_real_model_and_writes_nothing(
    moto, store, key_files, tmp_path, test_model, newer_model, capsys
):
    root = tmp_path / "empty-cache"
    config = agent_config(tmp_path / "agent.json", moto.endpoint, key_files["public"], root)
    code, plan = agent(capsys, config, "sync", NAME, "--plan")
    assert code == 2
    assert plan["would_fetch_bytes"] == newer_model.stat().st_size
    assert (plan["from"], plan["to"]) == (None, {"version": "1.1.0", "sha256": newer_sha(newer_model)})
    assert plan["would_switch"] is True
    code, plan = agent(capsys, config, "sync", NAME, "--plan", "--version", "1.0.0")
    assert (code, plan["would_fetch_bytes"]) == (2, test_model.stat().st_size)
    assert plan["to"] == {"version": "1.0.0", "sha256": MODEL_SHA256}
    assert not root.exists()
    code, result = agent(capsys, config, "sync", NAME, "--version", "1.0.0")
    assert (code, result["bytes_fetched"]) == (2, plan["would_fetch_bytes"])
    figure(capsys, f"plan said {plan['would_fetch_bytes']} bytes, the sync fetched {result['bytes_fetched']}")


def test_a_plan_counts_a_half_download_and_the_sync_fetches_exactly_that(
    config, cache_root, newer_model, capsys
):
    size = newer_model.stat().st_size
    partial = cache_root / "models" / NAME / f"{newer_sha(newer_model)}.partial"
    with newer_model.open("rb") as source, partial.open("wb") as out:
        out.write(source.read(size // 2))
    before = tree_state(cache_root)
    code, plan = agent(capsys, config, "sync", NAME, "--plan")
    assert tree_state(cache_root) == before
    assert (code, plan["resumed_from"], plan["would_fetch_bytes"]) == (2, size // 2, size - size // 2)
    assert plan["from"] == {"version": "1.0.0", "sha256": MODEL_SHA256}
    code, result = agent(capsys, config, "sync", NAME)
    assert (code, result["resumed_from"], result["bytes_fetched"]) == (
        2,
        size // 2,
        plan["would_fetch_bytes"],
    )
    assert result["to"]["sha256"] == newer_sha(newer_model)


def test_a_plan_refuses_a_signature_by_another_key_like_the_sync(
    moto, store, key_files, cache_root, newer_model, tmp_path, capsys
):
    target = ModelStore(store_config(moto.endpoint, bucket=f"b-{uuid.uuid4().hex[:12]}"))
    target.ensure_bucket()
    for filename in ("model.gguf", "manifest.json"):
        key = object_key(NAME, "1.1.0", filename)
        target.client.copy_object(target.bucket, key, CopySource(store.bucket, key))
    forged = sign_manifest(
        manifest_for(newer_model, "1.1.0").to_json(), minisign.KeyPair.generate().secret_key
    )
    target.client.put_object(
        target.bucket, object_key(NAME, "1.1.0", "manifest.json.minisig"), io.BytesIO(forged), len(forged)
    )
    config = agent_config(
        tmp_path / "agent.json", moto.endpoint, key_files["public"], cache_root, bucket=target.bucket
    )
    before = tree_state(cache_root)
    code, plan = agent(capsys, config, "sync", NAME, "--plan")
    assert (code, plan["error"]["type"]) == (1, "SignatureError")
    assert tree_state(cache_root) == before
    code, result = agent(capsys, config, "sync", NAME)
    assert (code, result["message"]) == (1, plan["message"])
    assert "another key" in plan["message"]


def test_a_plan_with_the_store_stopped_says_served_from_cache(key_files, cache_root, tmp_path, capsys):
    server = MotoServer(tmp_path).start()
    server.stop()
    config = agent_config(tmp_path / "agent.json", server.endpoint, key_files["public"], cache_root)
    code, plan = agent(capsys, config, "sync", NAME, "--plan")
    assert (code, plan["status"], plan["would_switch"]) == (0, "served-from-cache", False)
    assert plan["to"] == plan["from"] == {"version": "1.0.0", "sha256": MODEL_SHA256}


def test_no_activate_prefetches_and_the_later_switch_fetches_nothing(config, cache_root, newer_model, capsys):
    started = time.monotonic()
    code, result = agent(capsys, config, "sync", NAME, "--no-activate")
    prefetch_seconds = time.monotonic() - started
    assert (code, result["switched"], result["bytes_fetched"]) == (2, False, newer_model.stat().st_size)
    assert result["current"]["sha256"] == MODEL_SHA256
    assert os.readlink(cache_root / "models" / NAME / "current") == MODEL_SHA256
    assert agent(capsys, config, "sync", NAME, "--no-activate")[0] == 0
    started = time.monotonic()
    code, result = agent(capsys, config, "sync", NAME)
    switch_seconds = time.monotonic() - started
    assert (code, result["switched"], result["bytes_fetched"]) == (2, True, 0)
    assert result["current"]["version"] == "1.1.0"
    assert result["previous"]["sha256"] == MODEL_SHA256
    figure(
        capsys,
        f"prefetch {prefetch_seconds:.1f}s, then the switch {switch_seconds:.2f}s with 0 bytes fetched",
    )


def test_remove_refuses_current_drops_previous_and_clears_a_whole_model(config, cache_root, capsys):
    assert agent(capsys, config, "sync", NAME)[0] == 2
    code, result = agent(capsys, config, "remove", NAME, "--version", "1.1.0")
    assert (code, result["error"]["type"]) == (1, "CacheError")
    assert "it is the current version" in result["message"]
    code, result = agent(capsys, config, "remove", NAME, "--version", "1.0.0")
    assert (code, result["removed_links"], result["previous"]) == (2, ["previous"], None)
    assert not (cache_root / "models" / NAME / MODEL_SHA256).exists()
    code, result = agent(capsys, config, "remove", NAME, "--plan")
    assert (code, [e["version"] for e in result["removed"]], result["removed_links"]) == (
        2,
        ["1.1.0"],
        ["current"],
    )
    assert (cache_root / "models" / NAME / "current").is_symlink()
    code, result = agent(capsys, config, "remove", NAME)
    assert (code, result["current"]) == (2, None)
    assert not (cache_root / "models" / NAME).exists()
    assert agent(capsys, config, "remove", NAME)[0] == 0


def test_sync_all_prefetches_and_activates_the_declared_models_past_a_failure(
    moto, store, key_files, tmp_path, newer_model, capsys
):
    root = tmp_path / "cache"
    config = agent_config(
        tmp_path / "agent.json",
        moto.endpoint,
        key_files["public"],
        root,
        models=[{"name": NAME, "version": "1.0.0"}, {"name": "not-published", "version": "latest"}],
    )
    code, result = agent(capsys, config, "sync", "--all")
    assert (code, result["failed"]) == (1, ["not-published"])
    good, bad = result["models"]
    assert (good["status"], good["sha256"], good["requested_version"]) == ("changed", MODEL_SHA256, "1.0.0")
    assert bad["error"]["type"] == "StoreNotFoundError"
    assert "no published version of model not-published" in bad["message"]

    agent_config(
        config, moto.endpoint, key_files["public"], root, models=[{"name": NAME, "version": "latest"}]
    )
    code, result = agent(capsys, config, "sync", "--all", "--plan")
    assert (code, result["models"][0]["would_fetch_bytes"]) == (2, newer_model.stat().st_size)
    code, result = agent(capsys, config, "sync", "--all", "--no-activate")
    assert (code, result["models"][0]["current"]["version"]) == (2, "1.0.0")
    # The binary as the sync timer runs it, credentials from the environment only.
    agent_config(
        config,
        moto.endpoint,
        key_files["public"],
        root,
        models=[{"name": NAME}],
        access_key=None,
        secret_key=None,
    )
    env = dict(os.environ, PIFARM_S3_ACCESS_KEY=ACCESS_KEY, PIFARM_S3_SECRET_KEY=SECRET_KEY)
    run = subprocess.run(
        [str(AGENT), "--json", "model", "sync", "--all", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    result = json.loads(run.stdout)
    assert (result["models"][0]["bytes_fetched"], result["models"][0]["switched"]) == (0, True)
    assert result["models"][0]["to"]["version"] == "1.1.0"
    assert SECRET_KEY not in run.stdout + run.stderr
    again = subprocess.run(
        [str(AGENT), "model", "sync", "--all", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{NAME}: model {NAME} 1.1.0 (")
    assert again.stdout.rstrip().endswith("already active")
