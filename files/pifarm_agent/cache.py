"""The node's model cache: content-addressed, verify-then-activate, with rollback and GC.

Layout under ``cache_root`` (``/var/lib/pifarm`` by default, so the models live in
the farm's ``/var/lib/pifarm/models``)::

    models/<name>/<sha256>/model.gguf                verified entries, never modified
    models/<name>/<sha256>/manifest.json             the signed manifest, as published
    models/<name>/<sha256>/manifest.json.minisig     its signature
    models/<name>/<sha256>.partial                   a download in progress (resumable)
    models/<name>/current -> <sha256>                what the inference server loads
    models/<name>/previous -> <sha256>               the version before, for instant rollback
    models/<name>/.lock                              serialises sync/activate/rollback/gc/remove

A download goes to ``<sha256>.partial``; an interrupted one resumes with a ranged
request after hashing the bytes already there. Only a file whose size, SHA-256 and
signed manifest all verify is moved into its entry (``os.replace``), and only then
is ``current`` switched, by renaming a fresh symlink over it.

Version policy: ``sync`` and ``activate`` refuse a version older than the active
one, and the active version with a different SHA-256 (versions are immutable),
unless ``allow_downgrade`` is set; ``rollback`` is the explicit way back. A sync
with ``activate=False`` (prefetch) only fetches and verifies: it refuses a
version's content changing but not an older version, since nothing is switched.

``plan`` answers what ``sync`` would do (bytes to fetch, the switch of ``current``)
through the same decision code, reading the cache and the store's signed manifest
but writing nothing: no lock file, no directory, no partial. ``remove`` deletes one
cached version (never ``current``) or a whole model.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import minisign

from pifarm_agent.manifest import NAME_RE, SHA256_RE, Manifest, ManifestError, parse_version
from pifarm_agent.progress import Progress
from pifarm_agent.signing import SignatureError, verify_manifest
from pifarm_agent.store import MANIFEST, SIGNATURE, StoreUnreachableError

CHUNK = 1024 * 1024
DEFAULT_RESERVE = 100 * 1_000_000
DEFAULT_KEEP = 3
CURRENT = "current"
PREVIOUS = "previous"
PARTIAL_SUFFIX = ".partial"
PARTIAL_RE = re.compile(r"([0-9a-f]{64})\.partial")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# The outcome of each model's last sync (farm exporter's source): <root>/sync-status/<name>.json.
SYNC_STATUS_DIR = "sync-status"
# Statuses of a sync that reached the store; served-from-cache means it could not.
SYNC_REACHED_STORE = ("changed", "unchanged")


class CacheError(Exception):
    """The cache cannot do what was asked; the active model is unchanged."""


class IntegrityError(CacheError):
    """Downloaded or cached bytes do not match the signed manifest."""


class InsufficientSpaceError(CacheError):
    """Not enough free space for a download (checked before writing, or the disk filled up)."""


class VersionPolicyError(CacheError):
    """A version older than the active one, or a replayed/moved manifest."""


class NotCachedError(CacheError):
    """The requested version is not in the cache."""


class ModelSource(Protocol):
    """Where models come from: the store (pifarm_agent.store.ModelStore) or a test double."""

    def latest_version(self, name: str) -> str: ...

    def fetch_signed_manifest(self, name: str, version: str) -> tuple[bytes, bytes]: ...

    def open_model(
        self, name: str, version: str, filename: str, offset: int = 0
    ) -> AbstractContextManager[Iterator[bytes]]: ...


@dataclass(frozen=True)
class Entry:
    """One verified model in the cache."""

    name: str
    sha256: str
    path: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_filename

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.manifest.size,
            "format": self.manifest.format,
            "path": str(self.model_path),
        }


@dataclass
class SyncResult:
    """What a sync did. ``status`` is one of STATUSES.

    ``version``/``sha256`` are the target's (the served model's when served from
    cache); ``before`` was current before the sync, ``current``/``previous`` are the
    links after it; ``switched`` says whether ``current`` moved; ``verify_seconds`` is
    the time spent hashing and checking signatures, within ``seconds``.
    """

    status: str
    name: str
    message: str
    current: Entry | None = None
    previous: Entry | None = None
    before: Entry | None = None
    version: str | None = None
    sha256: str | None = None
    bytes_fetched: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    verify_seconds: float = 0.0
    activate: bool = True
    switched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    STATUSES = ("changed", "unchanged", "served-from-cache")

    @property
    def changed(self) -> bool:
        return self.status == "changed"


@dataclass
class PlanResult:
    """What a sync would do; ``status`` is the one the sync would report.

    ``current`` is what is current now and ``target`` what the sync would fetch
    and (when ``would_switch``) make current; when the store is unreachable the
    target is the cached model that would stay.
    """

    status: str
    name: str
    message: str
    current: Entry | None = None
    previous: Entry | None = None
    target: Manifest | None = None
    would_fetch_bytes: int = 0
    resumed_from: int = 0
    would_switch: bool = False
    activate: bool = True
    seconds: float = 0.0
    verify_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.status == "changed"


@dataclass
class RemoveResult:
    """What a removal deleted (or, with ``plan``, would delete)."""

    name: str
    version: str | None
    removed: list[Entry] = field(default_factory=list)
    partials: list[tuple[Path, int]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    plan: bool = False
    before: Entry | None = None  # current before the removal

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.partials or self.links)

    @property
    def message(self) -> str:
        what = f"model {self.name}" + (f" {self.version}" if self.version else "")
        if not self.changed:
            return f"{what}: nothing cached to remove"
        parts = [f"{entry.version} ({entry.sha256[:12]})" for entry in self.removed]
        parts += [f"partial download {path.name} ({size} bytes)" for path, size in self.partials]
        parts += [f"link {link}" for link in self.links]
        verb = "would remove" if self.plan else "removed"
        return f"{what}: {verb} {', '.join(parts)}"


class _Timer:
    """Seconds spent hashing and checking signatures, reported as ``verify_seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


