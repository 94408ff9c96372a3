"""ModelStore against a recording stand-in for the minio client: keys, listing, publish, errors."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from agent_helpers import NAME, blob, signed
from minio.error import S3Error
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError, ReadTimeoutError

from pifarm_agent import store as store_module
from pifarm_agent.store import (
    DEFAULT_PART_SIZE,
    ModelStore,
    StoreConfig,
    StoreError,
    StoreNotFoundError,
    StoreUnreachableError,
    TransferInterruptedError,
    object_key,
    parse_endpoint,
)

ACCESS = "AKIA-farm-node-7Q2"
SECRET = "wJalr-secret-XUtnFEMI-K7MDENG"


def s3_error(code: str, message: str = "S3 said no") -> S3Error:
    return S3Error(None, code, message, "/models/x", "req-1", "host-1", "models")


class FakeResponse:
    def __init__(self, data: bytes, fail_after: int | None = None, failure: Exception | None = None):
        self.data = data
        self.fail_after = fail_after
        self.failure = failure
        self.closed = self.released = False

    def read(self) -> bytes:
        return self.data

    def stream(self, amount: int):
        for start in range(0, len(self.data), amount):
            if self.fail_after is not None and start >= self.fail_after:
                raise self.failure
            yield self.data[start : start + amount]

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        self.released = True


class FakeMinio:
    """The minio.Minio calls ModelStore makes, on a dict of objects; ``fail`` injects exceptions."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.calls: list[tuple] = []
        self.fail: dict[str, Exception] = {}
        self.responses: list[FakeResponse] = []
        self.stream_failure: tuple[int, Exception] | None = None
        self.buckets = {"models"}

    def _call(self, method: str, *args) -> None:
        self.calls.append((method, *args))
        if method in self.fail:
            raise self.fail[method]

    def get_object(self, bucket: str, key: str, offset: int = 0) -> FakeResponse:
        self._call("get_object", bucket, key, offset)
        if key not in self.objects:
            raise s3_error("NoSuchKey", "The specified key does not exist.")
        fail_after, failure = self.stream_failure or (None, None)
        response = FakeResponse(self.objects[key][offset:], fail_after, failure)
        self.responses.append(response)
        return response

    def list_objects(self, bucket: str, prefix: str, recursive: bool = False):
        self._call("list_objects", bucket, prefix, recursive)
        return [SimpleNamespace(object_name=key) for key in sorted(self.objects) if key.startswith(prefix)]

    def fput_object(self, bucket, key, path, part_size, num_parallel_uploads):
        self._call("fput_object", bucket, key, part_size, num_parallel_uploads)
        self.objects[key] = Path(path).read_bytes()

    def put_object(self, bucket, key, data, length, content_type="application/octet-stream"):
        self._call("put_object", bucket, key, length)
        self.objects[key] = data.read(length)
        self.content_types[key] = content_type

    def bucket_exists(self, bucket: str) -> bool:
        self._call("bucket_exists", bucket)
        return bucket in self.buckets

    def make_bucket(self, bucket: str) -> None:
        self._call("make_bucket", bucket)
        self.buckets.add(bucket)


def config(**overrides) -> StoreConfig:
    values = {"endpoint": "store.farm:9000", "bucket": "models", "access_key": ACCESS, "secret_key": SECRET}
    values.update(overrides)
    return StoreConfig(**values)


@pytest.fixture
def client() -> FakeMinio:
    return FakeMinio()


@pytest.fixture
def store(client) -> ModelStore:
    return ModelStore(config(), client=client)


def put_version(client: FakeMinio, artifact, version: str | None = None) -> None:
    version = version or artifact.manifest.version
    client.objects[object_key(NAME, version, "model.gguf")] = artifact.data
    client.objects[object_key(NAME, version, "manifest.json.minisig")] = artifact.signature
    client.objects[object_key(NAME, version, "manifest.json")] = artifact.manifest_bytes


def test_object_keys_follow_the_bucket_layout():
    assert object_key("gemma3-270m", "1.0.0", "model.gguf") == "models/gemma3-270m/1.0.0/model.gguf"
    assert object_key("m", "2.1.0", "manifest.json.minisig") == "models/m/2.1.0/manifest.json.minisig"


def test_versions_are_listed_oldest_first_by_number_and_only_with_a_manifest(store, client):
    for version in ("1.10.0", "1.9.0", "0.1.0", "1.2.0"):
        client.objects[f"models/{NAME}/{version}/manifest.json"] = b"{}"
    client.objects[f"models/{NAME}/3.0.0/model.gguf"] = b"half published: no manifest yet"
    client.objects[f"models/{NAME}/latest/manifest.json"] = b"not a version directory"
    client.objects[f"models/{NAME}/4.0.0/extra/manifest.json"] = b"too deep"
    client.objects["models/tiny-other/9.0.0/manifest.json"] = b"another model"
    assert store.list_versions(NAME) == ["0.1.0", "1.2.0", "1.9.0", "1.10.0"]
    assert store.latest_version(NAME) == "1.10.0"
    assert client.calls[0] == ("list_objects", "models", f"models/{NAME}/", True)
    assert store.list_names() == [NAME, "tiny-other"]


