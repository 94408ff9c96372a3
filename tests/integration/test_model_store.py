"""The node agent against a real S3 server (moto) with the real 238 MB Gemma 3 270M GGUF.

Figures (bytes fetched, times) are printed to the terminal as ``[figures]`` lines.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import minisign
import pytest
from integration_helpers import (
    ACCESS_KEY,
    BUCKET,
    MODEL_SHA256,
    NAME,
    SECRET_KEY,
    CuttingProxy,
    MotoServer,
    figure,
    manifest_for,
    publish,
    store_config,
)
from minio.commonconfig import CopySource

from pifarm_agent import cache as cache_module
from pifarm_agent.cache import InsufficientSpaceError, IntegrityError, ModelCache, VersionPolicyError
from pifarm_agent.cli import main
from pifarm_agent.signing import SignatureError, sign_manifest
from pifarm_agent.store import ModelStore, StoreError, TransferInterruptedError, object_key


def links(root: Path) -> dict[str, str]:
    directory = root / "models" / NAME
    return {
        link: os.readlink(directory / link)
        for link in ("current", "previous")
        if (directory / link).is_symlink()
    }


def fresh_bucket(moto) -> ModelStore:
    store = ModelStore(store_config(moto.endpoint, bucket=f"b-{uuid.uuid4().hex[:12]}"))
    store.ensure_bucket()
    return store


def test_publish_is_idempotent_and_versions_are_immutable(
    store, test_model, newer_model, keypair, timings, capsys
):
    figure(capsys, f"published 2 x ~{test_model.stat().st_size} bytes in {timings['publish']:.1f}s")
    assert store.list_versions(NAME) == ["1.0.0", "1.1.0"]
    assert store.list_names() == [NAME]
    again = publish(store, test_model, "1.0.0", keypair.secret_key)
    assert again.status == "unchanged"
    with pytest.raises(StoreError, match=r"1\.0\.0: this version already exists .* versions are immutable"):
        publish(store, newer_model, "1.0.0", keypair.secret_key)
    stat = store.client.stat_object(BUCKET, object_key(NAME, "1.0.0", "model.gguf"))
    assert stat.size == test_model.stat().st_size
    # Uploaded in 32 MiB parts: S3 multipart ETags end in -<part count>.
    assert stat.etag.endswith(f"-{-(-test_model.stat().st_size // (32 * 1024 * 1024))}")


def test_cli_sync_downloads_verifies_and_activates_the_real_model(
    moto, store, key_files, tmp_path, capsys, template_cache, timings
):
    figure(capsys, f"library sync into an empty cache: {timings['first_sync']:.1f}s")
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "endpoint": f"http://{moto.endpoint}",
                "bucket": BUCKET,
                "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY,
                "public_key": str(key_files["public"]),
                "cache_root": str(tmp_path / "cache"),
            }
        )
    )
    started = time.monotonic()
    code = main(["model", "sync", NAME, "--version", "1.0.0", "--config", str(config), "--json"])
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert code == 2, captured
    result = json.loads(captured.out)
    assert result["status"] == "changed"
    assert result["sha256"] == MODEL_SHA256
    model = Path(result["current"]["path"])
    assert model == tmp_path / "cache" / "models" / NAME / MODEL_SHA256 / "model.gguf"
    assert (tmp_path / "cache" / "models" / NAME / "current" / "model.gguf").samefile(model)
    assert "MB/s" in captured.err
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in captured.out + captured.err

    assert main(["model", "sync", NAME, "--version", "1.0.0", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "unchanged"
    assert main(["model", "sync", NAME, "--config", str(config)]) == 2
    assert "gemma3-270m 1.1.0" in capsys.readouterr().out
    assert main(["model", "verify", NAME, "--all", "--config", str(config)]) == 0
    assert main(["model", "rollback", NAME, "--config", str(config)]) == 2
    assert main(["model", "list", "--remote", "--config", str(config), "--json"]) == 0
    listing = capsys.readouterr().out.splitlines()[-1]
    assert json.loads(listing)["store"] == {NAME: ["1.0.0", "1.1.0"]}
    figure(
        capsys,
        f"cli sync: {result['bytes_fetched']} bytes in {elapsed:.1f}s "
        f"({result['bytes_fetched'] / elapsed / 1e6:.0f} MB/s)",
    )


def test_a_download_cut_at_half_promotes_nothing_and_the_next_sync_resumes(
    moto, store, cache, newer_model, capsys
):
    size = newer_model.stat().st_size
    proxy = CuttingProxy(moto.port)
    try:
        via_proxy = ModelStore(store_config(proxy.endpoint))
        proxy.cut_after = size // 2
        with pytest.raises(TransferInterruptedError, match="transfer interrupted"):
            cache.sync(via_proxy, NAME)
        assert proxy.cuts == 1
        partial = cache.partial_path(NAME, manifest_for(newer_model, "1.1.0").sha256)
        have = partial.stat().st_size
        assert 0.4 * size < have < 0.6 * size
        assert links(cache.root) == {"current": MODEL_SHA256}
        assert [e.version for e in cache.entries(NAME)] == ["1.0.0"]

        proxy.reset_counter()
        started = time.monotonic()
        result = cache.sync(via_proxy, NAME)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert result.status == "changed"
    assert result.version == "1.1.0"
    assert result.resumed_from == have
    assert result.bytes_fetched == size - have
    # What crossed the wire: the remaining bytes plus HTTP headers and the small manifest/signature.
    assert size - have <= proxy.downstream < size - have + 64 * 1024
    assert links(cache.root) == {"current": result.sha256, "previous": MODEL_SHA256}
    assert cache.verify_entry(cache.current(NAME)).version == "1.1.0"
    assert not partial.exists()
    figure(
        capsys,
        f"cut at {have} of {size} bytes; resume fetched {proxy.downstream} bytes on the wire "
        f"(remaining {size - have}) in {elapsed:.1f}s",
    )


def test_a_flipped_byte_in_the_store_is_refused_and_the_old_model_stays(
    moto, cache, newer_model, keypair, capsys
):
    store = fresh_bucket(moto)
    manifest = publish(store, newer_model, "1.1.0", keypair.secret_key).manifest
    data = bytearray(newer_model.read_bytes())
    data[len(data) // 2] ^= 0x01
    store.client.put_object(
        store.bucket,
        object_key(NAME, "1.1.0", "model.gguf"),
        io.BytesIO(bytes(data)),
        len(data),
        part_size=32 * 1024 * 1024,
    )
    del data
    started = time.monotonic()
    with pytest.raises(IntegrityError) as error:
        cache.sync(store, NAME)
    assert "sha256 mismatch: downloaded " in str(error.value)
    assert f"the signed manifest says {manifest.sha256}" in str(error.value)
    assert links(cache.root) == {"current": MODEL_SHA256}
    assert cache.partials(NAME) == []
    figure(capsys, f"flipped byte detected after a full download in {time.monotonic() - started:.1f}s")


def test_a_signature_by_another_key_is_refused(moto, cache, newer_model, store):
    attacker = minisign.KeyPair.generate()
    target = fresh_bucket(moto)
    _copy_version(store, target, "1.1.0", "1.1.0")
    raw = manifest_for(newer_model, "1.1.0").to_json()
    forged = sign_manifest(raw, attacker.secret_key)
    target.client.put_object(
        target.bucket, object_key(NAME, "1.1.0", "manifest.json.minisig"), io.BytesIO(forged), len(forged)
    )
    with pytest.raises(SignatureError, match="another key"):
        cache.sync(target, NAME)
    assert links(cache.root) == {"current": MODEL_SHA256}
    assert cache.partials(NAME) == []


def _copy_version(source: ModelStore, target: ModelStore, version: str, to_version: str) -> None:
    for filename in ("model.gguf", "manifest.json", "manifest.json.minisig"):
        target.client.copy_object(
            target.bucket,
            object_key(NAME, to_version, filename),
            CopySource(source.bucket, object_key(NAME, version, filename)),
        )


def test_a_signature_from_another_artifact_is_refused(moto, store, cache):
    target = fresh_bucket(moto)
    _copy_version(store, target, "1.1.0", "1.1.0")
    # The 1.0.0 signature (valid, same key) placed next to the 1.1.0 manifest.
    old_signature = store._read(object_key(NAME, "1.0.0", "manifest.json.minisig"))
    target.client.put_object(
        target.bucket,
        object_key(NAME, "1.1.0", "manifest.json.minisig"),
        io.BytesIO(old_signature),
        len(old_signature),
    )
    with pytest.raises(SignatureError, match="does not match the manifest"):
        cache.sync(target, NAME)
    assert links(cache.root) == {"current": MODEL_SHA256}
    assert cache.partials(NAME) == []


def test_an_older_version_published_as_newer_is_refused(moto, store, cache_root, keypair):
    cache = ModelCache(cache_root, keypair.public_key, progress_interval=3600)
    assert cache.sync(store, NAME, "1.1.0").changed
    target = fresh_bucket(moto)
    # A replay: the signed 1.0.0 release copied to 2.0.0, so "latest" would be the old model.
    _copy_version(store, target, "1.0.0", "2.0.0")
    with pytest.raises(VersionPolicyError, match=r"holds the signed manifest of gemma3-270m 1\.0\.0"):
        cache.sync(target, NAME)
    # And the genuine 1.0.0 offered as the newest is a downgrade, refused without an explicit rollback.
    _copy_version(store, target, "1.0.0", "1.0.0")
    with pytest.raises(VersionPolicyError, match=r"older than the active version 1\.1\.0"):
        cache.sync(target, NAME, "1.0.0")
    assert cache.current(NAME).version == "1.1.0"


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def fill_disk(path: Path) -> int:
    """Another writer takes every free byte, as a log storm would; returns the errno that stopped it."""
    with path.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError as exc:
            return exc.errno
    return 0


def test_disk_full_mid_download_keeps_the_old_model_and_leaves_no_partial(
    store, template_cache, keypair, tmp_path, capsys, monkeypatch
):
    mount = tmp_path / "small-disk"
    mounted = _mount_tmpfs(mount, 640)
    try:
        root = mount / "cache"
        shutil.copytree(
            template_cache, root, symlinks=True
        )  # a real copy: hard links cannot cross filesystems
        cache = ModelCache(root, keypair.public_key, progress_interval=3600)
        filler = mount / "filler"
        real_append = cache_module.ModelCache._append

        def append_then_fill(chunks, out, digest, progress, manifest):
            def chunks_filling_the_disk_at_half():
                for chunk in chunks:
                    yield chunk
                    if progress.done > manifest.size // 2 and not filler.exists():
                        if mounted:
                            assert fill_disk(filler) == errno.ENOSPC
                        else:
                            filler.write_bytes(b"simulated")
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            real_append(chunks_filling_the_disk_at_half(), out, digest, progress, manifest)

        monkeypatch.setattr(cache_module.ModelCache, "_append", staticmethod(append_then_fill))
        with pytest.raises(InsufficientSpaceError, match=r"disk full while downloading gemma3-270m 1\.1\.0"):
            cache.sync(store, NAME)
        assert links(root) == {"current": MODEL_SHA256}
        assert cache.partials(NAME) == []
        assert sorted(p.name for p in (root / "models" / NAME).iterdir() if not p.name.startswith(".")) == [
            MODEL_SHA256,
            "current",
        ]
        assert cache.verify_entry(cache.current(NAME), full=False).version == "1.0.0"
        how = "a 640 MB tmpfs filled up" if mounted else "ENOSPC simulated (tmpfs not mountable: not root)"
        figure(capsys, f"disk full at half of the download: {how}")
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


def test_a_stopped_store_leaves_the_active_model_and_reports_served_from_cache(
    tmp_path, test_model, keypair, key_files, cache_root, capsys, monkeypatch
):
    server = MotoServer(tmp_path).start()
    try:
        store = ModelStore(store_config(server.endpoint))
        store.ensure_bucket()
        publish(store, test_model, "1.0.0", keypair.secret_key)
        config = tmp_path / "agent.json"
        config.write_text(
            json.dumps(
                {
                    "endpoint": server.endpoint,
                    "secure": False,
                    "bucket": BUCKET,
                    "public_key": str(key_files["public"]),
                    "cache_root": str(cache_root),
                }
            )
        )
        monkeypatch.setenv("PIFARM_S3_ACCESS_KEY", ACCESS_KEY)
        monkeypatch.setenv("PIFARM_S3_SECRET_KEY", SECRET_KEY)
        argv = ["model", "sync", NAME, "--config", str(config), "--json"]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "unchanged"
    finally:
        server.stop()
    started = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 0
    assert result["status"] == "served-from-cache"
    assert result["sha256"] == MODEL_SHA256
    assert "store unreachable, serving cached model gemma3-270m 1.0.0" in result["message"]
    assert links(cache_root) == {"current": MODEL_SHA256}
    assert SECRET_KEY not in captured.out + captured.err
    figure(capsys, f"stopped store detected, cached model served, in {elapsed:.1f}s")