class _TimedDigest:
    """SHA-256 that adds the time spent in ``update`` to a timer (hashing, not network or disk)."""

    def __init__(self, timer: _Timer) -> None:
        self._digest = hashlib.sha256()
        self._timer = timer

    def update(self, data: bytes) -> None:
        started = time.perf_counter()
        self._digest.update(data)
        self._timer.seconds += time.perf_counter() - started

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass
class _Decision:
    """What a sync of one model comes to, decided without writing anything (shared by sync and plan).

    Either ``manifest`` is the verified target (``entry`` is its cache entry when it
    is already cached; ``switch`` says whether ``current`` moves to it), or the store
    was unreachable and ``fallback`` is the cached model that stays.
    """

    active: Entry | None
    requested: str | None
    manifest: Manifest | None = None
    entry: Entry | None = None
    manifest_bytes: bytes = b""
    signature_bytes: bytes = b""
    switch: bool = False
    fallback: Entry | None = None
    unreachable: Exception | None = None
    # A cached entry of the target whose content no longer matches its signed manifest (bit rot,
    # a flipped byte): fetched again into its place; ``corrupt`` says why.
    repair: Entry | None = None
    corrupt: str | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _check_name(name: str) -> None:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise CacheError(f"model name {name!r:.80} is not [a-z0-9][a-z0-9._-]{{0,63}}")


def _check_request(name: str, version: str | None) -> None:
    """Refuse a bad name or version before anything is locked or created."""
    _check_name(name)
    if version is not None:
        parse_version(version)


