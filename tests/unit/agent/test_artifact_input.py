"""pifarm_agent.artifacts and ``pifarm-agent artifact`` without a store: what is refused before one is asked.

The publish, resolve and fetch paths against a real S3 server are in tests/integration/test_artifacts.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from urllib3.exceptions import ProtocolError

from pifarm_agent.artifacts import ArtifactError, Artifacts
from pifarm_agent.cli import main
from pifarm_agent.store import ModelStore, StoreConfig, TransferInterruptedError

SECRET = "wJalr-artifacts-secret-K7MD"
SHA = "ab" * 32


class UntouchableClient:
    """A minio client that must not be used: the input is refused first."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the store was asked ({name}) before the input was checked")


class CutResponse:
    """An object stream that breaks after its first block, as a dropped connection does."""

    def __init__(self) -> None:
        self.closed = False

    def stream(self, amount: int):
        yield b"x" * amount
        raise ProtocolError("Connection broken: IncompleteRead")

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class CuttingClient:
    def __init__(self) -> None:
        self.response = CutResponse()

    def get_object(self, bucket: str, key: str, offset: int = 0) -> CutResponse:
        return self.response


def store(client) -> ModelStore:
    config = StoreConfig(endpoint="store.farm:9000", bucket="artifacts", access_key="AK", secret_key=SECRET)
    return ModelStore(config, client=client)


@pytest.fixture
def untouched() -> Artifacts:
    return Artifacts(store(UntouchableClient()))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda a: a.resolve("models", name="x"),
            "prefix 'models' is not one of llama.cpp, agent",
            id="prefix",
        ),
        pytest.param(
            lambda a: a.resolve("agent", name="../etc"), "name '../etc' is not", id="name-with-slash"
        ),
        pytest.param(
            lambda a: a.resolve("agent", arch="x86 64"), "arch 'x86 64' is not", id="arch-with-space"
        ),
        pytest.param(lambda a: a.resolve("agent"), "by its name or by an architecture", id="neither"),
        pytest.param(
            lambda a: a.published_sha256("agent", ".hidden"), "name '.hidden' is not", id="dot-name"
        ),
        pytest.param(
            lambda a: a.fetch("agent", "x", Path("/nonexistent/x"), "abc123"),
            "expected sha256 'abc123' is not 64 hex digits",
            id="short-sha256",
        ),
    ],
)
def test_bad_input_is_refused_before_the_store_is_asked(untouched, call, message):
    with pytest.raises(ArtifactError, match=re.escape(message)):
        call(untouched)


def test_publish_refuses_a_file_name_that_is_no_artifact_name(untouched, tmp_path):
    path = tmp_path / "llama.cpp build.zip"
    path.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"the file name must be <name>\.tar\.gz"):
        untouched.publish("llama.cpp", path)


def test_publish_refuses_a_file_its_recorded_sha256_does_not_describe(untouched, tmp_path):
    path = tmp_path / "agent-1.0.tar.gz"
    path.write_bytes(b"rebuilt after its checksum was written")
    (tmp_path / "agent-1.0.tar.gz.sha256").write_text(f"{SHA}  agent-1.0.tar.gz\n")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(
        ArtifactError, match=f"has sha256 {actual}, but .*agent-1.0.tar.gz.sha256 says otherwise"
    ):
        untouched.publish("agent", path)


def test_an_interrupted_fetch_leaves_no_file(tmp_path):
    client = CuttingClient()
    dest = tmp_path / "artifact.tar.gz"
    with pytest.raises(
        TransferInterruptedError,
        match=r"get agent/x\.tar\.gz on store\.farm:9000 bucket artifacts: transfer interrupted",
    ):
        Artifacts(store(client)).fetch("agent", "x", dest, SHA)
    assert client.response.closed
    assert list(tmp_path.iterdir()) == [], "a partial download was left behind"


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {"endpoint": "http://127.0.0.1:9", "bucket": "models", "access_key": "AK", "secret_key": SECRET}
        )
    )
    return path


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["exists", "--prefix", "agent", "--name", "x"], id="no-bucket"),
        pytest.param(["exists", "--bucket", "artifacts", "--name", "x"], id="no-prefix"),
        pytest.param(["resolve", "--bucket", "b", "--prefix", "agent"], id="resolve-without-name-or-arch"),
        pytest.param(
            ["resolve", "--bucket", "b", "--prefix", "agent", "--name", "x", "--arch", "y"], id="both"
        ),
        pytest.param(
            ["fetch", "--bucket", "b", "--prefix", "agent", "--name", "x", "--dest", "d"], id="no-sha256"
        ),
    ],
)
def test_artifact_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["artifact", *argv])
    assert exited.value.code == 64


def test_artifact_failures_exit_1_naming_the_cause_and_never_the_secret(config, tmp_path, capsys):
    tarball = tmp_path / "agent-1.0.tar.gz"
    tarball.write_bytes(b"x")
    common = ["--config", str(config), "--bucket", "artifacts", "--prefix", "agent"]
    code = main(["artifact", "publish", str(tarball), "--info", "[1]", *common, "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert code == 1
    assert answer["status"] == "failed"
    assert answer["command"] == "publish"
    assert answer["message"] == "--info must be a JSON object, got list"
    code = main(
        ["artifact", "fetch", "--name", "x/y", "--dest", str(tmp_path / "d"), "--sha256", SHA, *common]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith("pifarm-agent artifact fetch: error: artifact name 'x/y' is not")
    assert SECRET not in captured.err
