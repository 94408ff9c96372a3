"""Signed artifacts and an in-memory model source for the agent's unit tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import minisign
from prometheus_client.parser import text_string_to_metric_families

from pifarm_agent.manifest import Manifest
from pifarm_agent.signing import sign_manifest
from pifarm_agent.store import StoreNotFoundError, StoreUnreachableError, TransferInterruptedError

NAME = "tiny"


def make_manifest(data: bytes, name: str = NAME, version: str = "1.0.0", **overrides) -> Manifest:
    fields = {
        "name": name,
        "version": version,
        "format": "gguf",
        "quantization": "Q4_K_M",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "context_length": 2048,
        "memory_required_mb": 64,
        "npu_required": False,
        "created": "2026-03-01T12:00:00Z",
    }
    fields.update(overrides)
    return Manifest(**fields)


@dataclass
class Artifact:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    data: bytes


def signed(secret_key: minisign.SecretKey, data: bytes, version: str = "1.0.0", name: str = NAME) -> Artifact:
    manifest = make_manifest(data, name=name, version=version)
    raw = manifest.to_json()
    return Artifact(manifest, raw, sign_manifest(raw, secret_key), data)


@dataclass
class FakeSource:
    """An in-memory store: what the cache sees through ModelSource, with faults to inject."""

    artifacts: dict[tuple[str, str], Artifact] = field(default_factory=dict)
    unreachable: bool = False
    cut_after: int | None = None  # end the next stream with TransferInterruptedError after N bytes
    chunk: int = 4096
    offsets: list[int] = field(default_factory=list)
    sent: int = 0

    def add(self, artifact: Artifact, *, at_version: str | None = None) -> None:
        name, version = artifact.manifest.name, at_version or artifact.manifest.version
        self.artifacts[(name, version)] = artifact

    def latest_version(self, name: str) -> str:
        if self.unreachable:
            raise StoreUnreachableError("fake store: connection refused")
        versions = [v for (n, v) in self.artifacts if n == name]
        if not versions:
            raise StoreNotFoundError(f"no published version of model {name}")
        return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))

    def fetch_signed_manifest(self, name: str, version: str) -> tuple[bytes, bytes]:
        if self.unreachable:
            raise StoreUnreachableError("fake store: connection refused")
        try:
            artifact = self.artifacts[(name, version)]
        except KeyError:
            raise StoreNotFoundError(f"{name} {version}: NoSuchKey") from None
        return artifact.manifest_bytes, artifact.signature

    @contextmanager
    def open_model(
        self, name: str, version: str, filename: str, offset: int = 0
    ) -> Iterator[Iterator[bytes]]:
        if self.unreachable:
            raise StoreUnreachableError("fake store: connection refused")
        assert filename == "model.gguf"
        self.offsets.append(offset)
        yield self._stream(self.artifacts[(name, version)].data[offset:])

    def _stream(self, data: bytes) -> Iterator[bytes]:
        cut, self.cut_after = self.cut_after, None
        for start in range(0, len(data), self.chunk):
            block = data[start : start + self.chunk]
            if cut is not None and start + len(block) > cut:
                block = block[: cut - start]
                self.sent += len(block)
                yield block
                raise TransferInterruptedError("fake store: connection reset by peer")
            self.sent += len(block)
            yield block


def blob(seed: int, size: int = 50_000) -> bytes:
    """Deterministic, distinct model bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def snapshot(root: Path) -> dict[str, tuple] | None:
    """Every path under ``root`` with its kind, size, link target and mtime; None when absent.

    Two equal snapshots mean nothing was created, removed, written or relinked.
    """
    if not root.exists():
        return None
    tree: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        tree[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, target)
    return tree


def publish(source, keypair, seed: int, version: str, size: int = 50_000) -> Artifact:
    """Sign a blob made from ``seed`` as ``version`` and put it in the fake store ``source``."""
    artifact = signed(keypair.secret_key, blob(seed, size), version=version)
    source.add(artifact)
    return artifact


def links(cache) -> dict[str, str]:
    """Where the model's current and previous links point (only those that exist)."""
    directory = cache.model_dir(NAME)
    return {
        link: os.readlink(directory / link)
        for link in ("current", "previous")
        if (directory / link).is_symlink()
    }


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus exposition, as {(name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
