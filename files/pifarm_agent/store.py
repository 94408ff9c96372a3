"""The model store: an S3 bucket (MinIO in production) reached with the ``minio`` client.

Layout of the bucket::

    models/<name>/<version>/model.gguf            (model.hef for NPU models)
    models/<name>/<version>/manifest.json
    models/<name>/<version>/manifest.json.minisig

``publish`` uploads the model first, then the signature, then the manifest: a
version is listed only once its manifest exists, so readers never see a half
published one. Versions are immutable: republishing a version with different
content is refused.

Errors are StoreError subclasses whose text names the operation and the object,
never the credentials.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import certifi
import urllib3
from minio import Minio
from minio.credentials import Credentials
from minio.error import MinioException, S3Error
from minio.helpers import sha256_hash
from minio.signer import sign_v4_s3
from minio.time import to_amz_date
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

from pifarm_agent.manifest import Manifest, ManifestError, parse_version

PREFIX = "models"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.minisig"
# Parts of 64 MiB: a 238 MB model goes up in 4 parts, a 4 GB one in 64.
DEFAULT_PART_SIZE = 64 * 1024 * 1024
CHUNK = 1024 * 1024
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}


class StoreError(Exception):
    """The store refused or failed an operation."""


class StoreUnreachableError(StoreError):
    """No connection to the store (refused, reset, timed out, DNS)."""


class StoreNotFoundError(StoreError):
    """The bucket, model or version does not exist in the store."""


class TransferInterruptedError(StoreError):
    """A download stopped part way; what arrived is kept for a resume."""


@dataclass(frozen=True)
class StoreConfig:
    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    secure: bool = True
    ca_bundle: str | None = None
    region: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 2


def object_key(name: str, version: str, filename: str) -> str:
    return f"{PREFIX}/{name}/{version}/{filename}"


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _ca_bundle(config: StoreConfig) -> str:
    """The configured bundle, else SSL_CERT_FILE, else the system's (where node_base adds farm CAs)."""
    for candidate in (config.ca_bundle, os.environ.get("SSL_CERT_FILE"), SYSTEM_CA_BUNDLE):
        if candidate and (candidate is config.ca_bundle or Path(candidate).is_file()):
            return candidate
    return certifi.where()


