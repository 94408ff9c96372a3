"""A real nats-server with JetStream, the agent's worker as a process, and a watcher of the subjects.

The server's users are the ones the nats role will create: ``admin`` (no permissions block),
``producer`` and ``worker`` with the permission maps of pifarm_agent/nats_permissions.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats
import pytest
from integration_helpers import free_port, stop_process

from pifarm_agent.jobs import DEAD_PREFIX, JOBS_STREAM, RESULTS_PREFIX, names, nats_permissions

PASSWORDS = {
    "admin": "pifarm-itest-nats-admin-R4vq",
    "producer": "pifarm-itest-nats-producer-7Lw2",
    "worker": "pifarm-itest-nats-worker-Xp93",
}


def nats_server_bin() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None
    )
    if not found:
        pytest.fail(
            "nats-server is not installed (scripts/testbed.sh installs Debian's package)", pytrace=False
        )
    return found


def server_config(port: int, http_port: int, store_dir: Path) -> str:
    """A nats-server config: JetStream on, one account with the three users."""
    permissions = nats_permissions()
    users = [
        {"user": "admin", "password": PASSWORDS["admin"]},
        {"user": "producer", "password": PASSWORDS["producer"], "permissions": permissions["producer"]},
        {"user": "worker", "password": PASSWORDS["worker"], "permissions": permissions["worker"]},
    ]
    # nats-server's config format reads JSON values as they are.
    return "\n".join(
        [
            f'listen: "127.0.0.1:{port}"',
            f'http: "127.0.0.1:{http_port}"',
            'server_name: "pifarm-itest"',
            f"jetstream: {{store_dir: {json.dumps(str(store_dir))}, max_memory_store: 67108864,"
            " max_file_store: 1073741824}",
            f"accounts: {{PIFARM: {{jetstream: enabled, users: {json.dumps(users)}}}}}",
            "",
        ]
    )


class NatsServer:
    """nats-server on free loopback ports; ``restart`` keeps the ports and the JetStream store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.http_port = free_port()
        self.config = directory / "nats.conf"
        self.log = directory / "nats.log"
        self.config.write_text(server_config(self.port, self.http_port, directory / "jetstream"))
        self.process: subprocess.Popen[bytes] | None = None
        checked = subprocess.run(
            [nats_server_bin(), "-t", "-c", str(self.config)], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            pytest.fail(f"nats-server -t refused the config:\n{checked.stderr}{self.config.read_text()}")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def settings(self, user: str, **extra: Any) -> dict[str, Any]:
        return {"nats": {"servers": [self.url], "user": user, "password": PASSWORDS[user]}, **extra}

    def start(self) -> NatsServer:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [nats_server_bin(), "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        """/healthz answers 200 once JetStream has loaded its streams."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"nats-server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"nats-server not healthy within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
        self.process = None


class Watch:
    """An admin connection on its own thread: sees every result and dead letter, answers JetStream queries."""

    def __init__(self, server: NatsServer) -> None:
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.dead: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.nc = self.call(self._connect(server))

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _connect(self, server: NatsServer) -> Any:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        nc = await nats.connect(
            server.url,
            user="admin",
            password=PASSWORDS["admin"],
            error_cb=on_error,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        await nc.subscribe(f"{RESULTS_PREFIX}.>", cb=self._on_result)
        await nc.subscribe(f"{DEAD_PREFIX}.>", cb=self._on_dead)
        await nc.flush()
        return nc

    async def _on_result(self, message: Any) -> None:
        body = json.loads(message.data)
        body["_subject"] = message.subject
        with self._lock:
            self.results[body.get("id", "?")].append(body)

    async def _on_dead(self, message: Any) -> None:
        body = json.loads(message.data)
        body["_subject"] = message.subject
        with self._lock:
            self.dead.append(body)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = check()
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def result_count(self, job_id: str) -> int:
        with self._lock:
            return len(self.results.get(job_id, []))

    def dead_for(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [letter for letter in self.dead if letter.get("id") == job_id]

    def consumer(self, model: str) -> Any:
        return self.call(self.nc.jetstream().consumer_info(JOBS_STREAM, names(model).consumer))

    def stream(self, name: str) -> Any:
        return self.call(self.nc.jetstream().stream_info(name))

    def publish_job(self, model: str, data: bytes, msg_id: str | None = None) -> Any:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        return self.call(self.nc.jetstream().publish(names(model).job_subject, data, headers=headers))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.nc.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def agent(*argv: str, stdin: str | None = None, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """``pifarm-agent job ...`` as a process: exit code, the JSON answer, stderr."""
    command = [sys.executable, "-m", "pifarm_agent.cli", "job", *argv, "--json"]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        payload = {"_stdout": done.stdout}
    return done.returncode, payload, done.stderr


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


class WorkerProcess:
    """``pifarm-agent job worker`` with its own config, log file and metrics port."""

    def __init__(
        self,
        directory: Path,
        server: NatsServer,
        node: str,
        models: list[dict[str, Any]],
        **extra: Any,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.models = [model["name"] for model in models]
        self.metrics_port = free_port()
        self.log = directory / f"worker-{node}.log"
        self.config = write_json(
            directory / f"worker-{node}.json",
            {
                "node": node,
                **server.settings("worker"),
                "models": models,
                "metrics_address": "127.0.0.1",
                "metrics_port": self.metrics_port,
                **extra,
            },
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pifarm_agent.cli",
                    "job",
                    "worker",
                    "--config",
                    str(self.config),
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )

    def wait_ready(self, timeout: float = 20) -> None:
        """Every model's consumer is bound (the worker logs ``pulling from`` for each)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker {self.node} exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if self.log_text().count("pulling from") >= len(self.models):
                return
            time.sleep(0.05)
        raise AssertionError(f"worker {self.node} not ready within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        samples = {}
        for line in text.splitlines():
            match = re.match(r"^(pifarm_worker_\S+) (\S+)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> tuple[int, dict[str, Any]]:
        stdout, _stderr = self.process.communicate(timeout=timeout)
        try:
            answer = json.loads(stdout)
        except ValueError:
            answer = {"_stdout": stdout.decode(errors="replace")}
        return self.process.returncode, answer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


class BlackHole:
    """A port that accepts connections and never answers: a generation that does not end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        self.listener.close()


class SlowProxy:
    """Forwards POSTs to a llama-server after ``delay`` seconds (a generation longer than ack_wait),
    and notes each request's path in ``paths``."""

    def __init__(self, target: str, delay: float) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.paths.append(self.path)
                time.sleep(proxy.delay)
                request = urllib.request.Request(
                    target + self.path, data=body, headers={"Content-Type": "application/json"}
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.delay = delay
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"
