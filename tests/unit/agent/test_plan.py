"""ModelCache.plan: what a sync would fetch and switch, decided by sync's own code, writing nothing."""

from __future__ import annotations

import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from agent_helpers import NAME, FakeSource, publish, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pifarm_agent import cache as cache_module
from pifarm_agent.cache import InsufficientSpaceError, ModelCache, VersionPolicyError
from pifarm_agent.signing import SignatureError
from pifarm_agent.store import StoreNotFoundError, StoreUnreachableError

Usage = namedtuple("Usage", "total used free")


def test_a_plan_on_an_empty_node_creates_nothing_and_counts_the_whole_model(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    plan = cache.plan(source, NAME)
    assert plan.status == "changed"
    assert plan.changed
    assert plan.would_fetch_bytes == len(artifact.data)
    assert plan.would_switch is True
    assert plan.current is None
    assert (plan.target.version, plan.target.sha256) == ("1.0.0", artifact.manifest.sha256)
    assert plan.message == (
        f"would fetch {len(artifact.data)} bytes of model tiny 1.0.0 ({artifact.manifest.sha256[:12]}); "
        "would switch current from nothing to 1.0.0"
    )
    # No cache root, no lock file, no model directory: check mode tells the truth by not touching disk.
    assert not cache.root.exists()
    assert source.offsets == []


def test_a_plan_for_a_newer_version_names_both_ends_of_the_switch(cache, source, keypair):
    old = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0", size=70_000)
    before = snapshot(cache.root)
    plan = cache.plan(source, NAME)
    assert snapshot(cache.root) == before
    assert plan.would_fetch_bytes == 70_000
    assert plan.would_switch
    assert plan.current.sha256 == old.manifest.sha256
    assert plan.target.sha256 == new.manifest.sha256
    assert "would switch current from 1.0.0" in plan.message
    assert source.offsets == [0]


def test_a_partial_download_is_counted_as_already_fetched(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.model_dir(NAME).mkdir(parents=True)
    partial = cache.partial_path(NAME, artifact.manifest.sha256)
    partial.write_bytes(artifact.data[:12_345])
    before = snapshot(cache.root)
    plan = cache.plan(source, NAME)
    assert (plan.would_fetch_bytes, plan.resumed_from) == (len(artifact.data) - 12_345, 12_345)
    assert "resuming after 12345 bytes" in plan.message
    assert snapshot(cache.root) == before
    result = cache.sync(source, NAME)
    assert (result.bytes_fetched, result.resumed_from) == (plan.would_fetch_bytes, plan.resumed_from)


def test_a_partial_longer_than_the_model_is_planned_as_a_fresh_download_and_kept(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.model_dir(NAME).mkdir(parents=True)
    partial = cache.partial_path(NAME, artifact.manifest.sha256)
    partial.write_bytes(artifact.data + b"junk")
    assert cache.plan(source, NAME).would_fetch_bytes == len(artifact.data)
    assert partial.read_bytes() == artifact.data + b"junk"


def test_nothing_to_do_is_unchanged(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    plan = cache.plan(source, NAME)
    assert plan.status == "unchanged"
    assert (plan.would_fetch_bytes, plan.would_switch) == (0, False)
    assert plan.message == f"nothing to do: model tiny 1.0.0 ({artifact.manifest.sha256[:12]}) is current"


def test_a_cached_version_is_planned_without_the_store(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "1.1.0")
    cache.sync(source, NAME, "1.1.0")
    cache.sync(source, NAME, "1.0.0", activate=False)
    source.unreachable = True
    plan = cache.plan(source, NAME, "1.0.0", allow_downgrade=True)
    assert plan.status == "changed"
    assert (plan.would_fetch_bytes, plan.would_switch) == (0, True)
    assert plan.message.endswith(
        f"is cached; would switch current from 1.1.0 ({plan.current.sha256[:12]}) to 1.0.0"
    )


def test_a_prefetch_plan_never_switches(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    new = publish(source, keypair, 2, "1.1.0")
    plan = cache.plan(source, NAME, activate=False)
    assert (plan.status, plan.would_fetch_bytes, plan.would_switch) == ("changed", len(new.data), False)
    assert plan.message.endswith(f"current stays 1.0.0 ({plan.current.sha256[:12]})")
    cache.sync(source, NAME, activate=False)
    again = cache.plan(source, NAME, activate=False)
    assert (again.status, again.would_fetch_bytes) == ("unchanged", 0)
    assert again.message.endswith("is cached")


def test_a_plan_checks_the_signature_like_the_sync(cache, source, other_keypair):
    publish(source, other_keypair, 1, "1.0.0")
    with pytest.raises(SignatureError, match="another key"):
        cache.plan(source, NAME)
    assert not cache.root.exists()


def test_a_plan_applies_the_version_policy_like_the_sync(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    publish(source, keypair, 2, "2.0.0")
    cache.sync(source, NAME)
    with pytest.raises(VersionPolicyError, match=r"older than the active version 2\.0\.0"):
        cache.plan(source, NAME, "1.0.0")
    assert cache.plan(source, NAME, "1.0.0", allow_downgrade=True).would_switch
    # Fetching an older version without switching to it is not a downgrade.
    prefetch = cache.plan(source, NAME, "1.0.0", activate=False)
    assert (prefetch.status, prefetch.would_fetch_bytes, prefetch.would_switch) == ("changed", 50_000, False)


def test_a_plan_applies_the_space_guard_before_the_model_directory_exists(
    cache, source, keypair, monkeypatch
):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.reserve_bytes = 10
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return Usage(10**9, 10**9, len(artifact.data) + 9)

    monkeypatch.setattr(cache_module.shutil, "disk_usage", disk_usage)
    with pytest.raises(
        InsufficientSpaceError, match=f"needs {len(artifact.data)} bytes plus a reserve of 10"
    ):
        cache.plan(source, NAME)
    # The nearest directory that exists: the filesystem the cache would be created on.
    assert asked == [cache.root.parent]
    assert not cache.root.exists()


def test_an_unreachable_store_plans_serving_from_cache(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    source.unreachable = True
    plan = cache.plan(source, NAME)
    assert plan.status == "served-from-cache"
    assert not plan.changed
    assert plan.target.sha256 == artifact.manifest.sha256
    assert (plan.would_fetch_bytes, plan.would_switch) == (0, False)
    assert plan.message.startswith("store unreachable, serving cached model tiny 1.0.0")
    assert plan.extra == {"requested_version": None}


def test_an_unreachable_store_with_nothing_cached_fails_the_plan(cache, source):
    source.unreachable = True
    with pytest.raises(StoreUnreachableError):
        cache.plan(source, NAME)
    source.unreachable = False
    with pytest.raises(StoreNotFoundError):
        cache.plan(source, NAME)


def test_the_plan_reports_time_spent_verifying(cache, source, keypair):
    publish(source, keypair, 1, "1.0.0")
    plan = cache.plan(source, NAME)
    assert 0 < plan.verify_seconds <= plan.seconds


VERSIONS = ("1.0.0", "1.1.0", "2.0.0")
SIZE = 6000


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    synced=st.lists(st.sampled_from(VERSIONS), max_size=3),
    prefetched=st.lists(st.sampled_from(VERSIONS), max_size=2),
    partial=st.none() | st.tuples(st.sampled_from(VERSIONS), st.integers(0, SIZE + 50)),
    requested=st.none() | st.sampled_from(VERSIONS),
    activate=st.booleans(),
    allow_downgrade=st.booleans(),
    unreachable=st.booleans(),
)
def test_the_plan_predicts_exactly_what_the_sync_then_does(
    keypair, synced, prefetched, partial, requested, activate, allow_downgrade, unreachable
):
    source = FakeSource()
    artifacts = {
        version: publish(source, keypair, seed, version, size=SIZE) for seed, version in enumerate(VERSIONS)
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = ModelCache(Path(tmp) / "cache", keypair.public_key, reserve_bytes=0, progress_interval=3600)
        for version in synced:
            cache.sync(source, NAME, version, allow_downgrade=True)
        for version in prefetched:
            cache.sync(source, NAME, version, activate=False, allow_downgrade=True)
        if partial is not None:
            version, length = partial
            data = artifacts[version].data
            cache.model_dir(NAME).mkdir(parents=True, exist_ok=True)
            path = cache.partial_path(NAME, artifacts[version].manifest.sha256)
            path.write_bytes(data[:length] if length <= SIZE else data + b"\0" * (length - SIZE))
        source.unreachable = unreachable
        options = {"activate": activate, "allow_downgrade": allow_downgrade}

        before = snapshot(cache.root)
        try:
            plan = cache.plan(source, NAME, requested, **options)
        except Exception as exc:
            plan = exc
        assert snapshot(cache.root) == before
        try:
            result = cache.sync(source, NAME, requested, **options)
        except Exception as exc:
            result = exc

        if isinstance(plan, Exception):
            assert type(result) is type(plan)
            assert str(result) == str(plan)
            return
        assert not isinstance(result, Exception), result
        assert result.status == plan.status
        assert result.bytes_fetched == plan.would_fetch_bytes
        assert result.resumed_from == plan.resumed_from
        assert result.switched == plan.would_switch
        assert (result.version, result.sha256) == (plan.target.version, plan.target.sha256)
        current = cache.current(NAME)
        if plan.would_switch:
            assert current.sha256 == plan.target.sha256
        else:
            assert (current and current.sha256) == (plan.current and plan.current.sha256)
