"""Integration fixtures: the real test model, a moto S3 server, signing keys, a published store."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import minisign
import pytest
from host_cache import cached_llama_bin, cached_test_model
from integration_helpers import (
    MODEL_SHA256,
    NAME,
    MotoServer,
    free_port,
    publish,
    stop_process,
    store_config,
)

from pifarm_agent.cache import ModelCache
from pifarm_agent.store import ModelStore


@pytest.fixture(scope="session")
def test_model() -> Path:
    """The real GGUF: $PIFARM_TEST_MODEL, else scripts/test-model.sh fetches it. Never skipped."""
    model = cached_test_model()
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


# llama-server: the real binary from the llama.cpp build cache, serving the real test model.


class LlamaServer:
    """A llama-server process on a free local port, started with explicit --host and --port."""

    def __init__(self, bin_dir: Path, model: Path, log: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), *flags]
        with log.open("wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120) -> float:
        """Seconds until GET /health answered 200; fails with the log's tail when it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"llama-server not healthy within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process, timeout=30)


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """The llama.cpp build holding llama-server; skips when nothing is built (see host_cache)."""
    return cached_llama_bin("llama-server")


@pytest.fixture(scope="session")
def llama_server_factory(llama_bin, test_model, tmp_path_factory) -> Iterator:
    """Starts llama-servers on the test model with extra flags; all are stopped at the end of the session."""
    servers: list[LlamaServer] = []

    def start(*flags: str) -> LlamaServer:
        log = tmp_path_factory.mktemp("llama-server") / "server.log"
        server = LlamaServer(llama_bin, test_model, log, "-c", "2048", "-t", "2", *flags)
        servers.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(llama_server_factory) -> LlamaServer:
    """The shared server: two parallel slots, Prometheus metrics."""
    return llama_server_factory("-np", "2", "--metrics")
