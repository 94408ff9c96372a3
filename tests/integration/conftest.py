"""Integration fixtures: the real test model, a moto S3 server, signing keys, a published store."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import minisign
import pytest
from integration_helpers import (
    MODEL_SHA256,
    NAME,
    REPO,
    MotoServer,
    publish,
    store_config,
)

from pifarm_agent.cache import ModelCache
from pifarm_agent.store import ModelStore


@pytest.fixture(scope="session")
def test_model() -> Path:
    """The real GGUF: $PIFARM_TEST_MODEL, else scripts/test-model.sh fetches it. Never skipped."""
    path = os.environ.get("PIFARM_TEST_MODEL")
    if not path:
        result = subprocess.run(
            [str(REPO / "scripts" / "test-model.sh")], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            pytest.fail(
                f"scripts/test-model.sh could not provide the test model:\n{result.stderr}", pytrace=False
            )
        path = result.stdout.strip().splitlines()[-1]
    model = Path(path)
    if not model.is_file():
        pytest.fail(
            f"test model {model} does not exist (PIFARM_TEST_MODEL or scripts/test-model.sh)", pytrace=False
        )
    if model.stat().st_size < 200_000_000:
        pytest.fail(
            f"test model {model} is {model.stat().st_size} bytes, not the 238 MB Gemma 3 270M", pytrace=False
        )
    return model


@pytest.fixture(scope="session")
def newer_model(test_model: Path, tmp_path_factory) -> Path:
    """A second, distinct artifact of the same size class: the real model with 4 KiB appended."""
    path = tmp_path_factory.mktemp("newer") / "model.gguf"
    shutil.copyfile(test_model, path)
    with path.open("ab") as handle:
        handle.write(b"pifarm-test-1.1.0".ljust(4096, b"\0"))
    return path


@pytest.fixture(scope="session")
def keypair() -> minisign.KeyPair:
    return minisign.KeyPair.generate()


@pytest.fixture(scope="session")
def key_files(keypair, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("keys")
    (directory / "model.pub").write_bytes(bytes(keypair.public_key) + b"\n")
    (directory / "model.key").write_bytes(bytes(keypair.secret_key) + b"\n")
    return {"public": directory / "model.pub", "secret": directory / "model.key"}


@pytest.fixture(scope="session")
def moto(tmp_path_factory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    """Seconds measured by session fixtures, printed by the tests that use them."""
    return {}


@pytest.fixture(scope="session")
def store(moto, test_model, newer_model, keypair, timings) -> ModelStore:
    """The shared store: the real model as 1.0.0 and the newer artifact as 1.1.0."""
    store = ModelStore(store_config(moto.endpoint))
    store.ensure_bucket()
    started = time.monotonic()
    first = publish(store, test_model, "1.0.0", keypair.secret_key)
    second = publish(store, newer_model, "1.1.0", keypair.secret_key)
    assert first.changed
    assert second.changed
    timings["publish"] = time.monotonic() - started
    return store


@pytest.fixture(scope="session")
def template_cache(store, keypair, tmp_path_factory, timings) -> Path:
    """A cache with 1.0.0 synced and current; tests clone it with hard links (entries are immutable)."""
    root = tmp_path_factory.mktemp("template-cache")
    cache = ModelCache(root, keypair.public_key, progress_interval=3600)
    started = time.monotonic()
    result = cache.sync(store, NAME, "1.0.0")
    assert result.status == "changed"
    assert result.sha256 == MODEL_SHA256
    timings["first_sync"] = time.monotonic() - started
    return root


@pytest.fixture
def cache_root(template_cache, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(template_cache, root, symlinks=True, copy_function=os.link)
    return root


@pytest.fixture
def cache(cache_root, keypair) -> ModelCache:
    return ModelCache(cache_root, keypair.public_key, progress_interval=3600)