class ModelCache:
    def __init__(
        self,
        root: str | Path,
        public_key: minisign.PublicKey,
        *,
        reserve_bytes: int = DEFAULT_RESERVE,
        progress_stream: TextIO | None = None,
        progress_interval: float = 5.0,
    ) -> None:
        self.root = Path(root)
        self.public_key = public_key
        self.reserve_bytes = reserve_bytes
        self.progress_stream = progress_stream
        self.progress_interval = progress_interval

    # -- layout ----------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, name: str) -> Path:
        _check_name(name)
        return self.models_dir / name

    def partial_path(self, name: str, sha256: str) -> Path:
        return self.model_dir(name) / f"{sha256}{PARTIAL_SUFFIX}"

    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def partials(self, name: str) -> list[Path]:
        directory = self.model_dir(name)
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.iterdir() if PARTIAL_RE.fullmatch(p.name))

    def entry(self, name: str, sha256: str) -> Entry | None:
        """The entry for ``sha256``, or None when absent or its manifest is unreadable."""
        path = self.model_dir(name) / sha256
        if SHA256_RE.fullmatch(sha256) is None or path.is_symlink() or not path.is_dir():
            return None
        try:
            manifest = Manifest.from_json((path / MANIFEST).read_bytes())
        except (OSError, ManifestError):
            return None
        return Entry(name, sha256, path, manifest)

    def entries(self, name: str) -> list[Entry]:
        """Entries of ``name``, newest version first."""
        directory = self.model_dir(name)
        if not directory.is_dir():
            return []
        found = [self.entry(name, p.name) for p in directory.iterdir() if SHA256_RE.fullmatch(p.name)]
        return sorted((e for e in found if e is not None), key=lambda e: e.manifest.version_key, reverse=True)

    def _link_target(self, name: str, link: str) -> str | None:
        path = self.model_dir(name) / link
        if not path.is_symlink():
            return None
        target = os.readlink(path)
        return target if SHA256_RE.fullmatch(target) else None

    def current(self, name: str) -> Entry | None:
        sha = self._link_target(name, CURRENT)
        return self.entry(name, sha) if sha else None

    def previous(self, name: str) -> Entry | None:
        sha = self._link_target(name, PREVIOUS)
        return self.entry(name, sha) if sha else None

    def find(self, name: str, ref: str) -> Entry:
        """An entry by version (``1.2.0``) or SHA-256 (full or a unique prefix of 8+)."""
        for entry in self.entries(name):
            if ref in (entry.version, entry.sha256) or (len(ref) >= 8 and entry.sha256.startswith(ref)):
                return entry
        raise NotCachedError(f"model {name} {ref} is not in the cache {self.model_dir(name)}")

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the model's lock. A lock taken on a model directory that ``remove`` moved away
        while this process waited is dropped and taken again on the directory now in place."""
        directory = self.model_dir(name)
        while True:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / ".lock"
            lock = path.open("a")
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            held = os.fstat(lock.fileno())
            try:
                on_disk = os.stat(path)
                same = (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            lock.close()
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()

    # -- verification ----------------------------------------------------------------

    def _verify_signed(self, path: Path) -> Manifest:
        try:
            manifest_bytes = (path / MANIFEST).read_bytes()
            signature_bytes = (path / SIGNATURE).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"cache entry {path}: {exc.strerror or exc}") from None
        try:
            manifest = verify_manifest(manifest_bytes, signature_bytes, self.public_key)
        except (SignatureError, ManifestError) as exc:
            raise IntegrityError(f"cache entry {path}: {exc}") from None
        if manifest.sha256 != path.name:
            raise IntegrityError(
                f"cache entry {path}: directory name differs from manifest sha256 {manifest.sha256}"
            )
        return manifest

    def _verify_size(self, path: Path, manifest: Manifest) -> Path:
        model = path / manifest.model_filename
        try:
            size = model.stat().st_size
        except OSError as exc:
            raise IntegrityError(f"cache entry {path}: {exc.strerror or exc}") from None
        if size != manifest.size:
            raise IntegrityError(
                f"cache entry {path}: size mismatch: file has {size} bytes, manifest says {manifest.size}"
            )
        return model

    def verify_entry(self, entry: Entry, *, full: bool = True) -> Manifest:
        """Signature, trusted comment, size and (when ``full``) the SHA-256 of the model file."""
        manifest = self._verify_signed(entry.path)
        model = self._verify_size(entry.path, manifest)
        if full:
            digest = hashlib.sha256()
            with model.open("rb") as handle:
                while block := handle.read(CHUNK):
                    digest.update(block)
            if digest.hexdigest() != manifest.sha256:
                raise IntegrityError(
                    f"cache entry {entry.path}: sha256 mismatch: file has {digest.hexdigest()}, "
                    f"manifest says {manifest.sha256}"
                )
        return manifest

    # -- activation ------------------------------------------------------------------

    def _point(self, name: str, link: str, sha256: str) -> None:
        """Atomically make ``link`` point at ``sha256``: a temp symlink renamed over it."""
        directory = self.model_dir(name)
        temp = directory / f".{link}.{os.getpid()}.tmp"
        temp.unlink(missing_ok=True)
        os.symlink(sha256, temp)
        os.replace(temp, directory / link)
        _fsync_dir(directory)

    @staticmethod
    def _check_policy(
        active: Entry | None, candidate: Manifest, allow_downgrade: bool, *, switching: bool = True
    ) -> None:
        """Refuse an older version than the active one (when it would become current) and
        the active version with other content (always: versions are immutable)."""
        if active is None or allow_downgrade or active.sha256 == candidate.sha256:
            return
        if switching and candidate.version_key < active.manifest.version_key:
            raise VersionPolicyError(
                f"refusing {candidate.name} {candidate.version}: older than the active version "
                f"{active.version} (roll back explicitly, or allow a downgrade)"
            )
        if candidate.version_key == active.manifest.version_key:
            raise VersionPolicyError(
                f"refusing {candidate.name} {candidate.version}: the active {active.version} has sha256 "
                f"{active.sha256}, this one {candidate.sha256}; a version's content never changes"
            )

    def _switch(self, name: str, entry: Entry, active: Entry | None) -> None:
        """``previous`` to the active entry, then ``current`` to ``entry``; checks come before."""
        if active is not None:
            self._point(name, PREVIOUS, active.sha256)
        self._point(name, CURRENT, entry.sha256)

    def _activate_locked(self, name: str, entry: Entry, allow_downgrade: bool) -> bool:
        # The content too, not only signature and size: a byte flipped on the SSD keeps both.
        self.verify_entry(entry)
        active = self.current(name)
        if active is not None and active.sha256 == entry.sha256:
            return False
        self._check_policy(active, entry.manifest, allow_downgrade)
        self._switch(name, entry, active)
        return True

    def activate(self, name: str, ref: str, *, allow_downgrade: bool = False) -> tuple[bool, Entry]:
        """Make a cached version current (its signature, size and SHA-256 are re-checked first)."""
        with self._locked(name):
            entry = self.find(name, ref)
            return self._activate_locked(name, entry, allow_downgrade), entry

    def rollback(self, name: str) -> Entry:
        """Swap ``current`` and ``previous``; the rolled-back-from version becomes ``previous``."""
        with self._locked(name):
            previous, active = self.previous(name), self.current(name)
            if previous is None:
                raise CacheError(f"model {name}: no previous version to roll back to")
            self.verify_entry(previous)
            self._point(name, CURRENT, previous.sha256)
            if active is not None:
                self._point(name, PREVIOUS, active.sha256)
            return previous

    # -- garbage collection ----------------------------------------------------------

    def gc(self, name: str, keep: int = DEFAULT_KEEP) -> list[Entry]:
        """Remove all but the ``keep`` newest versions; ``current`` and ``previous`` always stay.

        Left-over temporary directories are removed too; partial downloads stay (resumable).
        """
        if keep < 1:
            raise CacheError(f"keep must be at least 1, got {keep}")
        with self._locked(name):
            directory = self.model_dir(name)
            protected = {self._link_target(name, CURRENT), self._link_target(name, PREVIOUS)} - {None}
            retained = set(protected)
            removed = []
            for entry in self.entries(name):
                if entry.sha256 in retained:
                    continue
                if len(retained) < keep:
                    retained.add(entry.sha256)
                    continue
                removed.append(entry)
            for entry in removed:
                self._remove_dir(entry.path)
            for leftover in directory.glob(".*.tmp"):
                self._remove_dir(leftover)
            return removed

    # -- removal ---------------------------------------------------------------------

    def _removal(self, name: str, version: str | None, *, plan: bool) -> RemoveResult:
        """What ``remove`` deletes; reads only. Refuses the current version."""
        result = RemoveResult(name, version, plan=plan)
        directory = self.model_dir(name)
        if not directory.is_dir():
            return result
        result.before = self.current(name)
        if version is None:
            result.removed = self.entries(name)
            result.partials = [(path, path.stat().st_size) for path in self.partials(name)]
            result.links = [link for link in (CURRENT, PREVIOUS) if (directory / link).is_symlink()]
            return result
        entry = self._cached_version(name, version)
        if entry is None:
            return result
        if entry.sha256 == self._link_target(name, CURRENT):
            raise CacheError(
                f"refusing to remove model {name} {version}: it is the current version; activate or "
                "roll back to another version first, or remove the whole model"
            )
        result.removed = [entry]
        if entry.sha256 == self._link_target(name, PREVIOUS):
            result.links = [PREVIOUS]
        return result

    def remove(self, name: str, version: str | None = None, *, plan: bool = False) -> RemoveResult:
        """Remove one cached version, or with ``version`` None the whole model.

        One version: refused when it is ``current``; when it is ``previous`` that
        link goes too (there is nothing to roll back to). The whole model: both
        links, every entry and every partial download. With ``plan`` nothing is
        written and the result says what would be removed.
        """
        _check_request(name, version)
        if plan or not self.model_dir(name).is_dir():
            return self._removal(name, version, plan=plan)
        with self._locked(name):
            result = self._removal(name, version, plan=False)
            directory = self.model_dir(name)
            if version is None:
                # What an interrupted removal of this model left behind goes first. Then one
                # rename takes the model out of sight (links included) and it is deleted.
                pattern = re.compile(rf"\.{re.escape(name)}\.[0-9]+\.tmp")
                for leftover in self.models_dir.iterdir():
                    if pattern.fullmatch(leftover.name):
                        shutil.rmtree(leftover)
                trash = self.models_dir / f".{name}.{os.getpid()}.tmp"
                os.replace(directory, trash)
                _fsync_dir(self.models_dir)
                shutil.rmtree(trash)
                return result
            if PREVIOUS in result.links:
                (directory / PREVIOUS).unlink()
                _fsync_dir(directory)
            for entry in result.removed:
                self._remove_dir(entry.path)
            return result

    @staticmethod
    def _remove_dir(path: Path) -> None:
        """Rename an entry first, so a half-removed directory never looks like an entry."""
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            return
        if not path.name.startswith("."):
            trash = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            os.replace(path, trash)
            path = trash
        shutil.rmtree(path)

    # -- download --------------------------------------------------------------------

    def _check_space(self, name: str, manifest: Manifest, have: int) -> None:
        needed = manifest.size - have
        # A plan runs before the model's directory exists: ask the filesystem it will be on.
        where = self.model_dir(name)
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        if free < needed + self.reserve_bytes:
            raise InsufficientSpaceError(
                f"refusing to download {manifest.name} {manifest.version}: needs {needed} bytes "
                f"plus a reserve of {self.reserve_bytes}, {free} bytes free in {self.models_dir}"
            )

    @staticmethod
    def _hash_existing(path: Path, digest: Any) -> int:
        have = 0
        with path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
                have += len(block)
        return have

    @staticmethod
    def _append(
        chunks: Iterator[bytes], out: Any, digest: Any, progress: Progress, manifest: Manifest
    ) -> None:
        label = f"{manifest.name} {manifest.version}"
        try:
            for chunk in chunks:
                if progress.done + len(chunk) > manifest.size:
                    raise IntegrityError(
                        f"{label}: size mismatch: the store sends more than the {manifest.size} bytes "
                        "the manifest says"
                    )
                out.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk))
        finally:
            # What arrived stays on disk for the next attempt to resume from.
            out.flush()
            os.fsync(out.fileno())

    @staticmethod
    def _check_download(digest: Any, progress: Progress, manifest: Manifest) -> None:
        label = f"{manifest.name} {manifest.version}"
        if progress.done != manifest.size:
            raise IntegrityError(
                f"{label}: size mismatch: the store sent {progress.done} bytes, "
                f"the manifest says {manifest.size}"
            )
        if digest.hexdigest() != manifest.sha256:
            raise IntegrityError(
                f"{label}: sha256 mismatch: downloaded {digest.hexdigest()}, "
                f"the signed manifest says {manifest.sha256}"
            )

    @staticmethod
    def _resumable_bytes(partial: Path, manifest: Manifest) -> int:
        """Bytes of ``partial`` a download resumes from (0 when absent or longer than the model)."""
        try:
            have = partial.stat().st_size
        except FileNotFoundError:
            return 0
        return have if have <= manifest.size else 0

    def _fetch(
        self, source: ModelSource, manifest: Manifest, partial: Path, timer: _Timer
    ) -> tuple[int, int]:
        """Bring ``partial`` to the full, verified file; returns (resumed_from, bytes_fetched)."""
        have = self._resumable_bytes(partial, manifest)
        if have == 0:
            partial.unlink(missing_ok=True)
        self._check_space(manifest.name, manifest, have)
        digest = _TimedDigest(timer)
        if have:
            have = self._hash_existing(partial, digest)
        progress = Progress(
            f"model {manifest.name} {manifest.version}",
            manifest.size,
            have,
            interval=self.progress_interval,
            stream=self.progress_stream,
        )
        filename = manifest.model_filename
        try:
            if have < manifest.size:
                with (
                    partial.open("ab") as out,
                    source.open_model(manifest.name, manifest.version, filename, have) as chunks,
                ):
                    self._append(chunks, out, digest, progress, manifest)
            progress.finish()
            self._check_download(digest, progress, manifest)
        except IntegrityError:
            # Bad bytes cannot become good by resuming: start over next time.
            partial.unlink(missing_ok=True)
            raise
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise CacheError(f"write {partial}: {exc.strerror or exc}") from None
            partial.unlink(missing_ok=True)
            raise InsufficientSpaceError(
                f"disk full while downloading {manifest.name} {manifest.version} into {partial}; "
                "the partial download was removed"
            ) from None
        return have, progress.fetched

    def _quarantine(self, entry: Entry) -> None:
        """Remove a corrupt entry (renamed aside first, so its path is free at once); the good copy
        takes the same path, and the links that name it by its SHA-256 are whole again."""
        aside = entry.path.parent / f".corrupt-{entry.sha256}.{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(entry.path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    def _promote(
        self, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes, partial: Path
    ) -> Entry:
        """Move a verified download into its content-addressed entry."""
        directory = self.model_dir(manifest.name)
        temp = directory / f".{manifest.sha256}.{os.getpid()}.tmp"
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
        try:
            _write_file(temp / MANIFEST, manifest_bytes)
            _write_file(temp / SIGNATURE, signature_bytes)
            os.replace(partial, temp / manifest.model_filename)
            # Readable by the servers' users whatever the writer's umask (a unit's UMask=0077
            # when llama-server's start repairs its model): models are not secret, only signed.
            for path in temp.iterdir():
                os.chmod(path, 0o644)
            os.chmod(temp, 0o755)
            _fsync_dir(temp)
            os.replace(temp, directory / manifest.sha256)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            raise CacheError(
                f"store {manifest.name} {manifest.version} in {directory}: {exc.strerror or exc}"
            ) from None
        _fsync_dir(directory)
        entry = self.entry(manifest.name, manifest.sha256)
        if entry is None:
            raise CacheError(f"cache entry {directory / manifest.sha256} unreadable right after writing it")
        return entry

    # -- sync ----------------------------------------------------------------------

    def _cached_version(self, name: str, version: str) -> Entry | None:
        return next((e for e in self.entries(name) if e.version == version), None)

    def _fallback(self, name: str, active: Entry | None, activate: bool) -> Entry | None:
        """The cached model that stays when the store is unreachable: the active one, or for a
        prefetch on a node with nothing current, the newest cached version."""
        if active is not None or activate:
            return active
        entries = self.entries(name)
        return entries[0] if entries else None

    def _decide(  # noqa: PLR0913 - sync's and plan's options, passed through
        self,
        source: ModelSource,
        name: str,
        version: str | None,
        *,
        activate: bool,
        allow_downgrade: bool,
        timer: _Timer,
    ) -> _Decision:
        """Resolve the target, verify its signed manifest and apply the version policy; writes nothing.

        A requested version already in the cache is used without contacting the store.
        """
        active = self.current(name)
        decision = _Decision(active=active, requested=version)
        checked: dict[str, str | None] = {}  # each entry hashed once per decision

        def corruption(entry: Entry | None) -> str | None:
            if entry is None:
                return None
            if entry.sha256 not in checked:
                checked[entry.sha256] = self._corruption(entry, timer)
            return checked[entry.sha256]

        corruption(active)
        entry = self._cached_version(name, version) if version else None
        if entry is not None and corruption(entry) is None:
            decision.manifest = entry.manifest
        else:
            try:
                if version is None:
                    version = source.latest_version(name)
                manifest_bytes, signature_bytes = source.fetch_signed_manifest(name, version)
            except StoreUnreachableError as exc:
                decision.fallback = self._fallback(name, active, activate)
                if decision.fallback is None:
                    raise
                kept = decision.fallback
                if corruption(kept) is not None:
                    role = "current" if kept is active else "cached"
                    raise IntegrityError(
                        f"model {name} {kept.version}: the {role} copy is corrupt ({corruption(kept)}) and "
                        f"the store cannot be reached for a good one ({exc}); llama-server refuses a corrupt "
                        "model at its start"
                    ) from None
                decision.requested, decision.unreachable = version, exc
                return decision
            with timer.timing():
                manifest = verify_manifest(manifest_bytes, signature_bytes, self.public_key)
            if (manifest.name, manifest.version) != (name, version):
                raise VersionPolicyError(
                    f"refusing store entry {name} {version}: it holds the signed manifest of "
                    f"{manifest.name} {manifest.version} (a moved or replayed artifact)"
                )
            decision.manifest, decision.manifest_bytes, decision.signature_bytes = (
                manifest,
                manifest_bytes,
                signature_bytes,
            )
            entry = self.entry(name, manifest.sha256)
        # A cached entry is only counted on (as present, current, or to switch to) once its
        # content re-verifies; one that does not is fetched again into its place.
        if entry is not None:
            problem = corruption(entry)
            if problem is not None:
                decision.repair, decision.corrupt, entry = entry, problem, None
        decision.entry = entry
        is_active = active is not None and active.sha256 == decision.manifest.sha256
        self._check_policy(active, decision.manifest, allow_downgrade, switching=activate)
        decision.switch = activate and not is_active
        return decision

    def _corruption(self, entry: Entry, timer: _Timer) -> str | None:
        """Why ``entry`` fails its full verification (signature, size, SHA-256), or None."""
        try:
            with timer.timing():
                self.verify_entry(entry)
        except (IntegrityError, ManifestError, SignatureError, OSError) as exc:
            return str(exc)
        return None

    def sync_status_path(self, name: str) -> Path:
        _check_name(name)
        return self.root / SYNC_STATUS_DIR / f"{name}.json"

    def synced_names(self) -> list[str]:
        """Models with a recorded sync, failed first syncs included."""
        directory = self.root / SYNC_STATUS_DIR
        if not directory.is_dir():
            return []
        return sorted(p.stem for p in directory.glob("*.json") if NAME_RE.fullmatch(p.stem))

    def sync_status(self, name: str) -> dict[str, Any] | None:
        """The last sync's outcome as recorded by :meth:`sync`; None when never recorded or unreadable."""
        try:
            status = json.loads(self.sync_status_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def _record_sync(self, name: str, status: dict[str, Any]) -> None:
        """Replace the status file atomically; a failure to record never fails the sync itself."""
        path = self.sync_status_path(name)
        try:
            path.parent.mkdir(mode=0o755, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            _write_file(temporary, json.dumps({**status, "time": time.time()}, sort_keys=True).encode())
            temporary.chmod(0o644)
            temporary.replace(path)
        except OSError:
            pass

    def sync(
        self,
        source: ModelSource,
        name: str,
        version: str | None = None,
        *,
        activate: bool = True,
        allow_downgrade: bool = False,
    ) -> SyncResult:
        """Make ``version`` (default: the store's newest) of ``name`` current, verifying everything first.

        With ``activate=False`` the version is fetched and verified into the cache
        but ``current`` is left alone (a model cached but not current is present).
        When the store is unreachable and a model is active (for a prefetch: cached),
        it stays and the result says ``served-from-cache``. Each outcome, a failure
        included, is recorded for the farm exporter (:meth:`sync_status`).
        """
        started = time.monotonic()
        _check_request(name, version)
        try:
            result = self._sync(source, name, version, activate=activate, allow_downgrade=allow_downgrade)
        except Exception as exc:
            failure = {"status": "failed", "message": str(exc), "bytes_fetched": 0}
            self._record_sync(name, {**failure, "seconds": time.monotonic() - started})
            raise
        self._record_sync(
            name,
            {
                "status": result.status,
                "message": result.message,
                "seconds": result.seconds,
                "bytes_fetched": result.bytes_fetched,
            },
        )
        return result

    def _sync(
        self, source: ModelSource, name: str, version: str | None, *, activate: bool, allow_downgrade: bool
    ) -> SyncResult:
        started, timer = time.monotonic(), _Timer()
        with self._locked(name):
            decision = self._decide(
                source, name, version, activate=activate, allow_downgrade=allow_downgrade, timer=timer
            )
            if decision.fallback is not None:
                return self._served_from_cache(name, decision, started, timer, activate)
            manifest, entry = decision.manifest, decision.entry
            resumed_from = fetched = 0
            if entry is None:
                partial = self.partial_path(name, manifest.sha256)
                for stale in self.partials(name):
                    if stale != partial:
                        stale.unlink()
                try:
                    resumed_from, fetched = self._fetch(source, manifest, partial, timer)
                except StoreUnreachableError as exc:
                    # Refused before a byte arrived; whatever an earlier attempt left stays for a resume.
                    decision.fallback = self._fallback(name, decision.active, activate)
                    if decision.fallback is None:
                        raise
                    decision.unreachable = exc
                    return self._served_from_cache(name, decision, started, timer, activate)
                if decision.repair is not None:
                    self._quarantine(decision.repair)
                entry = self._promote(manifest, decision.manifest_bytes, decision.signature_bytes, partial)
            if decision.switch:
                self._switch(name, entry, decision.active)
            changed = decision.entry is None or decision.switch
            result = self._result("changed" if changed else "unchanged", name, entry, started, activate)
            if decision.repair is not None:
                result.message += f"; its cached copy was corrupt and was fetched again ({decision.corrupt})"
            result.before, result.switched = decision.active, decision.switch
            result.bytes_fetched, result.resumed_from = fetched, resumed_from
            result.verify_seconds = timer.seconds
            return result

    def plan(
        self,
        source: ModelSource,
        name: str,
        version: str | None = None,
        *,
        activate: bool = True,
        allow_downgrade: bool = False,
    ) -> PlanResult:
        """What ``sync`` with the same arguments would do, without writing anything.

        The store's signed manifest is fetched and verified and the version policy and
        the free-space guard are applied, so a plan fails where the sync would.
        """
        started, timer = time.monotonic(), _Timer()
        _check_request(name, version)
        decision = self._decide(
            source, name, version, activate=activate, allow_downgrade=allow_downgrade, timer=timer
        )
        plan = PlanResult(
            status="unchanged",
            name=name,
            message="",
            current=decision.active,
            previous=self.previous(name),
            activate=activate,
        )
        if decision.fallback is not None:
            served = self._served_from_cache(name, decision, started, timer, activate)
            plan.status, plan.message, plan.extra = served.status, served.message, served.extra
            plan.target = decision.fallback.manifest
        else:
            manifest = plan.target = decision.manifest
            if decision.entry is None:
                plan.resumed_from = self._resumable_bytes(self.partial_path(name, manifest.sha256), manifest)
                self._check_space(name, manifest, plan.resumed_from)
                plan.would_fetch_bytes = manifest.size - plan.resumed_from
            plan.would_switch = decision.switch
            if decision.entry is None or decision.switch:
                plan.status = "changed"
            plan.message = self._plan_message(plan, manifest)
            if decision.repair is not None:
                plan.message += (
                    f"; its cached copy is corrupt and would be fetched again ({decision.corrupt})"
                )
        plan.seconds, plan.verify_seconds = time.monotonic() - started, timer.seconds
        return plan

    @staticmethod
    def _plan_message(plan: PlanResult, target: Manifest) -> str:
        label = f"model {plan.name} {target.version} ({target.sha256[:12]})"
        active = plan.current
        now = f"{active.version} ({active.sha256[:12]})" if active else "nothing"
        if plan.status == "unchanged":
            where = "is current" if active and active.sha256 == target.sha256 else "is cached"
            return f"nothing to do: {label} {where}"
        steps = []
        if plan.would_fetch_bytes or plan.resumed_from:
            resumed = f", resuming after {plan.resumed_from} bytes" if plan.resumed_from else ""
            steps.append(f"would fetch {plan.would_fetch_bytes} bytes of {label}{resumed}")
        else:
            steps.append(f"{label} is cached")
        if plan.would_switch:
            steps.append(f"would switch current from {now} to {target.version}")
        else:
            steps.append(f"current stays {now}")
        return "; ".join(steps)

    def _result(self, status: str, name: str, entry: Entry, started: float, activate: bool) -> SyncResult:
        label = f"model {name} {entry.version} ({entry.sha256[:12]})"
        current = self.current(name)
        if activate:
            message = f"{label} {'activated' if status == 'changed' else 'already active'}"
        else:
            now = f"{current.version} ({current.sha256[:12]})" if current else "nothing"
            state = "is current" if current and current.sha256 == entry.sha256 else f"current stays {now}"
            done = "fetched and verified" if status == "changed" else "already cached"
            message = f"{label} {done}; {state}"
        return SyncResult(
            status=status,
            name=name,
            message=message,
            current=current,
            previous=self.previous(name),
            version=entry.version,
            sha256=entry.sha256,
            seconds=time.monotonic() - started,
            activate=activate,
        )

    def _served_from_cache(
        self, name: str, decision: _Decision, started: float, timer: _Timer, activate: bool
    ) -> SyncResult:
        kept = decision.fallback
        label = f"{name} {kept.version} ({kept.sha256[:12]})"
        if decision.active is not None and decision.active.sha256 == kept.sha256:
            what = f"serving cached model {label}"
        else:
            what = f"keeping cached model {label} (not current)"
        return SyncResult(
            status="served-from-cache",
            name=name,
            message=f"store unreachable, {what}: {decision.unreachable}",
            current=decision.active,
            previous=self.previous(name),
            before=decision.active,
            version=kept.version,
            sha256=kept.sha256,
            seconds=time.monotonic() - started,
            verify_seconds=timer.seconds,
            activate=activate,
            extra={"requested_version": decision.requested},
        )
