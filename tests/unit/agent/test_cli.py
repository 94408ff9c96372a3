"""The pifarm-agent model CLI: config, exit codes, JSON, and credentials kept out of output."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from agent_helpers import NAME, blob, signed
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_verify_repair_fetches_a_corrupt_current_model_again_or_fails(setup, source, keypair, capsys):
    artifact = signed(keypair.secret_key, blob(1))
    source.add(artifact)
    assert run(capsys, "sync", NAME, "--config", str(setup))[0] == 2
    model = Path(json.loads(setup.read_text())["cache_root"]) / "models" / NAME / "current" / "model.gguf"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01  # same size: only the SHA-256 tells
    model.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", NAME, "--config", str(setup))
    assert code == 1
    assert "1 FAILED" in out + err
    assert "sha256 mismatch" in out + err
    source.unreachable = True
    code, out, _ = run(capsys, "verify", NAME, "--repair", "--config", str(setup), "--json")
    payload = json.loads(out)
    assert (code, payload["status"]) == (1, "failed")
    assert "store" in payload["failures"][0]["repair"]
    source.unreachable = False
    code, out, _ = run(capsys, "verify", NAME, "--repair", "--config", str(setup), "--json")
    payload = json.loads(out)
    assert (code, payload["status"], payload["changed"]) == (2, "repaired", True)
    assert model.read_bytes() == artifact.data
    assert run(capsys, "verify", NAME, "--repair", "--config", str(setup))[0] == 0


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


# -- plan, prefetch, --all, remove ------------------------------------------------------------

SYNC_KEYS = {
    "command", "status", "changed", "message", "plan", "name", "version", "sha256", "activate", "switched",
    "current", "previous", "from", "to", "bytes_fetched", "resumed_from", "verify_seconds", "seconds",
}  # fmt: skip
PLAN_KEYS = {
    "command", "status", "changed", "message", "plan", "name", "version", "sha256", "activate", "current",
    "previous", "from", "to", "would_fetch_bytes", "resumed_from", "would_switch", "bytes_fetched",
    "verify_seconds", "seconds",
}  # fmt: skip
REMOVE_KEYS = {
    "command", "status", "changed", "message", "plan", "name", "version", "removed", "removed_partials",
    "removed_links", "from", "current", "previous",
}  # fmt: skip
ENTRY_KEYS = {"name", "version", "sha256", "size", "format", "path"}


def with_models(config, models):
    data = json.loads(config.read_text())
    data["models"] = models
    config.write_text(json.dumps(data))
    return config


def sync_json(capsys, config, *argv):
    code, out, _ = run(capsys, "sync", *argv, "--config", str(config), "--json")
    return code, json.loads(out)


def test_plan_reports_fetch_and_switch_and_writes_nothing(setup, source, keypair, capsys, tmp_path):
    old = signed(keypair.secret_key, blob(1))
    source.add(old)
    code, plan = sync_json(capsys, setup, NAME, "--plan")
    assert code == 2
    assert set(plan) == PLAN_KEYS
    assert plan["plan"] is True
    assert (plan["status"], plan["changed"]) == ("changed", True)
    assert plan["from"] is None
    assert plan["to"] == {"version": "1.0.0", "sha256": old.manifest.sha256}
    assert (plan["would_fetch_bytes"], plan["would_switch"], plan["bytes_fetched"]) == (
        len(old.data),
        True,
        0,
    )
    assert isinstance(plan["verify_seconds"], float)
    assert not (tmp_path / "cache").exists()

    assert sync_json(capsys, setup, NAME)[0] == 2
    new = signed(keypair.secret_key, blob(2, 60_000), version="1.1.0")
    source.add(new)
    code, plan = sync_json(capsys, setup, NAME, "--plan")
    assert code == 2
    assert plan["from"] == {"version": "1.0.0", "sha256": old.manifest.sha256}
    assert plan["to"] == {"version": "1.1.0", "sha256": new.manifest.sha256}
    assert set(plan["current"]) == ENTRY_KEYS
    assert plan["would_fetch_bytes"] == 60_000
    code, plan = sync_json(capsys, setup, NAME, "--plan", "--version", "1.0.0")
    assert (code, plan["status"], plan["would_fetch_bytes"], plan["would_switch"]) == (
        0,
        "unchanged",
        0,
        False,
    )


def test_a_plan_fails_where_the_sync_would(setup, source, other_keypair, capsys):
    source.add(signed(other_keypair.secret_key, blob(1)))
    code, plan = sync_json(capsys, setup, NAME, "--plan")
    assert code == 1
    assert plan["error"]["type"] == "SignatureError"
    assert "another key" in plan["message"]


def test_no_activate_fetches_then_a_sync_switches_without_fetching(setup, source, keypair, capsys):
    artifact = signed(keypair.secret_key, blob(1))
    source.add(artifact)
    code, result = sync_json(capsys, setup, NAME, "--no-activate")
    assert code == 2
    assert set(result) == SYNC_KEYS
    assert (result["activate"], result["switched"], result["current"]) == (False, False, None)
    assert result["bytes_fetched"] == len(artifact.data)
    assert sync_json(capsys, setup, NAME, "--no-activate")[0] == 0
    code, result = sync_json(capsys, setup, NAME)
    assert (code, result["bytes_fetched"], result["switched"]) == (2, 0, True)
    assert result["current"]["sha256"] == artifact.manifest.sha256
    assert (result["from"], result["to"]) == (None, {"version": "1.0.0", "sha256": artifact.manifest.sha256})
    # --json is also accepted before the area, as in ``pifarm-agent --json model sync NAME``.
    code = main(["--json", "model", "sync", NAME, "--config", str(setup)])
    result = json.loads(capsys.readouterr().out)
    assert (code, result["status"]) == (0, "unchanged")
    assert result["from"] == result["to"] == {"version": "1.0.0", "sha256": artifact.manifest.sha256}


def test_sync_all_syncs_each_declared_model_and_carries_on_past_a_failure(
    setup, source, keypair, capsys, tmp_path
):
    first = signed(keypair.secret_key, blob(1), name="alpha")
    second = signed(keypair.secret_key, blob(2), name="beta", version="2.0.0")
    source.add(first)
    source.add(second)
    config = with_models(
        setup,
        [
            {"name": "alpha", "version": "latest"},
            {"name": "ghost", "version": "latest"},
            {"name": "beta", "version": "2.0.0"},
        ],
    )
    code, result = sync_json(capsys, config, "--all")
    assert code == 1
    assert set(result) == {"command", "status", "changed", "message", "plan", "models", "failed"}
    assert (result["status"], result["changed"], result["failed"]) == ("failed", True, ["ghost"])
    by_name = {model["name"]: model for model in result["models"]}
    assert [model["name"] for model in result["models"]] == ["alpha", "ghost", "beta"]
    assert set(by_name["alpha"]) == SYNC_KEYS - {"command"} | {"requested_version", "exit_code"}
    assert (by_name["alpha"]["status"], by_name["alpha"]["exit_code"]) == ("changed", 2)
    assert by_name["beta"]["sha256"] == second.manifest.sha256
    assert by_name["beta"]["requested_version"] == "2.0.0"
    ghost = by_name["ghost"]
    assert (ghost["status"], ghost["exit_code"], ghost["error"]["type"]) == (
        "failed",
        1,
        "StoreNotFoundError",
    )
    assert ghost["requested_version"] == "latest"
    assert (tmp_path / "cache" / "models" / "beta" / "current" / "model.gguf").read_bytes() == second.data

    with_models(config, [{"name": "alpha", "version": "latest"}, {"name": "beta", "version": "2.0.0"}])
    code, result = sync_json(capsys, config, "--all")
    assert (code, result["status"], result["changed"]) == (0, "unchanged", False)
    code, out, _ = run(capsys, "sync", "--all", "--config", str(config))
    assert code == 0
    assert out.splitlines() == [
        f"alpha: model alpha 1.0.0 ({first.manifest.sha256[:12]}) already active",
        f"beta: model beta 2.0.0 ({second.manifest.sha256[:12]}) already active",
    ]


def test_sync_all_prefetches_with_no_activate_and_plans_with_plan(setup, source, keypair, capsys, tmp_path):
    source.add(signed(keypair.secret_key, blob(1), name="alpha"))
    config = with_models(setup, [{"name": "alpha"}])
    code, result = sync_json(capsys, config, "--all", "--plan")
    assert (code, result["plan"], result["models"][0]["would_fetch_bytes"]) == (2, True, 50_000)
    assert not (tmp_path / "cache").exists()
    code, result = sync_json(capsys, config, "--all", "--no-activate")
    assert (code, result["models"][0]["switched"], result["models"][0]["current"]) == (2, False, None)
    assert sync_json(capsys, config, "--all", "--no-activate")[0] == 0
    assert sync_json(capsys, config, "--all", "--plan")[1]["models"][0]["would_switch"] is True


def test_sync_all_without_declared_models_has_nothing_to_do(setup, capsys):
    code, result = sync_json(capsys, setup, "--all")
    assert (code, result["models"], result["status"]) == (0, [], "unchanged")


@pytest.mark.parametrize(
    "argv",
    [["sync"], ["sync", NAME, "--all"], ["sync", "--all", "--version", "1.0.0"], ["remove"]],
)
def test_sync_and_remove_usage_errors_exit_64(argv):
    with pytest.raises(SystemExit) as exited:
        main(["model", *argv])
    assert exited.value.code == 64


def test_remove_a_version_the_whole_model_and_refuse_current(setup, source, keypair, capsys, tmp_path):
    for seed, version in ((1, "1.0.0"), (2, "1.1.0")):
        source.add(signed(keypair.secret_key, blob(seed), version=version))
        assert run(capsys, "sync", NAME, "--config", str(setup))[0] == 2

    def remove(*argv):
        code, out, _ = run(capsys, "remove", NAME, *argv, "--config", str(setup), "--json")
        return code, json.loads(out)

    code, result = remove("--version", "1.1.0")
    assert (code, result["status"], result["error"]["type"]) == (1, "failed", "CacheError")
    assert "it is the current version" in result["message"]
    code, result = remove("--version", "1.0.0", "--plan")
    assert (code, result["plan"], result["removed_links"]) == (2, True, ["previous"])
    assert result["previous"]["version"] == "1.0.0"
    code, result = remove("--version", "1.0.0")
    assert set(result) == REMOVE_KEYS
    assert result["from"]["version"] == "1.1.0"
    assert (code, [e["version"] for e in result["removed"]], result["removed_links"]) == (
        2,
        ["1.0.0"],
        ["previous"],
    )
    assert (result["current"]["version"], result["previous"]) == ("1.1.0", None)
    assert remove("--version", "1.0.0")[0] == 0
    code, result = remove()
    assert (code, result["removed_links"], result["current"]) == (2, ["current"], None)
    assert not (tmp_path / "cache" / "models" / NAME).exists()
    code, result = remove()
    assert (code, result["changed"], result["message"]) == (
        0,
        False,
        f"model {NAME}: nothing cached to remove",
    )


def test_remove_needs_no_public_key_and_no_store(tmp_path, capsys):
    config = tmp_path / "agent.json"
    config.write_text("{}")
    code, out, _ = run(capsys, "remove", NAME, "--cache-root", str(tmp_path / "c"), "--config", str(config))
    assert (code, out.strip()) == (0, f"model {NAME}: nothing cached to remove")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"name": "x"}, "key 'models' must be list"),
        (["gemma"], r"models\[0\] must be an object with keys name and version, got str"),
        ([{"name": "a"}, {"name": "b", "revision": "1"}], r"models\[1\]: unknown key 'revision'"),
        ([{"version": "1.0.0"}], r"models\[0\]\.name: None is not a model name"),
        ([{"name": "Gemma"}], r"models\[0\]\.name: 'Gemma' is not a model name"),
        (
            [{"name": "a", "version": "v1"}],
            r"models\[0\]\.version: 'v1' is not MAJOR\.MINOR\.PATCH .*, or \"latest\"",
        ),
        ([{"name": "a", "version": 1}], r"models\[0\]\.version: must be a string, got int"),
        (
            [{"name": "a"}, {"name": "a", "version": "1.0.0"}],
            r"models\[1\]\.name: model a is already declared at models\[0\]",
        ),
    ],
)
def test_declared_models_are_validated_with_errors_naming_index_and_key(tmp_path, models, message):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_declared_models_default_to_the_latest_version(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"models": [{"name": "a"}, {"name": "b", "version": "1.2.3"}]}))
    assert load_config(str(path)).models == [
        {"name": "a", "version": "latest"},
        {"name": "b", "version": "1.2.3"},
    ]
    path.write_text(json.dumps({"models": None}))
    assert load_config(str(path)).models == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
model_items = st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True)},
    optional={"version": st.sampled_from(["latest", "1.0.0", "2.10.3"]) | st.text(max_size=8)},
)


@settings(max_examples=300, deadline=None)
@given(models=json_values | st.lists(model_items | json_values, max_size=4))
def test_any_models_value_either_loads_or_fails_naming_models(models):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.json"
        path.write_text(json.dumps({"models": models}))
        try:
            loaded, error = load_config(str(path)).models, None
        except ConfigError as exc:
            loaded, error = None, str(exc)
    if error is not None:
        assert "models" in error
        return
    assert isinstance(loaded, list)
    assert all(set(item) == {"name", "version"} for item in loaded)
    assert len({item["name"] for item in loaded}) == len(loaded)