def test_latest_of_an_unpublished_model_is_not_found(store):
    with pytest.raises(StoreNotFoundError, match="no published version of model ghost"):
        store.latest_version("ghost")


def test_the_signed_manifest_and_the_model_are_read_from_their_keys(store, client, keypair):
    artifact = signed(keypair.secret_key, blob(1, 5000))
    put_version(client, artifact)
    assert store.fetch_signed_manifest(NAME, "1.0.0") == (artifact.manifest_bytes, artifact.signature)
    with store.open_model(NAME, "1.0.0", "model.gguf", offset=1000) as chunks:
        data = b"".join(chunks)
    assert data == artifact.data[1000:]
    assert client.calls[-1] == ("get_object", "models", f"models/{NAME}/1.0.0/model.gguf", 1000)
    assert all(r.closed and r.released for r in client.responses)


def test_publish_uploads_model_then_signature_then_manifest(store, client, keypair, tmp_path):
    artifact = signed(keypair.secret_key, blob(2, 5000))
    model = tmp_path / "model.gguf"
    model.write_bytes(artifact.data)
    result = store.publish(model, artifact.manifest_bytes, artifact.signature)
    assert result.status == "published"
    assert result.changed
    uploads = [call for call in client.calls if call[0] in ("fput_object", "put_object")]
    assert [call[2] for call in uploads] == [
        f"models/{NAME}/1.0.0/model.gguf",
        f"models/{NAME}/1.0.0/manifest.json.minisig",
        f"models/{NAME}/1.0.0/manifest.json",
    ]
    # The model goes up in parts of the default size, one part at a time (bounded memory).
    assert uploads[0][3:] == (DEFAULT_PART_SIZE, 1)
    assert client.content_types[f"models/{NAME}/1.0.0/manifest.json"] == "application/json"
    assert client.objects[f"models/{NAME}/1.0.0/model.gguf"] == artifact.data
    assert list(result.keys) == [call[2] for call in uploads]


def test_publish_passes_the_part_size_for_multipart_uploads(store, client, keypair, tmp_path):
    artifact = signed(keypair.secret_key, blob(2, 5000))
    model = tmp_path / "model.gguf"
    model.write_bytes(artifact.data)
    store.publish(model, artifact.manifest_bytes, artifact.signature, part_size=5 * 1024 * 1024)
    assert [call[3] for call in client.calls if call[0] == "fput_object"] == [5 * 1024 * 1024]


def test_publishing_the_same_version_again_is_unchanged_and_uploads_nothing(store, client, keypair, tmp_path):
    artifact = signed(keypair.secret_key, blob(3, 5000))
    model = tmp_path / "model.gguf"
    model.write_bytes(artifact.data)
    store.publish(model, artifact.manifest_bytes, artifact.signature)
    client.calls.clear()
    again = store.publish(model, artifact.manifest_bytes, artifact.signature)
    assert again.status == "unchanged"
    assert not again.changed
    assert [call[0] for call in client.calls] == ["get_object"]


def test_a_published_version_cannot_be_replaced_with_other_content(store, client, keypair, tmp_path):
    first = signed(keypair.secret_key, blob(3, 5000))
    put_version(client, first)
    other = signed(keypair.secret_key, blob(4, 5000))
    model = tmp_path / "model.gguf"
    model.write_bytes(other.data)
    with pytest.raises(StoreError, match=r"1\.0\.0: this version already exists .*versions are immutable"):
        store.publish(model, other.manifest_bytes, other.signature)
    assert client.objects[f"models/{NAME}/1.0.0/model.gguf"] == first.data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(lambda data: data[:-1], "file has 4999 bytes, manifest says 5000"), (bytes.upper, "file sha256 ")],
)
def test_publish_refuses_a_file_that_is_not_the_manifests(store, client, keypair, tmp_path, mutate, message):
    artifact = signed(keypair.secret_key, blob(5, 5000))
    model = tmp_path / "model.gguf"
    model.write_bytes(mutate(artifact.data))
    with pytest.raises(StoreError, match=message):
        store.publish(model, artifact.manifest_bytes, artifact.signature)
    assert client.calls == []


def test_ensure_bucket_creates_only_a_missing_bucket(client):
    assert ModelStore(config(), client=client).ensure_bucket() is False
    assert ModelStore(config(bucket="fresh"), client=client).ensure_bucket() is True
    assert [call[0] for call in client.calls] == ["bucket_exists", "bucket_exists", "make_bucket"]


