"""sync(activate=False) fetches without switching; remove deletes a version or a whole model."""

from __future__ import annotations

import os
import threading
import time

import pytest
from agent_helpers import NAME, links, publish, snapshot

from pifarm_agent.cache import CacheError, IntegrityError, VersionPolicyError
from pifarm_agent.manifest import ManifestError
from pifarm_agent.store import StoreUnreachableError

# -- prefetch (state present) -------------------------------------------------------------


def test_a_prefetch_verifies_into_the_cache_and_leaves_current_alone(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    result = cache.sync(source, NAME, activate=False)
    assert result.status == "changed"
    assert result.switched is False
    assert result.bytes_fetched == len(artifact.data)
    assert result.current is None
    assert links(cache) == {}
    assert cache.entry(NAME, artifact.manifest.sha256).model_path.read_bytes() == artifact.data
    assert result.message == (
        f"model tiny 1.0.0 ({artifact.manifest.sha256[:12]}) fetched and verified; current stays nothing"
    )
    again = cache.sync(source, NAME, activate=False)
    assert (again.status, again.bytes_fetched) == ("unchanged", 0)
    assert again.message.endswith("already cached; current stays nothing")
    assert source.offsets == [0]


def test_activating_a_prefetched_version_fetches_nothing(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    prefetch = cache.sync(source, NAME, activate=False)
    assert prefetch.changed
    assert links(cache) == {"current": old.manifest.sha256}
    assert prefetch.message.endswith(f"current stays 1.0.0 ({old.manifest.sha256[:12]})")
    result = cache.sync(source, NAME)
    assert (result.status, result.bytes_fetched, result.switched) == ("changed", 0, True)
    assert links(cache) == {"current": new.manifest.sha256, "previous": old.manifest.sha256}
    assert source.offsets == [0, 0]


def test_a_prefetch_of_the_current_version_is_unchanged(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    result = cache.sync(source, NAME, activate=False)
    assert result.status == "unchanged"
    assert result.message.endswith("already cached; is current")


def test_a_prefetch_may_fetch_an_older_version_but_not_a_changed_one(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "2.0.0")
    cache.sync(source, NAME)
    assert cache.sync(source, NAME, "1.0.0", activate=False).changed
    assert cache.current(NAME).version == "2.0.0"
    publish(source, keypair, 9, "2.0.0")
    with pytest.raises(VersionPolicyError, match="a version's content never changes"):
        cache.sync(source, NAME, activate=False)


def test_a_cached_version_counts_as_present_only_if_it_still_verifies(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME, "1.0.0", activate=False)
    cache.sync(source, NAME, "1.1.0")
    model = cache.model_dir(NAME) / old.manifest.sha256 / "model.gguf"
    model.write_bytes(b"truncated")
    # Fetched again into its place while the store answers, under a unit's UMask=0077...
    umask = os.umask(0o077)
    try:
        result = cache.sync(source, NAME, "1.0.0", activate=False)
    finally:
        os.umask(umask)
    assert (result.status, result.bytes_fetched) == ("changed", old.manifest.size)
    assert "its cached copy was corrupt and was fetched again (" in result.message
    assert "size mismatch: file has 9 bytes" in result.message
    assert cache.verify_entry(cache.entry(NAME, old.manifest.sha256)).sha256 == old.manifest.sha256
    assert model.stat().st_mode & 0o777 == 0o644  # readable by the servers whatever the umask
    # ...and never counted on while it does not: the prefetch keeps what verifies, activation refuses it.
    model.write_bytes(b"truncated")
    source.unreachable = True
    kept = cache.sync(source, NAME, "1.0.0", activate=False)
    assert (kept.status, kept.version) == ("served-from-cache", "1.1.0")
    with pytest.raises(IntegrityError, match="size mismatch"):
        cache.activate(NAME, "1.0.0", allow_downgrade=True)


def test_a_current_model_with_a_flipped_byte_is_fetched_again_or_refused(cache, source, keypair):
    """Same size, one byte changed: only the SHA-256 tells, and every path checks it."""
    artifact = publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME, "1.0.0")
    cache.sync(source, NAME, "1.1.0")
    old = cache.model_dir(NAME) / artifact.manifest.sha256 / "model.gguf"
    data = bytearray(old.read_bytes())
    data[len(data) // 2] ^= 0x01
    old.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.rollback(NAME)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.activate(NAME, "1.0.0", allow_downgrade=True)
    # The current one flipped, the store down: the sync says so instead of serving it from cache.
    current = cache.current(NAME)
    current_file = current.path / "model.gguf"
    data = bytearray(current_file.read_bytes())
    data[0] ^= 0x01
    current_file.write_bytes(bytes(data))
    source.unreachable = True
    with pytest.raises(IntegrityError, match=r"the current copy is corrupt \(.*sha256 mismatch"):
        cache.sync(source, NAME)
    source.unreachable = False
    repaired = cache.sync(source, NAME)
    assert (repaired.status, repaired.version) == ("changed", "1.1.0")
    assert "its cached copy was corrupt and was fetched again" in repaired.message
    assert cache.verify_entry(cache.current(NAME)).version == "1.1.0"


def test_a_prefetch_of_a_cached_version_does_not_need_the_store(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME, activate=False)
    source.unreachable = True
    assert cache.sync(source, NAME, "1.0.0", activate=False).status == "unchanged"


def test_a_prefetch_with_the_store_down_keeps_what_is_cached(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME, activate=False)
    source.unreachable = True
    result = cache.sync(source, NAME, activate=False)
    assert result.status == "served-from-cache"
    assert result.sha256 == artifact.manifest.sha256
    assert result.message.startswith("store unreachable, keeping cached model tiny 1.0.0")
    assert "(not current)" in result.message


def test_a_prefetch_with_the_store_down_and_nothing_cached_fails(cache, source):
    source.unreachable = True
    with pytest.raises(StoreUnreachableError):
        cache.sync(source, NAME, activate=False)


def test_verify_seconds_cover_hashing_and_signatures(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    result = cache.sync(source, NAME)
    assert 0 < result.verify_seconds <= result.seconds


# -- remove -------------------------------------------------------------------------------


@pytest.fixture
def three_versions(cache, source, keypair):
    """1.0.0 cached, 1.1.0 previous, 1.2.0 current."""
    artifacts = [publish(source, keypair, seed, f"1.{seed - 1}.0") for seed in (1, 2, 3)]
    cache.sync(source, NAME, "1.0.0", activate=False)
    cache.sync(source, NAME, "1.1.0")
    cache.sync(source, NAME, "1.2.0")
    return artifacts


def test_the_current_version_cannot_be_removed(cache, three_versions):
    before = snapshot(cache.root)
    with pytest.raises(CacheError, match=r"refusing to remove model tiny 1\.2\.0: it is the current version"):
        cache.remove(NAME, "1.2.0")
    assert snapshot(cache.root) == before


def test_removing_the_previous_version_drops_the_previous_link(cache, three_versions):
    _v0, v1, v2 = three_versions
    result = cache.remove(NAME, "1.1.0")
    assert result.changed
    assert [e.version for e in result.removed] == ["1.1.0"]
    assert result.links == ["previous"]
    assert result.message == f"model tiny 1.1.0: removed 1.1.0 ({v1.manifest.sha256[:12]}), link previous"
    assert links(cache) == {"current": v2.manifest.sha256}
    assert not (cache.model_dir(NAME) / v1.manifest.sha256).exists()
    assert sorted(e.version for e in cache.entries(NAME)) == ["1.0.0", "1.2.0"]
    with pytest.raises(CacheError, match="no previous version"):
        cache.rollback(NAME)


def test_removing_an_unlinked_version_keeps_both_links(cache, three_versions):
    v0, v1, v2 = three_versions
    result = cache.remove(NAME, "1.0.0")
    assert (result.links, [e.sha256 for e in result.removed]) == ([], [v0.manifest.sha256])
    assert links(cache) == {"current": v2.manifest.sha256, "previous": v1.manifest.sha256}
    assert [d.name for d in cache.model_dir(NAME).iterdir() if d.name.startswith(".") and d.is_dir()] == []


def test_removing_what_is_not_cached_changes_nothing(cache, three_versions):
    before = snapshot(cache.root)
    assert not cache.remove(NAME, "9.9.9").changed
    assert not cache.remove("never-synced").changed
    assert (
        cache.remove("never-synced", "1.0.0").message == "model never-synced 1.0.0: nothing cached to remove"
    )
    assert snapshot(cache.root) == before


def test_removing_the_whole_model_takes_links_entries_and_partials(cache, three_versions):
    partial = cache.partial_path(NAME, "f" * 64)
    partial.write_bytes(b"half a download")
    result = cache.remove(NAME)
    assert result.changed
    assert sorted(e.version for e in result.removed) == ["1.0.0", "1.1.0", "1.2.0"]
    assert result.partials == [(partial, 15)]
    assert result.links == ["current", "previous"]
    assert not cache.model_dir(NAME).exists()
    assert list(cache.models_dir.iterdir()) == []
    assert cache.names() == []
    again = cache.remove(NAME)
    assert not again.changed


def test_a_removal_plan_writes_nothing_and_says_what_would_go(cache, three_versions):
    before = snapshot(cache.root)
    whole = cache.remove(NAME, plan=True)
    assert whole.plan
    assert whole.changed
    assert whole.message.startswith("model tiny: would remove 1.2.0")
    assert cache.remove(NAME, "1.1.0", plan=True).links == ["previous"]
    with pytest.raises(CacheError, match="it is the current version"):
        cache.remove(NAME, "1.2.0", plan=True)
    assert snapshot(cache.root) == before


def test_a_removal_plan_on_a_missing_cache_creates_nothing(cache):
    assert not cache.remove(NAME, plan=True).changed
    assert not cache.root.exists()


def test_a_bad_version_is_refused(cache):
    with pytest.raises(ManifestError, match=r"not MAJOR\.MINOR\.PATCH"):
        cache.remove(NAME, "latest")


def test_leftovers_of_an_interrupted_removal_go_with_the_next_one(cache, three_versions):
    leftover = cache.models_dir / f".{NAME}.999999.tmp"
    (leftover / "abc").mkdir(parents=True)
    other = cache.models_dir / f".{NAME}.x.999999.tmp"  # model "tiny.x": not ours to remove
    other.mkdir()
    cache.remove(NAME)
    assert not leftover.exists()
    assert other.exists()


def test_a_model_synced_again_after_removal_starts_clean(cache, source, three_versions):
    cache.remove(NAME)
    result = cache.sync(source, NAME)
    assert (result.status, result.version) == ("changed", "1.2.0")
    assert links(cache) == {"current": result.sha256}


def _lock_holders(path) -> int:
    """How many open file descriptors of this process refer to ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue
    return count


def test_a_sync_that_waited_on_a_removed_model_locks_the_new_directory(cache, source, keypair):
    """remove() renames the model away while a sync waits on its lock: the sync must not carry on
    in the vanished directory (its download would fail) but take the lock of the new one."""
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    lock = cache.model_dir(NAME) / ".lock"
    outcome = {}

    def waiting_sync():
        try:
            outcome["result"] = cache.sync(source, NAME, "1.0.0")
        except Exception as exc:
            outcome["error"] = exc

    with cache._locked(NAME):
        thread = threading.Thread(target=waiting_sync)
        thread.start()
        deadline = time.monotonic() + 10
        while _lock_holders(lock) < 2:
            assert time.monotonic() < deadline, "the sync never opened the lock"
            time.sleep(0.01)
        # What remove() does under the lock: the model directory goes away in one rename.
        os.replace(cache.model_dir(NAME), cache.models_dir / f".{NAME}.1.tmp")
    thread.join(timeout=30)
    assert outcome.get("error") is None, outcome.get("error")
    assert outcome["result"].status == "changed"
    assert cache.current(NAME).version == "1.0.0"
