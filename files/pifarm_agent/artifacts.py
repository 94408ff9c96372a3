"""Runtime artifacts in the store's artifacts bucket: published by the builder, resolved and fetched by nodes.

Layout of the bucket (one prefix per kind, ``llama.cpp`` or ``agent``)::

    <prefix>/<name>.tar.gz            the artifact
    <prefix>/<name>.tar.gz.sha256     its sha256, in ``sha256sum -c`` format
    <prefix>/<arch>.json              the index: the artifact nodes of <arch> install by default

``publish`` uploads the artifact, then its checksum, then the index, so a reader never
finds an index naming a half-published artifact. Names are immutable: a name that is
already published with another sha256 is refused. ``fetch`` downloads to a partial
file, checks its sha256 against the expected value and only then renames it into
place; on a mismatch the partial file is removed and both values are named.

The objects are read and written through ModelStore, the one S3 client of the
collection, pointed at the artifacts bucket: its errors name the operation and the
object, never the credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pifarm_agent.store import ModelStore, StoreNotFoundError, file_sha256

PREFIXES = ("llama.cpp", "agent")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".tar.gz"


class ArtifactError(Exception):
    """The artifact cannot be published, resolved or fetched as asked."""


@dataclass(frozen=True)
class PublishedArtifact:
    name: str
    key: str
    sha256: str
    size: int
    uploaded: bool  # the artifact was not in the store before (with check: would be uploaded)
    index: str | None
    index_changed: bool
    check: bool

    @property
    def changed(self) -> bool:
        return self.uploaded or self.index_changed


@dataclass(frozen=True)
class ResolvedArtifact:
    name: str
    key: str
    sha256: str


@dataclass(frozen=True)
class SignedDownload:
    name: str
    key: str
    url: str
    headers: dict[str, str] = field(repr=False)
    sha256_url: str
    sha256_headers: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class FetchedArtifact:
    name: str
    key: str
    sha256: str
    size: int
    path: Path


def checksum_line(text: str, where: str) -> str:
    """The sha256 of a ``sha256sum`` line."""
    value = text.strip().split(" ", 1)[0].lower()
    if SHA256_RE.fullmatch(value) is None:
        raise ArtifactError(f"{where} holds no sha256: {text.strip()[:80]!r}")
    return value


def artifact_keys(prefix: str, name: str) -> tuple[str, str]:
    """The keys of the artifact and of its checksum."""
    return f"{prefix}/{name}{SUFFIX}", f"{prefix}/{name}{SUFFIX}.sha256"


def index_key(prefix: str, arch: str) -> str:
    return f"{prefix}/{arch}.json"


def _check_prefix(prefix: str) -> None:
    if prefix not in PREFIXES:
        raise ArtifactError(f"artifact prefix {prefix[:80]!r} is not one of {', '.join(PREFIXES)}")


def _check_name(value: str, label: str) -> None:
    # Names and architectures become object keys: no slashes, no dot-dot, no spaces.
    if NAME_RE.fullmatch(value) is None:
        raise ArtifactError(f"artifact {label} {value[:80]!r} is not [A-Za-z0-9][A-Za-z0-9._-]*")


class Artifacts:
    """Publish, resolve and fetch runtime artifacts in the bucket of ``store``."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.where = f"{store.config.endpoint} bucket {store.bucket}"

    def _read(self, key: str) -> bytes | None:
        try:
            return self.store.read_object(key)
        except StoreNotFoundError:
            return None

    def published_sha256(self, prefix: str, name: str) -> str | None:
        """The sha256 ``name`` is published with, or None when it is not published."""
        _check_prefix(prefix)
        _check_name(name, "name")
        _artifact_key, sum_key = artifact_keys(prefix, name)
        raw = self._read(sum_key)
        if raw is None:
            return None
        return checksum_line(raw.decode(errors="replace"), f"{sum_key} on {self.where}")

    def publish(
        self,
        prefix: str,
        path: Path,
        *,
        arch: str | None = None,
        info: dict[str, Any] | None = None,
        check: bool = False,
    ) -> PublishedArtifact:
        """Upload ``<name>.tar.gz`` and its sha256 unless published; point the index of ``arch`` at it.

        With ``check`` nothing is written; the result says what would have been.
        """
        _check_prefix(prefix)
        name = path.name.removesuffix(SUFFIX)
        if not path.name.endswith(SUFFIX) or NAME_RE.fullmatch(name) is None:
            raise ArtifactError(f"artifact {path}: the file name must be <name>{SUFFIX} with a plain name")
        if arch is not None:
            _check_name(arch, "arch")
        local = file_sha256(path)
        recorded = Path(f"{path}.sha256")
        if recorded.is_file() and checksum_line(recorded.read_text(), str(recorded)) != local:
            raise ArtifactError(
                f"artifact {path} has sha256 {local}, but {recorded} says otherwise: rebuild it"
            )
        artifact_key, sum_key = artifact_keys(prefix, name)
        published = self.published_sha256(prefix, name)
        if published is not None and published != local:
            raise ArtifactError(
                f"publish {artifact_key} to {self.where}: already published with sha256 {published}, this "
                f"file has {local}; artifact names are immutable (the builder fetches a published one "
                "instead of rebuilding it)"
            )
        size = path.stat().st_size
        # The index's own fields win over the build's: they say what a node downloads.
        index = {**(info or {}), "name": name, "key": artifact_key, "sha256": local, "size": size}
        index_bytes = (json.dumps(index, sort_keys=True, indent=1) + "\n").encode()
        target = index_key(prefix, arch) if arch else None
        index_changed = target is not None and self._read(target) != index_bytes
        if not check:
            if published is None:
                self.store.upload_file(artifact_key, path)
                self.store.put_bytes(sum_key, f"{local}  {path.name}\n".encode(), "text/plain")
            if target is not None and index_changed:
                self.store.put_bytes(target, index_bytes, "application/json")
        return PublishedArtifact(
            name=name,
            key=artifact_key,
            sha256=local,
            size=size,
            uploaded=published is None,
            index=target,
            index_changed=index_changed,
            check=check,
        )

    def resolve(self, prefix: str, *, name: str | None = None, arch: str | None = None) -> ResolvedArtifact:
        """The artifact to install: ``name``, or the one the index of ``arch`` names."""
        _check_prefix(prefix)
        if (name is None) == (arch is None):
            raise ArtifactError("resolve an artifact by its name or by an architecture, not both or neither")
        if name is None:
            _check_name(arch, "arch")
            key = index_key(prefix, arch)
            raw = self._read(key)
            if raw is None:
                raise ArtifactError(
                    f"no {prefix} artifact for {arch} in {self.where} ({key} is missing): run the "
                    "runtime_builder role on a builder of this architecture first"
                )
            name = self._indexed_name(raw, key)
        sha256 = self.published_sha256(prefix, name)
        artifact_key, _sum_key = artifact_keys(prefix, name)
        if sha256 is None:
            raise ArtifactError(f"artifact {artifact_key} is not published in {self.where}")
        return ResolvedArtifact(name=name, key=artifact_key, sha256=sha256)

    def _indexed_name(self, raw: bytes, key: str) -> str:
        try:
            index = json.loads(raw)
        except ValueError as exc:
            raise ArtifactError(f"{key} on {self.where} is not JSON ({exc})") from None
        name = index.get("name") if isinstance(index, dict) else None
        if not isinstance(name, str):
            raise ArtifactError(f"{key} on {self.where} names no artifact (no string 'name')")
        _check_name(name, f"name in {key}")
        return name

    def sign_download(self, prefix: str, name: str) -> SignedDownload:
        """One signed GET each for ``name`` and its sha256, for a host without credentials or this agent.

        Signed offline: nothing is asked of the store, so an unpublished name is found only
        when the request is made (404).
        """
        _check_prefix(prefix)
        _check_name(name, "name")
        artifact_key, sum_key = artifact_keys(prefix, name)
        url, headers = self.store.signed_get(artifact_key)
        sha256_url, sha256_headers = self.store.signed_get(sum_key)
        return SignedDownload(
            name=name,
            key=artifact_key,
            url=url,
            headers=headers,
            sha256_url=sha256_url,
            sha256_headers=sha256_headers,
        )

    def fetch(self, prefix: str, name: str, dest: Path, expected_sha256: str) -> FetchedArtifact:
        """Download ``name`` to ``dest``, which appears only once its sha256 is the expected one."""
        _check_prefix(prefix)
        _check_name(name, "name")
        expected = expected_sha256.lower()
        if SHA256_RE.fullmatch(expected) is None:
            raise ArtifactError(f"expected sha256 {expected_sha256[:80]!r} is not 64 hex digits")
        artifact_key, _sum_key = artifact_keys(prefix, name)
        partial = dest.with_name(f".{dest.name}.partial")
        digest = hashlib.sha256()
        size = 0
        try:
            with self.store.open_object(artifact_key) as chunks, partial.open("wb") as handle:
                for block in chunks:
                    digest.update(block)
                    handle.write(block)
                    size += len(block)
            actual = digest.hexdigest()
            if actual != expected:
                raise ArtifactError(
                    f"artifact {artifact_key} from {self.where} has sha256 {actual}, expected {expected}: "
                    "refusing it (nothing was unpacked or installed)"
                )
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
        return FetchedArtifact(name=name, key=artifact_key, sha256=actual, size=size, path=dest)
