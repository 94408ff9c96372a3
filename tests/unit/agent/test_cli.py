"""The pifarm-agent model CLI: config, exit codes, JSON, and credentials kept out of output."""

from __future__ import annotations

import json

import pytest
from agent_helpers import NAME, blob, signed

from pifarm_agent import cli
from pifarm_agent.cli import AgentConfig, ConfigError, load_config, main
from pifarm_agent.manifest import Manifest
from pifarm_agent.store import PublishResult

SECRET = "s3cr3t-Value-xyz"


@pytest.fixture
def setup(tmp_path, keypair, source, monkeypatch):
    (tmp_path / "key.pub").write_bytes(bytes(keypair.public_key))
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "endpoint": "store.farm:9000",
                "bucket": "models",
                "access_key": "farm-node",
                "secret_key": SECRET,
                "public_key": str(tmp_path / "key.pub"),
                "cache_root": str(tmp_path / "cache"),
                "reserve_mb": 0,
            }
        )
    )
    monkeypatch.setattr(cli, "ModelStore", lambda store_config: source)
    return config


def run(capsys, *argv):
    code = main(["model", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sync_exit_codes_say_changed_then_nothing_to_do(setup, source, keypair, capsys):
    artifact = signed(keypair.secret_key, blob(1))
    source.add(artifact)
    code, out, _ = run(capsys, "sync", NAME, "--config", str(setup), "--json")
    assert code == 2
    payload = json.loads(out)
    assert payload["command"] == "sync"
    assert payload["status"] == "changed"
    assert payload["changed"] is True
    assert payload["sha256"] == artifact.manifest.sha256
    assert payload["current"]["version"] == "1.0.0"
    assert payload["bytes_fetched"] == len(artifact.data)
    code, out, _ = run(capsys, "sync", NAME, "--config", str(setup))
    assert code == 0
    assert out.strip() == f"model {NAME} 1.0.0 ({artifact.manifest.sha256[:12]}) already active"


def test_failures_exit_1_with_the_reason_and_never_the_secret(setup, source, keypair, capsys):
    artifact = signed(keypair.secret_key, blob(1))
    artifact.data = artifact.data[:-1] + b"!"
    source.add(artifact)
    code, out, err = run(capsys, "sync", NAME, "--config", str(setup), "--json")
    assert code == 1
    payload = json.loads(out)
    assert payload["status"] == "failed"
    assert payload["error"]["type"] == "IntegrityError"
    assert "sha256 mismatch" in payload["message"]
    assert SECRET not in out + err


def test_an_unreachable_store_is_not_a_failure(setup, source, keypair, capsys):
    source.add(signed(keypair.secret_key, blob(1)))
    assert run(capsys, "sync", NAME, "--config", str(setup))[0] == 2
    source.unreachable = True
    code, out, _ = run(capsys, "sync", NAME, "--config", str(setup), "--json")
    assert code == 0
    assert json.loads(out)["status"] == "served-from-cache"


def test_activate_rollback_list_gc_and_verify(setup, source, keypair, capsys):
    for seed, version in ((1, "1.0.0"), (2, "1.1.0"), (3, "1.2.0")):
        source.add(signed(keypair.secret_key, blob(seed), version=version))
        assert run(capsys, "sync", NAME, "--config", str(setup))[0] == 2
    assert run(capsys, "rollback", NAME, "--config", str(setup))[0] == 2
    code, out, _ = run(capsys, "list", "--config", str(setup), "--json")
    rows = {row["version"]: row["role"] for row in json.loads(out)["cache"][NAME]["entries"]}
    assert (code, rows) == (0, {"1.2.0": "previous", "1.1.0": "current", "1.0.0": None})
    code, out, _ = run(capsys, "list", "--config", str(setup))
    assert "* 1.1.0" in out
    assert run(capsys, "activate", NAME, "1.0.0", "--config", str(setup))[0] == 1
    assert run(capsys, "activate", NAME, "1.2.0", "--config", str(setup))[0] == 2
    assert run(capsys, "activate", NAME, "1.2.0", "--config", str(setup))[0] == 0
    assert run(capsys, "verify", NAME, "--all", "--config", str(setup))[0] == 0
    code, out, _ = run(capsys, "gc", "--keep", "2", "--config", str(setup), "--json")
    assert code == 2
    assert [e["version"] for e in json.loads(out)["removed"][NAME]] == ["1.0.0"]
    assert run(capsys, "gc", "--keep", "2", "--config", str(setup))[0] == 0


def test_usage_errors_exit_64_not_the_changed_code(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["model", "sync"])
    assert exited.value.code == 64
    with pytest.raises(SystemExit) as exited:
        main(["model", "frobnicate"])
    assert exited.value.code == 64


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"endpiont": "x"}))
    with pytest.raises(ConfigError, match="unknown key 'endpiont'"):
        load_config(str(path))
    path.write_text(json.dumps({"keep": "3"}))
    with pytest.raises(ConfigError, match="key 'keep' must be int"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.json"))


def test_credentials_come_from_the_environment_and_never_show_in_repr(tmp_path, monkeypatch):
    monkeypatch.setenv("PIFARM_S3_ACCESS_KEY", "env-access")
    monkeypatch.setenv("PIFARM_S3_SECRET_KEY", SECRET)
    monkeypatch.setenv("PIFARM_AGENT_CONFIG", str(tmp_path / "absent.json"))
    config = load_config(None)
    assert (config.access_key, config.secret_key) == ("env-access", SECRET)
    assert SECRET not in repr(config)
    config.endpoint, config.bucket = "https://store.farm:9000", "models"
    store_config = config.store_config()
    assert (store_config.endpoint, store_config.secure) == ("store.farm:9000", True)
    assert SECRET not in repr(store_config)
    with pytest.raises(ConfigError, match="store settings missing: bucket"):
        AgentConfig(endpoint="x", access_key="a", secret_key="b").store_config()


def test_publish_signs_and_uploads(tmp_path, keypair, capsys, monkeypatch, setup):
    uploads = []

    class RecordingStore:
        def publish(self, path, manifest_bytes, signature_bytes, part_size):
            uploads.append((path, manifest_bytes, signature_bytes, part_size))
            return PublishResult("published", Manifest.from_json(manifest_bytes), ("k",))

    monkeypatch.setattr(cli, "ModelStore", lambda store_config: RecordingStore())
    (tmp_path / "key.sec").write_bytes(bytes(keypair.secret_key))
    model = tmp_path / "m.gguf"
    model.write_bytes(blob(5))
    code, out, _ = run(
        capsys, "publish", str(model), "--name", NAME, "--version", "2.0.0", "--quantization", "Q8_0",
        "--context-length", "4096", "--memory-required-mb", "300", "--secret-key", str(tmp_path / "key.sec"),
        "--config", str(setup), "--json",
    )  # fmt: skip
    assert code == 2, out
    manifest = json.loads(out)["manifest"]
    assert (manifest["version"], manifest["size"], manifest["quantization"]) == (
        "2.0.0",
        len(blob(5)),
        "Q8_0",
    )
    assert uploads[0][3] == 64 * 1024 * 1024
    assert b"pifarm-model name=tiny version=2.0.0" in uploads[0][2]
