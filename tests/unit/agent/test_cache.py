"""The model cache: layout, verify-then-activate, rollback, GC, space guard, resume, policy."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest
from agent_helpers import NAME, links, publish

from pifarm_agent import cache as cache_module
from pifarm_agent.cache import (
    CacheError,
    InsufficientSpaceError,
    IntegrityError,
    NotCachedError,
    VersionPolicyError,
)
from pifarm_agent.signing import SignatureError
from pifarm_agent.store import StoreNotFoundError, StoreUnreachableError, TransferInterruptedError

Usage = namedtuple("Usage", "total used free")


def test_a_sync_lays_out_a_content_addressed_entry_and_points_current_at_it(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    result = cache.sync(source, NAME)
    sha = artifact.manifest.sha256
    entry_dir = cache.root / "models" / NAME / sha
    assert result.status == "changed"
    assert result.bytes_fetched == len(artifact.data)
    assert sorted(p.name for p in entry_dir.iterdir()) == [
        "manifest.json",
        "manifest.json.minisig",
        "model.gguf",
    ]
    assert (entry_dir / "model.gguf").read_bytes() == artifact.data
    assert (entry_dir / "manifest.json").read_bytes() == artifact.manifest_bytes
    assert links(cache) == {"current": sha}
    assert (cache.model_dir(NAME) / "current" / "model.gguf").read_bytes() == artifact.data
    assert cache.partials(NAME) == []


def test_a_second_sync_has_nothing_to_do(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    again = cache.sync(source, NAME)
    assert again.status == "unchanged"
    assert not again.changed
    assert source.offsets == [0]


def test_a_newer_version_becomes_current_and_the_old_one_previous(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    result = cache.sync(source, NAME)
    assert result.changed
    assert links(cache) == {"current": new.manifest.sha256, "previous": old.manifest.sha256}
    assert result.previous.version == "1.0.0"


def test_rollback_swaps_current_and_previous(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME)
    entry = cache.rollback(NAME)
    assert entry.version == "1.0.0"
    assert links(cache) == {"current": old.manifest.sha256, "previous": new.manifest.sha256}
    # A later sync does not silently undo nor redo anything it should not: 1.1.0 is newer, so it returns.
    assert cache.sync(source, NAME).version == "1.1.0"


def test_rollback_without_a_previous_version_is_refused(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    with pytest.raises(CacheError, match="no previous version"):
        cache.rollback(NAME)


def test_the_link_switch_is_a_rename_over_current(cache, source, keypair, monkeypatch):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    publish(source, keypair, 2, "1.1.0")
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((os.path.basename(src), os.path.basename(dst), os.path.islink(src)))
        real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", recording_replace)
    cache.sync(source, NAME)
    link_switches = [r for r in replaced if r[1] in ("current", "previous")]
    # previous first, then current; each a fresh symlink renamed over the old one (never unlink + create).
    assert [(dst, is_link) for _src, dst, is_link in link_switches] == [("previous", True), ("current", True)]
    assert all(src.startswith(".") and src.endswith(".tmp") for src, _dst, _is_link in link_switches)


def test_activate_by_version_or_sha_prefix_and_policy(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME)
    with pytest.raises(VersionPolicyError, match=r"older than the active version 1\.1\.0"):
        cache.activate(NAME, "1.0.0")
    changed, entry = cache.activate(NAME, old.manifest.sha256[:10], allow_downgrade=True)
    assert changed
    assert entry.version == "1.0.0"
    assert cache.activate(NAME, new.manifest.sha256)[0] is True
    assert cache.activate(NAME, "1.1.0")[0] is False
    with pytest.raises(NotCachedError):
        cache.activate(NAME, "3.0.0")


def test_activate_rechecks_the_entry_signature(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME)
    (cache.model_dir(NAME) / old.manifest.sha256 / "manifest.json.minisig").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="not a minisign signature"):
        cache.activate(NAME, "1.0.0", allow_downgrade=True)
    assert cache.current(NAME).version == "1.1.0"


def test_verify_entry_finds_a_flipped_byte_in_a_cached_model(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    entry = cache.current(NAME)
    assert cache.verify_entry(entry) == artifact.manifest
    data = bytearray(entry.model_path.read_bytes())
    data[100] ^= 0x01
    entry.model_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.verify_entry(entry)


def test_gc_keeps_the_newest_and_never_current_or_previous(cache, source, keypair):
    shas = {}
    for seed, version in enumerate(["1.0.0", "1.1.0", "1.2.0", "1.3.0", "2.0.0"], start=1):
        shas[version] = publish(source, keypair, seed, version).manifest.sha256
        cache.sync(source, NAME)
    # Make the oldest current and the second oldest previous: GC must keep them although they are old.
    cache.activate(NAME, "1.1.0", allow_downgrade=True)
    cache.activate(NAME, "1.0.0", allow_downgrade=True)
    assert links(cache) == {"current": shas["1.0.0"], "previous": shas["1.1.0"]}
    removed = cache.gc(NAME, keep=3)
    assert sorted(e.version for e in removed) == ["1.2.0", "1.3.0"]
    assert sorted(e.version for e in cache.entries(NAME)) == ["1.0.0", "1.1.0", "2.0.0"]
    removed = cache.gc(NAME, keep=1)
    assert [e.version for e in removed] == ["2.0.0"]
    assert sorted(e.version for e in cache.entries(NAME)) == ["1.0.0", "1.1.0"]
    assert (cache.model_dir(NAME) / "current" / "model.gguf").is_file()
    assert cache.gc(NAME, keep=1) == []
    with pytest.raises(CacheError, match="at least 1"):
        cache.gc(NAME, keep=0)


def test_gc_removes_leftover_temporary_directories_but_keeps_partials(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    leftover = cache.model_dir(NAME) / f".{'b' * 64}.999.tmp"
    leftover.mkdir()
    (leftover / "model.gguf").write_bytes(b"half")
    partial = cache.partial_path(NAME, "c" * 64)
    partial.write_bytes(b"resumable")
    cache.gc(NAME, keep=1)
    assert not leftover.exists()
    assert partial.exists()


def test_the_space_guard_refuses_before_writing_a_byte(cache, source, keypair, monkeypatch):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.reserve_bytes = 1000
    size = len(artifact.data)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, size + 999))
    with pytest.raises(InsufficientSpaceError, match=f"needs {size} bytes plus a reserve of 1000"):
        cache.sync(source, NAME)
    assert source.offsets == []
    assert cache.partials(NAME) == []
    assert cache.current(NAME) is None


def test_the_space_guard_counts_what_is_already_downloaded(cache, source, keypair, monkeypatch):
    artifact = publish(source, keypair, 1, "1.0.0")
    half = len(artifact.data) // 2
    cache.model_dir(NAME).mkdir(parents=True)
    cache.partial_path(NAME, artifact.manifest.sha256).write_bytes(artifact.data[:half])
    remaining = len(artifact.data) - half
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, remaining))
    assert cache.sync(source, NAME).changed
    assert source.offsets == [half]


def test_an_interrupted_download_keeps_its_partial_and_the_next_sync_resumes(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    source.sent = 0
    source.cut_after = 20_000
    with pytest.raises(TransferInterruptedError):
        cache.sync(source, NAME)
    partial = cache.partial_path(NAME, new.manifest.sha256)
    assert partial.stat().st_size == 20_000
    assert links(cache) == {"current": old.manifest.sha256}
    assert cache.entry(NAME, new.manifest.sha256) is None

    result = cache.sync(source, NAME)
    assert result.changed
    assert result.resumed_from == 20_000
    assert result.bytes_fetched == len(new.data) - 20_000
    assert source.offsets[-1] == 20_000
    assert source.sent == len(new.data)
    assert cache.current(NAME).model_path.read_bytes() == new.data
    assert not partial.exists()


def test_a_corrupt_partial_fails_the_hash_and_is_discarded(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.model_dir(NAME).mkdir(parents=True)
    partial = cache.partial_path(NAME, artifact.manifest.sha256)
    partial.write_bytes(b"\x00" * 1000)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.sync(source, NAME)
    assert not partial.exists()
    assert cache.sync(source, NAME).changed


def test_a_partial_longer_than_the_model_starts_over(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.model_dir(NAME).mkdir(parents=True)
    cache.partial_path(NAME, artifact.manifest.sha256).write_bytes(artifact.data + b"extra")
    assert cache.sync(source, NAME).changed
    assert source.offsets == [0]


def test_partials_of_other_versions_are_dropped_when_a_new_download_starts(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.model_dir(NAME).mkdir(parents=True)
    stale = cache.partial_path(NAME, "d" * 64)
    stale.write_bytes(b"old attempt")
    cache.sync(source, NAME)
    assert not stale.exists()


def test_a_flipped_byte_in_the_store_is_refused_and_the_old_model_stays(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    corrupt = bytearray(new.data)
    corrupt[len(corrupt) // 2] ^= 0x40
    new.data = bytes(corrupt)
    with pytest.raises(
        IntegrityError,
        match=f"sha256 mismatch: downloaded [0-9a-f]{{64}}, the signed manifest says {new.manifest.sha256}",
    ):
        cache.sync(source, NAME)
    assert links(cache) == {"current": old.manifest.sha256}
    assert cache.partials(NAME) == []


def test_a_store_object_of_the_wrong_size_is_refused(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    artifact.data = artifact.data[:-10]
    with pytest.raises(IntegrityError, match=f"sent {len(artifact.data)} bytes, the manifest says"):
        cache.sync(source, NAME)
    artifact.data = artifact.data + b"0123456789extra"
    with pytest.raises(IntegrityError, match="sends more than"):
        cache.sync(source, NAME)
    assert cache.current(NAME) is None


def test_disk_full_mid_download_removes_the_partial_and_keeps_the_old_model(
    cache, source, keypair, monkeypatch
):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    publish(source, keypair, 2, "1.1.0")
    writes = {"n": 0}
    real_append = cache_module.ModelCache._append

    def filling_append(chunks, out, digest, progress, manifest):
        class FullDisk:
            def write(self, data):
                writes["n"] += 1
                if writes["n"] > 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return out.write(data)

            def flush(self):
                out.flush()

            def fileno(self):
                return out.fileno()

        real_append(chunks, FullDisk(), digest, progress, manifest)

    monkeypatch.setattr(cache_module.ModelCache, "_append", staticmethod(filling_append))
    with pytest.raises(InsufficientSpaceError, match=r"disk full while downloading tiny 1\.1\.0"):
        cache.sync(source, NAME)
    assert cache.partials(NAME) == []
    assert links(cache) == {"current": old.manifest.sha256}


def test_wrong_key_is_refused_and_nothing_is_downloaded(cache, source, other_keypair):
    publish(source, other_keypair, 1, "1.0.0")
    with pytest.raises(SignatureError, match="another key"):
        cache.sync(source, NAME)
    assert source.offsets == []


def test_an_old_release_replayed_under_a_new_version_is_refused(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME)
    source.add(old, at_version="1.2.0")
    with pytest.raises(VersionPolicyError, match=r"holds the signed manifest of tiny 1\.0\.0"):
        cache.sync(source, NAME)
    assert cache.current(NAME).sha256 == new.manifest.sha256


def test_an_older_version_is_refused_unless_downgrade_is_allowed(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "2.0.0")
    cache.sync(source, NAME)
    with pytest.raises(VersionPolicyError, match=r"older than the active version 2\.0\.0"):
        cache.sync(source, NAME, "1.0.0")
    assert cache.current(NAME).version == "2.0.0"
    assert cache.sync(source, NAME, "1.0.0", allow_downgrade=True).version == "1.0.0"


def test_the_same_version_with_other_content_is_refused(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    publish(source, keypair, 9, "1.0.0")
    with pytest.raises(VersionPolicyError, match="a version's content never changes"):
        cache.sync(source, NAME)


def test_an_unreachable_store_serves_the_cached_model(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    source.unreachable = True
    result = cache.sync(source, NAME)
    assert result.status == "served-from-cache"
    assert not result.changed
    assert result.sha256 == artifact.manifest.sha256
    assert "store unreachable, serving cached model tiny 1.0.0" in result.message


def test_an_unreachable_store_with_nothing_cached_fails(cache, source):
    source.unreachable = True
    with pytest.raises(StoreUnreachableError):
        cache.sync(source, NAME)


def test_a_cached_version_is_activated_without_the_store(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME)
    source.unreachable = True
    result = cache.sync(source, NAME, "1.0.0", allow_downgrade=True)
    assert result.changed
    assert result.version == "1.0.0"


def test_an_unknown_model_is_reported(cache, source):
    with pytest.raises(StoreNotFoundError, match="no published version"):
        cache.sync(source, NAME)


@pytest.mark.parametrize("name", ["../evil", "UPPER", "", "a/b"])
def test_model_names_cannot_escape_the_cache(cache, name):
    with pytest.raises(CacheError, match="model name"):
        cache.model_dir(name)


def test_an_entry_whose_directory_does_not_match_its_manifest_fails_verification(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    moved = cache.model_dir(NAME) / ("e" * 64)
    shutil.copytree(cache.model_dir(NAME) / artifact.manifest.sha256, moved)
    with pytest.raises(IntegrityError, match="directory name differs"):
        cache.verify_entry(cache.entry(NAME, "e" * 64))
