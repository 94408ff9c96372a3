"""model_sync: the command line it builds, where credentials go, and how agent exits map to results.

These run without a store: against a recording stand-in for pifarm-agent (to see the exact argv
and environment) and against the real agent on an empty cache. The module against the real agent
and a real S3 server is in tests/integration/test_model_sync_module.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.modules import model_sync
from module_harness import ModuleFailError, fail_module, module_result, run_module

AGENT = Path(sys.executable).parent / "pifarm-agent"
ACCESS = "AKIA-node-ro-5XQ"
SECRET = "node-secret-wJalrXUtnFEMI"
SHA_OLD = "a" * 64
SHA_NEW = "b" * 64


def entry(version: str, sha256: str) -> dict:
    return {
        "name": "gemma3-270m",
        "version": version,
        "sha256": sha256,
        "size": 100,
        "format": "gguf",
        "path": f"/var/lib/pifarm/models/gemma3-270m/{sha256}/model.gguf",
    }


class StandIn:
    """pifarm-agent: records its argv and credential variables, prints a canned result, exits rc."""

    def __init__(self, directory: Path, payload: dict | str, rc: int, stderr: str = ""):
        self.path = directory / "pifarm-agent"
        self.argv_log = directory / "argv.json"
        self.env_log = directory / "env.json"
        output = payload if isinstance(payload, str) else json.dumps(payload)
        (directory / "stdout").write_text(output)
        (directory / "stderr").write_text(stderr)
        self.path.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"json.dump(sys.argv[1:], open({str(self.argv_log)!r}, 'w'))\n"
            "names = ('PIFARM_S3_ACCESS_KEY', 'PIFARM_S3_SECRET_KEY', 'LC_ALL')\n"
            f"json.dump({{n: os.environ.get(n) for n in names}}, open({str(self.env_log)!r}, 'w'))\n"
            f"sys.stdout.write(open({str(directory / 'stdout')!r}).read())\n"
            f"sys.stderr.write(open({str(directory / 'stderr')!r}).read())\n"
            f"sys.exit({rc})\n"
        )
        self.path.chmod(0o755)

    @property
    def argv(self) -> list[str]:
        return json.loads(self.argv_log.read_text())

    @property
    def env(self) -> dict:
        return json.loads(self.env_log.read_text())


SYNCED = {
    "command": "sync",
    "status": "changed",
    "changed": True,
    "message": f"model gemma3-270m 1.1.0 ({SHA_NEW[:12]}) activated",
    "plan": False,
    "name": "gemma3-270m",
    "version": "1.1.0",
    "sha256": SHA_NEW,
    "activate": True,
    "switched": True,
    "current": entry("1.1.0", SHA_NEW),
    "previous": entry("1.0.0", SHA_OLD),
    "from": {"version": "1.0.0", "sha256": SHA_OLD},
    "to": {"version": "1.1.0", "sha256": SHA_NEW},
    "bytes_fetched": 4096,
    "resumed_from": 0,
    "verify_seconds": 0.012,
    "seconds": 0.5,
}


def test_a_missing_agent_says_how_to_install_it(tmp_path):
    result = fail_module(model_sync, name="gemma3-270m", agent=str(tmp_path / "bin" / "pifarm-agent"))
    assert result["msg"] == (
        f"pifarm-agent {tmp_path}/bin/pifarm-agent not found: install the agent with the model_cache role "
        "(pifarm.inference.model_cache), or set agent"
    )


def test_an_agent_that_is_not_executable_is_named(tmp_path):
    agent = tmp_path / "pifarm-agent"
    agent.write_text("not a program")
    result = fail_module(model_sync, name="gemma3-270m", agent=str(agent))
    assert result["msg"].startswith(f"pifarm-agent {agent} is not executable: install the agent")


def test_active_runs_sync_with_the_store_flags_and_credentials_only_in_the_environment(tmp_path):
    stand_in = StandIn(tmp_path, SYNCED, 2)
    result = run_module(
        model_sync,
        name="gemma3-270m",
        version="1.1.0",
        agent=str(stand_in.path),
        config="/etc/pifarm/agent.json",
        endpoint="http://storage1:9000",
        bucket="models",
        access_key=ACCESS,
        secret_key=SECRET,
        public_key="/etc/pifarm/model-signing.pub",
        cache_root="/var/lib/pifarm",
    )
    assert stand_in.argv == [
        "model", "sync", "gemma3-270m", "--json", "--version", "1.1.0",
        "--config", "/etc/pifarm/agent.json", "--cache-root", "/var/lib/pifarm",
        "--endpoint", "http://storage1:9000", "--bucket", "models",
        "--public-key", "/etc/pifarm/model-signing.pub",
    ]  # fmt: skip
    assert stand_in.env == {"PIFARM_S3_ACCESS_KEY": ACCESS, "PIFARM_S3_SECRET_KEY": SECRET, "LC_ALL": "C"}
    assert result == {
        "changed": True,
        "status": "changed",
        "message": SYNCED["message"],
        "bytes_fetched": 4096,
        "verify_seconds": 0.012,
        "seconds": 0.5,
        "active_version": "1.1.0",
        "active_sha256": SHA_NEW,
        "previous_version": "1.0.0",
        "target_version": SYNCED["version"],
        "kept_current": False,
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, ["model", "sync", "gemma3-270m", "--json"]),
        ({"state": "present"}, ["model", "sync", "gemma3-270m", "--json", "--no-activate"]),
        ({"allow_downgrade": True}, ["model", "sync", "gemma3-270m", "--json", "--allow-downgrade"]),
        ({"_ansible_check_mode": True}, ["model", "sync", "gemma3-270m", "--json", "--plan"]),
        ({"state": "absent"}, ["model", "remove", "gemma3-270m", "--json"]),
        (
            {"state": "absent", "version": "1.0.0", "endpoint": "s:9000", "cache_root": "/srv/c"},
            ["model", "remove", "gemma3-270m", "--json", "--version", "1.0.0", "--cache-root", "/srv/c"],
        ),
        (
            {"state": "absent", "_ansible_check_mode": True},
            ["model", "remove", "gemma3-270m", "--json", "--plan"],
        ),
    ],
)
def test_the_command_line_for_each_state(tmp_path, args, expected):
    payload = {**SYNCED, "status": "unchanged", "changed": False, "removed": [], "removed_links": []}
    stand_in = StandIn(tmp_path, payload, 0)
    run_module(model_sync, name="gemma3-270m", agent=str(stand_in.path), **args)
    assert stand_in.argv == expected
    # Nothing set, nothing passed: the agent falls back to its config file.
    assert stand_in.env == {"PIFARM_S3_ACCESS_KEY": None, "PIFARM_S3_SECRET_KEY": None, "LC_ALL": "C"}


def test_an_agent_failure_fails_with_its_message(tmp_path):
    payload = {
        "command": "sync",
        "status": "failed",
        "changed": False,
        "message": "model gemma3-270m 1.1.0: sha256 mismatch: downloaded 00ff, the signed manifest says b0b0",
        "error": {"type": "IntegrityError", "message": "..."},
    }
    stand_in = StandIn(tmp_path, payload, 1, stderr="model gemma3-270m 1.1.0: fetched 0.1 MB\n")
    result = fail_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))
    assert result["msg"] == f"sync model gemma3-270m: {payload['message']}"
    assert result["rc"] == 1
    assert result["error"]["type"] == "IntegrityError"


def test_a_usage_error_is_reported_as_a_bug_not_as_a_change(tmp_path):
    stand_in = StandIn(
        tmp_path, "", 64, stderr="usage: ...\npifarm-agent: error: unrecognized arguments: --x\n"
    )
    result = fail_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))
    assert result["rc"] == 64
    assert (
        "refused the command line the module built (exit 64): pifarm-agent: error: unrecognized"
        in result["msg"]
    )
    assert "a bug in model_sync" in result["msg"]


@pytest.mark.parametrize(("stdout", "rc"), [("Traceback (most recent call last):\n", 1), ("[]", 0), ("", 2)])
def test_output_that_is_not_a_json_result_fails(tmp_path, stdout, rc):
    stand_in = StandIn(tmp_path, stdout, rc)
    result = fail_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))
    assert (
        result["msg"]
        == f"sync model gemma3-270m: pifarm-agent {stand_in.path} printed no JSON result (exit {rc})"
    )


def test_an_exit_code_the_agent_does_not_use_fails(tmp_path):
    stand_in = StandIn(tmp_path, SYNCED, 3)
    result = fail_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))
    assert result["msg"].endswith("ended with exit 3, which it does not use")


def test_served_from_cache_is_ok_with_a_warning(tmp_path, module_exits):
    payload = {
        **SYNCED,
        "status": "served-from-cache",
        "changed": False,
        "message": "store unreachable, serving cached model gemma3-270m 1.0.0 (aaaaaaaaaaaa): refused",
        "current": entry("1.0.0", SHA_OLD),
        "previous": None,
        "bytes_fetched": 0,
    }
    stand_in = StandIn(tmp_path, payload, 0)
    result = run_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))
    assert (result["changed"], result["status"], result["active_version"]) == (
        False,
        "served-from-cache",
        "1.0.0",
    )
    assert module_exits == [payload["message"]]


def test_the_diff_shows_the_current_model_before_and_after(tmp_path):
    stand_in = StandIn(tmp_path, SYNCED, 2)
    result = run_module(model_sync, name="gemma3-270m", agent=str(stand_in.path), _ansible_diff=True)
    assert result["diff"] == {
        "before": f"gemma3-270m 1.0.0 {SHA_OLD}\n",
        "after": f"gemma3-270m 1.1.0 {SHA_NEW}\n",
        "before_header": "gemma3-270m current (before)",
        "after_header": "gemma3-270m current (after)",
    }
    assert "diff" not in run_module(model_sync, name="gemma3-270m", agent=str(stand_in.path))


def test_real_agent_absent_on_an_empty_cache_is_unchanged_and_creates_nothing(tmp_path):
    cache = tmp_path / "cache"
    result = run_module(
        model_sync, name="gemma3-270m", state="absent", agent=str(AGENT), cache_root=str(cache)
    )
    assert result == {
        "changed": False,
        "status": "unchanged",
        "message": "model gemma3-270m: nothing cached to remove",
        "bytes_fetched": 0,
        "verify_seconds": 0.0,
        "seconds": 0.0,
        "active_version": None,
        "active_sha256": None,
        "previous_version": None,
        "removed_versions": [],
    }
    assert not cache.exists()


def test_real_agent_refuses_a_bad_version_with_its_reason(tmp_path):
    result = module_result(
        model_sync,
        ModuleFailError,
        {
            "name": "gemma3-270m",
            "version": "v2",
            "state": "absent",
            "agent": str(AGENT),
            "cache_root": str(tmp_path),
        },
    )
    assert result["msg"] == (
        "remove model gemma3-270m: manifest field 'version': 'v2' is not MAJOR.MINOR.PATCH "
        "(decimal, no leading zeros)"
    )
    assert result["rc"] == 1


def test_real_agent_sync_without_store_settings_names_what_is_missing(tmp_path):
    key = tmp_path / "key.pub"
    key.write_text(
        "untrusted comment: minisign public key 0\nRWQO8mQ0yOj88YxwAggRZNd0He1APvXa9p58I1ci/m1me3mFZMCkTHoC\n"
    )
    config = tmp_path / "agent.json"
    config.write_text("{}")
    result = fail_module(
        model_sync,
        name="gemma3-270m",
        agent=str(AGENT),
        config=str(config),
        public_key=str(key),
        cache_root=str(tmp_path / "cache"),
        secret_key=SECRET,
    )
    assert result["msg"].startswith(
        "sync model gemma3-270m: store settings missing: endpoint, bucket, access_key"
    )
    assert SECRET not in repr(result)