def _http_client(config: StoreConfig) -> urllib3.PoolManager:
    """Short connect timeout and few retries: an unreachable store is reported in seconds."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout),
        maxsize=4,
        cert_reqs="CERT_REQUIRED",
        ca_certs=_ca_bundle(config),
        retries=urllib3.Retry(
            total=config.retries, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504]
        ),
    )


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in CHUNK blocks: what a manifest or an artifact's checksum records."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PublishResult:
    status: str  # "published" or "unchanged"
    manifest: Manifest
    keys: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.status == "published"


class ModelStore:
    """Publish, list and fetch models in one bucket."""

    def __init__(self, config: StoreConfig, client: Minio | None = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self.client = client or Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=_http_client(config),
        )

    # -- error mapping ---------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> StoreError:
        where = f"{action} on {self.config.endpoint} bucket {self.bucket}"
        secrets = (self.config.access_key, self.config.secret_key)
        if isinstance(exc, S3Error):
            text = f"{where}: {exc.code}: {exc.message}"
            cls = StoreNotFoundError if exc.code in NOT_FOUND_CODES else StoreError
            return cls(_redact(text, secrets))
        if isinstance(exc, MaxRetryError | OSError) or (
            isinstance(exc, Urllib3HTTPError) and not isinstance(exc, ProtocolError | ReadTimeoutError)
        ):
            reason = getattr(exc, "reason", None) or exc
            return StoreUnreachableError(_redact(f"{where}: store unreachable: {reason}", secrets))
        if isinstance(exc, ProtocolError | ReadTimeoutError):
            return TransferInterruptedError(_redact(f"{where}: transfer interrupted: {exc}", secrets))
        return StoreError(_redact(f"{where}: {type(exc).__name__}: {exc}", secrets))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except (MinioException, Urllib3HTTPError, OSError, ValueError) as exc:
            raise self._error(action, exc) from None

    # -- reading ---------------------------------------------------------------------

    def _read(self, key: str) -> bytes:
        with self._errors(f"get {key}"):
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def read_object(self, key: str) -> bytes:
        """The whole object (a small one: a manifest, a checksum, an index); StoreNotFoundError if absent."""
        return self._read(key)

    def _keys(self, prefix: str) -> list[str]:
        with self._errors(f"list {prefix}"):
            return [obj.object_name for obj in self.client.list_objects(self.bucket, prefix, recursive=True)]

    def list_names(self) -> list[str]:
        names = {key.split("/")[1] for key in self._keys(f"{PREFIX}/") if key.count("/") == 3}
        return sorted(names)

    def list_versions(self, name: str) -> list[str]:
        """Versions of ``name`` that have a manifest, oldest first."""
        versions = []
        for key in self._keys(f"{PREFIX}/{name}/"):
            parts = key.split("/")
            if len(parts) != 4 or parts[3] != MANIFEST:
                continue
            try:
                versions.append((parse_version(parts[2]), parts[2]))
            except ManifestError:
                continue
        return [version for _key, version in sorted(versions)]

    def latest_version(self, name: str) -> str:
        versions = self.list_versions(name)
        if not versions:
            raise StoreNotFoundError(
                f"list {PREFIX}/{name}/ on {self.config.endpoint} bucket {self.bucket}: "
                f"no published version of model {name}"
            )
        return versions[-1]

    def fetch_signed_manifest(self, name: str, version: str) -> tuple[bytes, bytes]:
        """The manifest bytes and their minisign signature, as published."""
        manifest = self._read(object_key(name, version, MANIFEST))
        signature = self._read(object_key(name, version, SIGNATURE))
        return manifest, signature

    def signed_get(self, key: str) -> tuple[str, dict[str, str]]:
        """The URL of ``key`` and the headers that authorise one GET of it, signed here, offline.

        What a host without credentials or an S3 client needs to download one object. The
        store accepts the signature within its clock-skew window (15 minutes for S3 and MinIO)
        of now. A header signature rather than a presigned URL: the test store (moto, IAM
        enforced) checks only the Authorization header. Without a region the client would ask
        the store for it, so one is required.
        """
        if not self.config.region:
            raise StoreError(f"sign GET {key}: the store's region is not set (MinIO's default is us-east-1)")
        scheme = "https" if self.config.secure else "http"
        url = urlsplit(f"{scheme}://{self.config.endpoint}/{self.bucket}/{quote(key)}")
        date = datetime.now(UTC)
        content_sha256 = sha256_hash(b"")
        headers = sign_v4_s3(
            method="GET",
            url=url,
            region=self.config.region,
            headers={
                "Host": url.netloc,
                "x-amz-content-sha256": content_sha256,
                "x-amz-date": to_amz_date(date),
            },
            credentials=Credentials(self.config.access_key, self.config.secret_key),
            content_sha256=content_sha256,
            date=date,
        )
        # The HTTP client sends Host from the URL itself.
        return urlunsplit(url), {name: str(value) for name, value in headers.items() if name != "Host"}

    @contextmanager
    def open_model(
        self, name: str, version: str, filename: str, offset: int = 0
    ) -> Iterator[Iterator[bytes]]:
        """Stream the model file from ``offset`` (an HTTP range request when > 0)."""
        with self.open_object(object_key(name, version, filename), offset) as chunks:
            yield chunks

    @contextmanager
    def open_object(self, key: str, offset: int = 0) -> Iterator[Iterator[bytes]]:
        """Stream any object from ``offset``; errors while streaming are StoreErrors too."""
        action = f"get {key} from byte {offset}" if offset else f"get {key}"
        with self._errors(action):
            response = self.client.get_object(self.bucket, key, offset=offset)
        try:
            yield self._chunks(response, action)
        finally:
            response.close()
            response.release_conn()

    def _chunks(self, response: urllib3.BaseHTTPResponse, action: str) -> Iterator[bytes]:
        with self._errors(action):
            yield from response.stream(CHUNK)

    # -- writing ---------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket when missing; True when it was created."""
        with self._errors("create bucket"):
            if self.client.bucket_exists(self.bucket):
                return False
            self.client.make_bucket(self.bucket)
            return True

    def publish(
        self,
        model_path: str | Path,
        manifest_bytes: bytes,
        signature_bytes: bytes,
        *,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> PublishResult:
        """Upload model, signature and manifest; 'unchanged' when this exact version is already there."""
        manifest = Manifest.from_json(manifest_bytes)
        model_path = Path(model_path)
        size = model_path.stat().st_size
        if size != manifest.size:
            raise StoreError(f"publish {model_path}: file has {size} bytes, manifest says {manifest.size}")
        digest = file_sha256(model_path)
        if digest != manifest.sha256:
            raise StoreError(f"publish {model_path}: file sha256 {digest}, manifest says {manifest.sha256}")
        keys = tuple(
            object_key(manifest.name, manifest.version, filename)
            for filename in (manifest.model_filename, SIGNATURE, MANIFEST)
        )
        existing = self._existing_manifest(manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 == manifest.sha256:
                return PublishResult("unchanged", existing, keys)
            raise StoreError(
                f"publish {manifest.name} {manifest.version}: this version already exists in bucket "
                f"{self.bucket} with sha256 {existing.sha256}; versions are immutable, publish a new version"
            )
        model_key, signature_key, manifest_key = keys
        self.upload_file(model_key, model_path, part_size=part_size)
        self.put_bytes(signature_key, signature_bytes, "text/plain")
        self.put_bytes(manifest_key, manifest_bytes, "application/json")
        return PublishResult("published", manifest, keys)

    def upload_file(self, key: str, path: str | Path, *, part_size: int = DEFAULT_PART_SIZE) -> None:
        """Upload a file as ``key``, in parts of ``part_size`` one after the other."""
        with self._errors(f"put {key}"):
            self.client.fput_object(self.bucket, key, str(path), part_size=part_size, num_parallel_uploads=1)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Upload a small object from memory."""
        with self._errors(f"put {key}"):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def _existing_manifest(self, name: str, version: str) -> Manifest | None:
        try:
            raw = self._read(object_key(name, version, MANIFEST))
        except StoreNotFoundError:
            return None
        return Manifest.from_json(raw)


def parse_endpoint(endpoint: str) -> tuple[str, bool | None]:
    """``https://host:9000`` -> (``host:9000``, True); a bare ``host:port`` -> (it, None)."""
    match = re.fullmatch(r"(https?)://([^/]+)/?", endpoint)
    if match:
        return match.group(2), match.group(1) == "https"
    return endpoint, None
