"""A moto S3 server in a subprocess, a TCP proxy that can cut a connection part way, and helpers."""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pifarm_agent.manifest import Manifest
from pifarm_agent.signing import sign_manifest
from pifarm_agent.store import ModelStore, StoreConfig

ACCESS_KEY = "pifarm-itest-access"
SECRET_KEY = "pifarm-itest-secret-Zq7v0Xk2"

REPO = Path(__file__).resolve().parents[2]
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
NAME = "gemma3-270m"
BUCKET = "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def manifest_for(path: Path, version: str, sha256: str | None = None) -> Manifest:
    return Manifest(
        name=NAME,
        version=version,
        format="gguf",
        quantization="Q4_K_M",
        size=path.stat().st_size,
        sha256=sha256 or sha256_file(path),
        context_length=32768,
        memory_required_mb=512,
        npu_required=False,
        created="2026-03-01T12:00:00Z",
    )


def store_config(endpoint: str, bucket: str = BUCKET) -> StoreConfig:
    return StoreConfig(
        endpoint=endpoint,
        bucket=bucket,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        retries=1,
    )


def publish(store: ModelStore, path: Path, version: str, secret_key, sha256: str | None = None):
    raw = manifest_for(path, version, sha256).to_json()
    return store.publish(path, raw, sign_manifest(raw, secret_key), part_size=32 * 1024 * 1024)


def figure(capsys, text: str) -> None:
    """Measured figures go to the terminal even without -s."""
    with capsys.disabled():
        print(f"\n    [figures] {text}", end="")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """Terminate and reap ``process``; one still there after ``timeout`` seconds is killed."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """moto's S3-compatible server (the stand-in for MinIO, which is not obtainable here).

    ``check_credentials`` makes it authenticate every request like MinIO does (moto's
    INITIAL_NO_AUTH_ACTION_COUNT=0); it then knows no access key at all, so every
    request is refused with InvalidAccessKeyId.
    """

    def __init__(self, log_dir: Path, *, check_credentials: bool = False) -> None:
        self.port = free_port()
        self.log = log_dir / f"moto-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.check_credentials = check_credentials

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        env = dict(os.environ, MOTO_ALLOW_NONEXISTENT_REGION="true")
        if self.check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
        self.process = None


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to a target; counts the bytes sent back to clients and
    can close every connection once ``cut_after`` of them have passed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.downstream = 0
        self.cut_after: int | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset_counter(self) -> None:
        with self._lock:
            self.downstream = 0

    def close(self) -> None:
        self._stopping = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        sockets = [client, upstream]
        try:
            while True:
                readable = select.select(sockets, [], [], 30)[0]
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream:
                        if not self._pass_downstream(client, data):
                            return
                    else:
                        upstream.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def _pass_downstream(self, client: socket.socket, data: bytes) -> bool:
        with self._lock:
            if self.cut_after is not None and self.downstream + len(data) > self.cut_after:
                allowed = max(0, self.cut_after - self.downstream)
                self.downstream += allowed
                self.cut_after = None
                self.cuts += 1
                client.sendall(data[:allowed])
                # An abortive close, as when a link or the server goes away.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return False
            self.downstream += len(data)
        client.sendall(data)
        return True


def tree_state(root: Path) -> dict[str, tuple] | None:
    """Every path under ``root`` with its mode, size, mtime and link target; None when absent.

    Equal states before and after a command mean it created, removed, wrote and relinked nothing.
    """
    if not root.exists():
        return None
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        state[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns, target)
    return state


def agent_config(path: Path, endpoint: str, public_key: Path, cache_root: Path, **extra) -> Path:
    """An agent config file as the model_cache role writes it (credentials included unless given)."""
    data = {
        "endpoint": f"http://{endpoint}",
        "bucket": BUCKET,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "public_key": str(public_key),
        "cache_root": str(cache_root),
        **extra,
    }
    path.write_text(json.dumps(data))
    return path