@pytest.mark.parametrize(
    ("failure", "expected", "text"),
    [
        (s3_error("NoSuchKey"), StoreNotFoundError, "NoSuchKey: S3 said no"),
        (s3_error("NoSuchBucket"), StoreNotFoundError, "NoSuchBucket"),
        (s3_error("AccessDenied", "Access Denied."), StoreError, "AccessDenied: Access Denied."),
        (s3_error("InvalidAccessKeyId"), StoreError, "InvalidAccessKeyId"),
        (MaxRetryError(None, "/models", "Max retries exceeded"), StoreUnreachableError, "store unreachable"),
        (
            NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused"),
            StoreUnreachableError,
            "Connection refused",
        ),
        (ConnectionRefusedError(111, "Connection refused"), StoreUnreachableError, "store unreachable"),
        (socket.gaierror(-2, "Name or service not known"), StoreUnreachableError, "Name or service"),
        (ProtocolError("Connection broken"), TransferInterruptedError, "transfer interrupted"),
        (ReadTimeoutError(None, "/models", "Read timed out."), TransferInterruptedError, "interrupted"),
        (ValueError("invalid header"), StoreError, "ValueError: invalid header"),
    ],
)
def test_client_errors_map_to_store_errors_naming_the_operation(store, client, failure, expected, text):
    client.fail["get_object"] = failure
    with pytest.raises(StoreError) as error:
        store.fetch_signed_manifest(NAME, "1.0.0")
    assert type(error.value) is expected
    assert str(error.value).startswith(
        f"get models/{NAME}/1.0.0/manifest.json on store.farm:9000 bucket models: "
    )
    assert text in str(error.value)


def test_an_interruption_while_streaming_is_a_transfer_interruption(store, client, keypair):
    artifact = signed(keypair.secret_key, blob(6, 5 * 1024 * 1024))
    put_version(client, artifact)
    client.stream_failure = (2 * 1024 * 1024, ProtocolError("Connection broken: IncompleteRead"))
    received = []
    with (
        pytest.raises(
            TransferInterruptedError,
            match=r"model\.gguf from byte 10 on store\.farm:9000 bucket models: transfer interrupted",
        ),
        store.open_model(NAME, "1.0.0", "model.gguf", offset=10) as chunks,
    ):
        received.extend(chunks)
    assert sum(map(len, received)) == 2 * 1024 * 1024
    assert client.responses[-1].closed
    assert client.responses[-1].released


@pytest.mark.parametrize(
    "failure",
    [
        s3_error("SignatureDoesNotMatch", f"The request signature we calculated does not match {SECRET}"),
        MaxRetryError(None, f"/models?X-Amz-Credential={ACCESS}", f"refused for {ACCESS}"),
        OSError(f"cannot open {SECRET}"),
        ValueError(f"bad credentials {ACCESS}:{SECRET}"),
    ],
)
def test_credentials_are_redacted_from_every_error(store, client, failure):
    client.fail["list_objects"] = failure
    with pytest.raises(StoreError) as error:
        store.list_versions(NAME)
    assert SECRET not in str(error.value)
    assert ACCESS not in str(error.value)
    assert "***" in str(error.value)


def test_the_real_client_reports_a_closed_port_as_unreachable_without_credentials():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    store = ModelStore(config(endpoint=f"127.0.0.1:{port}", secure=False, retries=0, connect_timeout=2))
    with pytest.raises(StoreUnreachableError, match=f"on 127.0.0.1:{port} bucket models: store unreachable"):
        store.latest_version(NAME)
    with pytest.raises(StoreUnreachableError) as error:
        store.ensure_bucket()
    assert SECRET not in str(error.value)
    assert ACCESS not in str(error.value)


def test_repr_of_the_store_config_hides_the_credentials():
    shown = repr(config())
    assert SECRET not in shown
    assert ACCESS not in shown
    assert "store.farm:9000" in shown


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://store.farm:9000", ("store.farm:9000", True)),
        ("http://10.0.0.5:9000/", ("10.0.0.5:9000", False)),
        ("store.farm:9000", ("store.farm:9000", None)),
    ],
)
def test_endpoints_with_a_scheme_set_tls(endpoint, expected):
    assert parse_endpoint(endpoint) == expected


def test_the_ca_bundle_is_the_configured_one_else_ssl_cert_file_else_the_system(tmp_path, monkeypatch):
    bundle = tmp_path / "farm-ca.pem"
    bundle.write_text("pem")
    assert store_module._ca_bundle(config(ca_bundle="/etc/pifarm/ca.pem")) == "/etc/pifarm/ca.pem"
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert store_module._ca_bundle(config()) == str(bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "absent.pem"))
    monkeypatch.setattr(store_module, "SYSTEM_CA_BUNDLE", str(tmp_path / "no-system.pem"))
    assert store_module._ca_bundle(config()) == store_module.certifi.where()


def test_signature_and_manifest_go_up_as_single_objects_of_their_size(store, client, keypair, tmp_path):
    artifact = signed(keypair.secret_key, blob(7, 100))
    model = tmp_path / "model.gguf"
    model.write_bytes(artifact.data)
    store.publish(model, artifact.manifest_bytes, artifact.signature)
    sizes = {call[2]: call[3] for call in client.calls if call[0] == "put_object"}
    assert sizes == {
        f"models/{NAME}/1.0.0/manifest.json.minisig": len(artifact.signature),
        f"models/{NAME}/1.0.0/manifest.json": len(artifact.manifest_bytes),
    }
