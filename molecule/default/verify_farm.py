"""Measures the running farm's front door (HAProxy) and job router (NATS) from the controller.

verify.yml runs it with one argument: a JSON settings file (mode 0600, credentials
included) naming the gateway's URLs, the nodes and their llama-server instances, the
offload pool's container and the NATS users. The nodes' services are stopped and started
with ``docker exec ... systemctl``, as an operator or a crash would. Each case prints
``[figures]`` lines; the exit status is 1 when any case failed, with the reasons last.
Nothing here asserts a duration: times are printed, only outcomes are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import http.client
import io
import json
import math
import re
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
import requests
from prometheus_client.parser import text_string_to_metric_families

from measuring import SteadyLoad, expect, figure, finish, metric_samples
from pifarm_agent.jobs import DEAD_PREFIX, RESULTS_PREFIX, names, token

SHORT_PROMPT = "The capital of France is"
# About 3000 tokens: above the 1024-token context of one slot.
LONG_PROMPT = "word " * 3000
HTTP_TIMEOUT = 120


@dataclass(frozen=True)
class Answer:
    status: int
    server: str
    seconds: float
    body: dict[str, Any] | None


@dataclass(frozen=True)
class EdgeServer:
    node: str
    instance: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.node}_{self.instance}"

    @property
    def unit(self) -> str:
        return f"pifarm-llama@{self.instance}.service"


def edge_backend(model: str) -> str:
    """gateway_haproxy's backend of a model: the model's token, as its NATS subjects use it."""
    return "edge_" + token(model)


class Farm:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        gateway = settings["gateway"]
        self.url = gateway["url"]
        self.stats_url = gateway["stats_url"]
        self.stats_auth = (gateway["stats_user"], gateway["stats_password"])
        self.timeout_queue = gateway["timeout_queue"]
        self.timeout_http_request = gateway["timeout_http_request"]
        self.max_body_bytes = gateway["max_body_bytes"]
        self.max_tokens = gateway["max_tokens"]
        self.servers = [
            EdgeServer(node, instance["name"], instance["model"])
            for node, instances in settings["nodes"].items()
            for instance in instances
        ]
        self.model = self.servers[0].model
        self.servers = [server for server in self.servers if server.model == self.model]
        self.backend = edge_backend(self.model)
        self.slots = sum(
            instance.get("slots", 1)
            for instances in settings["nodes"].values()
            for instance in instances
            if instance["model"] == self.model
        )

    # --- the gateway -------------------------------------------------------
    def complete(
        self, prompt: str = SHORT_PROMPT, n_predict: int = 4, headers: dict | None = None, **extra
    ) -> Answer:
        body = {"model": self.model, "prompt": prompt, "n_predict": n_predict, **extra}
        return self.post(json.dumps(body).encode(), headers)

    def post(self, data: bytes, headers: dict | None = None, path: str = "/completion") -> Answer:
        started = time.monotonic()
        try:
            response = requests.post(
                self.url + path,
                data=data,
                headers={"Content-Type": "application/json", **(headers or {})},
                timeout=HTTP_TIMEOUT,
            )
        except requests.RequestException as exc:
            return Answer(0, f"client error: {type(exc).__name__}", time.monotonic() - started, None)
        try:
            body = response.json()
        except ValueError:
            body = None
        return Answer(
            response.status_code,
            response.headers.get("X-Pifarm-Server", ""),
            time.monotonic() - started,
            body,
        )

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        response = requests.get(self.stats_url, auth=self.stats_auth, timeout=10)
        response.raise_for_status()
        rows = csv.DictReader(io.StringIO(response.text.lstrip("# ")))
        return {(row["pxname"], row["svname"]): row for row in rows}

    def status(self, backend: str, server: str) -> str:
        return self.stats()[(backend, server)]["status"]

    def wait_status(self, backend: str, server: str, wanted: str, timeout: float = 60) -> float:
        """Seconds until HAProxy shows the server in the wanted state (its checks, not ours)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.status(backend, server) == wanted:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(
            f"{backend}/{server} not {wanted} after {timeout:.0f} s (is {self.status(backend, server)})"
        )

    # --- the hosts -----------------------------------------------------------
    @staticmethod
    def docker(*argv: str) -> str:
        done = subprocess.run(["docker", *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"docker {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def systemctl(self, node: str, *argv: str) -> str:
        return self.docker("exec", node, "systemctl", *argv)

    def service_state(self) -> dict[str, str]:
        """MainPID and NRestarts of every llama-server: a crash or restart changes them."""
        return {
            server.name: self.systemctl(
                server.node, "show", "-p", "MainPID", "-p", "NRestarts", "--value", server.unit
            ).replace("\n", "/")
            for server in self.servers
        }

    def all_edge_up(self) -> None:
        for server in self.servers:
            self.wait_status(self.backend, server.name, "UP")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# --- the cases ---------------------------------------------------------------
def case_exporter(farm: Farm) -> None:
    """Each node's farm exporter names the model version its llama-server serves: the cache's current."""
    exporter = farm.settings["exporter"]
    for server in farm.servers:
        text = requests.get(exporter["urls"][server.node], timeout=10).text
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
        exported = next(
            (
                sample.labels
                for sample in samples
                if sample.name == "pifarm_model_active_info"
                and sample.labels.get("server") == server.instance
            ),
            {},
        )
        current = farm.docker(
            "exec", server.node, "readlink", f"{exporter['models_dir']}/{server.model}/current"
        )
        running = {
            sample.labels["service"]: sample.value
            for sample in samples
            if sample.name == "pifarm_service_running"
        }
        figure(
            f"farm exporter on {server.node}: {server.instance} serves {exported.get('model')}"
            f" {exported.get('version')} sha256 {exported.get('sha256', '')[:12]};"
            f" cache current {current[:12]}; services running {running}"
        )
        expect(
            exported.get("sha256") == current,
            f"exporter: {server.node}'s active sha256 is the cache's current",
        )
        expect(
            set(running.values()) == {1.0}, f"exporter: {server.node}'s llama-server and worker are running"
        )
    # The gateway's: HAProxy and nats-server, and the job queue of every served model.
    gateway = exporter["gateway"]
    samples = metric_samples(exporter["urls"][gateway])
    running = {
        dict(labels)["service"]: v
        for (name, labels), v in samples.items()
        if name == "pifarm_service_running"
    }
    pending = {
        dict(labels)["consumer"]: v
        for (name, labels), v in samples.items()
        if name == "pifarm_nats_consumer_pending_messages"
    }
    available = samples.get(("pifarm_nats_jetstream_available", ()))
    figure(
        f"farm exporter on {gateway}: services running {running}; JetStream available {available};"
        f" jobs waiting per consumer {pending}"
    )
    expect(
        running == {"haproxy": 1.0, "nats": 1.0}, f"exporter: {gateway}'s HAProxy and nats-server are running"
    )
    expect(available == 1.0, f"exporter: {gateway}'s job router takes jobs")
    consumers = {names(server.model).consumer for server in farm.servers}
    expect(consumers <= set(pending), f"exporter: {gateway} reports the queue of {sorted(consumers)}")


def edge_histogram(farm: Farm) -> tuple[float, float]:
    """Count and sum of the gateway exporter's latency histogram for the edge backend, answered requests."""
    exporter = farm.settings["exporter"]
    samples = metric_samples(exporter["urls"][exporter["gateway"]])

    def total(name: str) -> float:
        # Summed over the backend's servers (the histogram has one series per server).
        return sum(
            value
            for (sample, labels), value in samples.items()
            if sample == name and {("backend", farm.backend), ("code_class", "2xx")} <= set(labels)
        )

    return total("pifarm_edge_request_duration_seconds_count"), total(
        "pifarm_edge_request_duration_seconds_sum"
    )


def case_spread(farm: Farm) -> None:
    before = edge_histogram(farm)
    answers = [farm.complete() for _ in range(16)]
    # HAProxy sends each line as the response ends; the exporter counts it within milliseconds.
    time.sleep(1)
    after = edge_histogram(farm)
    statuses = Counter(answer.status for answer in answers)
    servers = Counter(answer.server for answer in answers)
    figure(f"spread: 16 requests through HAProxy, statuses {dict(statuses)}, servers {dict(servers)}")
    expect(statuses == Counter({200: 16}), f"spread: every request answered 200, got {dict(statuses)}")
    expected = {f"{farm.backend}/{server.name}" for server in farm.servers}
    expect(
        set(servers) == expected, f"spread: answered by {sorted(servers)}, expected all of {sorted(expected)}"
    )
    text = answers[0].body.get("content", "") if answers[0].body else ""
    expect(bool(text.strip()), "spread: the answer has text")
    counted = after[0] - before[0]
    haproxy_seconds = after[1] - before[1]
    client_seconds = sum(answer.seconds for answer in answers)
    figure(
        f"edge latency histogram: {counted:.0f} of 16 requests counted; HAProxy's Ta sum"
        f" {haproxy_seconds:.3f} s, the client's {client_seconds:.3f} s"
        f" (ratio {haproxy_seconds / client_seconds:.3f})"
    )
    expect(counted == 16, f"edge latency: the gateway exporter counted every request ({counted:.0f} of 16)")
    expect(
        0.5 * client_seconds <= haproxy_seconds <= client_seconds,
        "edge latency: HAProxy's request times are within the client's (and above half of them)",
    )


def oversize_request(farm: Farm) -> int:
    """Sends a body above the limit while reading the answer: HAProxy answers before taking it all."""
    parts = urlsplit(farm.url)
    body = b'{"prompt": "' + b"a" * (farm.max_body_bytes + 100_000) + b'"}'
    head = (
        f"POST /completion HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sender = threading.Thread(target=_send_ignoring_reset, args=(sock, head + body), daemon=True)
        sender.start()
        first = sock.makefile("rb").readline().decode(errors="replace")
    match = re.match(r"HTTP/1\.[01] (\d{3})", first)
    return int(match.group(1)) if match else 0


def chunked_request(farm: Farm, total: int) -> int:
    """A chunked body of ``total`` bytes (no Content-Length), its answer read while it is sent."""
    parts = urlsplit(farm.url)
    head = (
        f"POST /completion HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    chunk = b"a" * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"

    def send(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            opening = b'{"prompt": "'
            sock.sendall(head + b"%x\r\n" % len(opening) + opening + b"\r\n")
            for _ in range(total // len(chunk)):
                sock.sendall(frame)
            sock.sendall(b'3\r\n"}\n\r\n0\r\n\r\n')

    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        threading.Thread(target=send, args=(sock,), daemon=True).start()
        first = sock.makefile("rb").readline().decode(errors="replace")
    match = re.match(r"HTTP/1\.[01] (\d{3})", first)
    return int(match.group(1)) if match else 0


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def case_bad_requests(farm: Farm) -> None:
    before = farm.service_state()
    cases: dict[str, Callable[[], int]] = {
        "malformed JSON": lambda: farm.post(b'{"prompt": "hi", "n_predict": ').status,
        "oversize body": lambda: oversize_request(farm),
        "prompt longer than the context": lambda: farm.complete(LONG_PROMPT).status,
        "negative n_predict": lambda: farm.complete(n_predict=-5).status,
    }
    all_statuses: Counter[int] = Counter()
    for label, send in cases.items():
        statuses = Counter(send() for _ in range(3))
        all_statuses.update(statuses)
        figure(f"bad request, {label}: statuses {dict(statuses)}")
        expect(
            all(400 <= status < 500 for status in statuses), f"{label}: 4xx expected, got {dict(statuses)}"
        )
    after = farm.service_state()
    server_errors = sum(count for status, count in all_statuses.items() if status >= 500 or status == 0)
    figure(
        f"bad requests: {sum(all_statuses.values())} sent,"
        f" 4xx {sum(c for s, c in all_statuses.items() if 400 <= s < 500)},"
        f" 5xx {server_errors}, llama-server restarts {sum(before[k] != after[k] for k in before)}"
    )
    expect(before == after, f"bad requests restarted a llama-server: {before} -> {after}")
    expect(farm.complete().status == 200, "a normal request after the bad ones")

    # The gateway, not llama-server, must refuse these: a 16 KiB buffer passed a chunked body of any
    # size, and llama-server lets a request's own n_predict win over its --n-predict.
    chunked = chunked_request(farm, 50 * 1024 * 1024)
    greedy = farm.complete(n_predict=farm.max_tokens + 1)
    greedy_chat = farm.post(
        json.dumps(
            {"model": farm.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}
        ).encode(),
        path="/v1/chat/completions",
    )
    refusal = (greedy.body or {}).get("error", {}).get("message")
    figure(
        f"gateway limits: a chunked 50 MB body -> {chunked}; n_predict {farm.max_tokens + 1} ->"
        f" {greedy.status} ({refusal}); chat max_tokens 100000 -> {greedy_chat.status}"
    )
    expect(chunked == 413, f"a chunked 50 MB body gets 413, got {chunked}")
    expect(
        greedy.status == 400 and greedy_chat.status == 400,
        f"the gateway refuses more than {farm.max_tokens} tokens: {greedy}, {greedy_chat}",
    )

    # Model names as OpenAI clients expect them: a model the farm does not serve is not answered by
    # the default one, and /v1/models lists the farm's models, not one node's.
    unknown = farm.post(
        json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        path="/v1/chat/completions",
    )
    code = ((unknown.body or {}).get("error") or {}).get("code")
    listing = requests.get(farm.url + "/v1/models", timeout=10)
    listed = sorted(item["id"] for item in listing.json().get("data", [])) if listing.ok else []
    edge_models = {item["model"] for instances in farm.settings["nodes"].values() for item in instances}
    served = sorted(edge_models | set(farm.settings["offload"]["models"]))
    figure(f"model names: 'gpt-4o' -> {unknown.status} ({code}); /v1/models {listing.status_code}: {listed}")
    expect(unknown.status == 404 and code == "model_not_found", f"an unknown model gets 404: {unknown}")
    expect(listed == served, f"/v1/models lists every served model {served}, got {listed}")


def slow_client(farm: Farm, results: list[tuple[int, float]]) -> None:
    """A slowloris client: the request head one header a second, never finished."""
    parts = urlsplit(farm.url)
    started = time.monotonic()
    status = 0
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(f"POST /completion HTTP/1.1\r\nHost: {parts.hostname}\r\n".encode())
            sock.settimeout(1)
            deadline = started + farm.timeout_http_request * 4
            while time.monotonic() < deadline:
                try:
                    first = sock.recv(64)
                except TimeoutError:
                    sock.sendall(b"X-Slow: 1\r\n")
                    continue
                match = re.match(rb"HTTP/1\.[01] (\d{3})", first)
                status = int(match.group(1)) if match else -1
                break
    except OSError:
        status = -1
    results.append((status, time.monotonic() - started))


def case_slowloris(farm: Farm) -> None:
    baseline = [farm.complete().seconds for _ in range(8)]
    results: list[tuple[int, float]] = []
    clients = [threading.Thread(target=slow_client, args=(farm, results)) for _ in range(50)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    during = [farm.complete() for _ in range(8)]
    for client in clients:
        client.join()
    statuses = Counter(status for status, _ in results)
    figure(
        f"slowloris: 50 sockets sending one header a second -> {dict(statuses)} after"
        f" {ms(min(s for _, s in results))}-{ms(max(s for _, s in results))} (timeout http-request"
        f" {farm.timeout_http_request} s); normal requests p50 {ms(statistics.median(baseline))} before,"
        f" {ms(statistics.median(a.seconds for a in during))} during"
    )
    expect(statuses == Counter({408: 50}), f"slowloris: every slow socket gets 408, got {dict(statuses)}")
    expect(
        all(answer.status == 200 for answer in during),
        "slowloris: normal requests answered during the attack",
    )


def case_queue(farm: Farm) -> None:
    before = farm.service_state()
    probe = farm.complete(n_predict=32)
    per_second = float((probe.body or {}).get("timings", {}).get("predicted_per_second") or 20)
    # Two slots share a node's core: each runs at about half the single-request rate. Every
    # admitted request runs well past timeout queue, so the waiting ones time out.
    n_predict = max(64, min(900, math.ceil(per_second / 2 * farm.timeout_queue * 2.5)))
    load = farm.slots * 3
    with ThreadPoolExecutor(max_workers=load) as pool:
        answers = list(pool.map(lambda _: farm.complete(n_predict=n_predict, ignore_eos=True), range(load)))
    statuses = Counter(answer.status for answer in answers)
    refused = [answer.seconds for answer in answers if answer.status == 503]
    qmax = farm.stats()[(farm.backend, "BACKEND")]["qmax"]
    figure(
        f"queue: {load} concurrent requests (3x {farm.slots} slots, {n_predict} tokens each at"
        f" ~{per_second:.0f} tok/s single) -> statuses {dict(statuses)}; 503 after"
        f" {ms(min(refused)) if refused else '-'}..{ms(max(refused)) if refused else '-'} of waiting"
        f" (timeout queue {farm.timeout_queue} s, max queue wait {ms(max(refused)) if refused else '-'});"
        f" HAProxy queue max {qmax}"
    )
    expect(set(statuses) <= {200, 503}, f"queue: only 200 and 503 expected, got {dict(statuses)}")
    expect(
        statuses[200] >= farm.slots, f"queue: at least the {farm.slots} slots answered, got {dict(statuses)}"
    )
    expect(statuses[503] > 0, f"queue: the excess gets 503 after timeout queue, got {dict(statuses)}")
    expect(before == farm.service_state(), "queue: no llama-server restarted")


def steady_load(farm: Farm, clients: int) -> SteadyLoad:
    """Clients sending short non-streaming requests through the gateway back to back."""
    return SteadyLoad(lambda: farm.complete(n_predict=8), clients)


def case_failover(farm: Farm) -> None:
    """A node's llama-server stops under load. Nothing fails: connection failures, and the requests
    running on it when it goes (closed without an answer), are retried on the other node. The stop
    itself ends within llama_server_stop_timeout even when llama-server hangs in its exit clean-up."""
    victim = farm.servers[0]
    try:
        with steady_load(farm, clients=max(1, farm.slots - 1)) as load:
            time.sleep(3)
            stop_began = time.monotonic()
            stopping = threading.Thread(target=farm.systemctl, args=(victim.node, "stop", victim.unit))
            stopping.start()
            marked_down = farm.wait_status(farm.backend, victim.name, "DOWN", timeout=60)
            down_at = time.monotonic()
            time.sleep(4)
        stopping.join()
        stop_took = time.monotonic() - stop_began
        failed = [a for sent, a in load.answers if sent >= stop_began and a.status != 200]
        after = sum(1 for sent, _ in load.answers if sent >= down_at)
        servers = Counter(answer.server for _, answer in load.answers if answer.status == 200)
        figure(
            f"failover: {victim.unit} on {victim.node} stopped under load; HAProxy marked it DOWN"
            f" {marked_down:.1f} s after the stop began (the stop itself took {stop_took:.1f} s);"
            f" requests sent {len(load.answers)}, {after} after DOWN; failed from the stop on"
            f" {len(failed)}; answered by {dict(servers)}"
        )
        expect(not failed, f"failover: {len(failed)} requests failed from the stop on: {failed[:3]}")
        expect(after > 0, "failover: requests were sent after DOWN")
        expect(stop_took <= 15, f"failover: the stop ended within its timeout, took {stop_took:.1f} s")
    finally:
        farm.systemctl(victim.node, "start", victim.unit)
    back = farm.wait_status(farm.backend, victim.name, "UP", timeout=90)
    figure(f"failover: {victim.name} back UP {back:.1f} s after its start")


def case_crash(farm: Farm) -> None:
    """kill -9 of a llama-server while it runs a request, under steady load. systemd starts it again
    within seconds, before HAProxy's checks mark it down: the request it was running (closed without
    an answer) and its "Loading model" 503s are retried on the other node, so none fails."""
    victim = farm.servers[0]
    with steady_load(farm, clients=max(1, farm.slots - 1)) as load:
        time.sleep(2)
        deadline = time.monotonic() + 30
        while farm.stats()[(farm.backend, victim.name)]["scur"] == "0" and time.monotonic() < deadline:
            time.sleep(0.05)  # until a request runs on it
        restarts = farm.service_state()[victim.name].split("/")[1]
        killed_at = time.monotonic()
        farm.systemctl(victim.node, "kill", "--signal=KILL", victim.unit)
        restarted = None
        while time.monotonic() - killed_at < 30:
            state = farm.systemctl(victim.node, "show", "-p", "ActiveState", "--value", victim.unit)
            if state == "active" and farm.service_state()[victim.name].split("/")[1] != restarts:
                restarted = time.monotonic() - killed_at
                break
            time.sleep(0.2)
        up = farm.wait_status(farm.backend, victim.name, "UP", timeout=90)
        time.sleep(3)
    failed = [a for sent, a in load.answers if a.status != 200]
    after = [a for sent, a in load.answers if sent >= killed_at]
    figure(
        f"crash: {victim.unit} on {victim.node} killed (SIGKILL) with a request running on it, under steady"
        f" load; systemd restarted it after {restarted if restarted is None else round(restarted, 1)} s,"
        f" UP {up:.1f} s later; requests from the kill on {len(after)}, failed {len(failed)}"
        f" ({dict(Counter(a.status for a in failed))})"
    )
    expect(not failed, f"crash: {len(failed)} requests failed: {[(a.status, a.body) for a in failed[:3]]}")


def offload_status_without_key(address: str, offload: dict[str, Any]) -> int:
    """The offload pool asked directly, over TLS checked against the test CA, without its key."""
    context = ssl.create_default_context(cafile=offload["ca_file"])
    # Reached by IP from here; the name in its certificate is the one HAProxy checks (check-sni).
    context.check_hostname = False
    connection = http.client.HTTPSConnection(address, offload["port"], timeout=30, context=context)
    try:
        connection.request(
            "POST",
            "/completion",
            body=json.dumps({"prompt": "hi", "n_predict": 1}),
            headers={"Content-Type": "application/json"},
        )
        return connection.getresponse().status
    finally:
        connection.close()


def case_offload(farm: Farm) -> None:
    offload = farm.settings["offload"]
    offload_ip = farm.docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", offload["container"]
    )
    unauthenticated = offload_status_without_key(offload_ip, offload)
    farm.wait_status("offload", offload["server"], "UP", timeout=60)
    edge_before = Counter(farm.complete(headers={}).server.split("/")[0] for _ in range(4))
    hinted = farm.complete(headers={"X-Pifarm-Offload": "1"})
    figure(
        f"offload pool: llama-server with an API key behind TLS, without the key {unauthenticated};"
        f" through the gateway (key added by HAProxy) with the hint header -> {hinted.status}"
        f" from {hinted.server}; without the hint, edge pools {dict(edge_before)}"
    )
    expect(
        unauthenticated == 401, f"the offload pool refuses requests without its key, got {unauthenticated}"
    )
    expect(hinted.status == 200 and hinted.server.startswith("offload/"), f"hint header -> offload: {hinted}")
    expect(
        set(edge_before) == {farm.backend}, f"requests without the hint stay on the edge: {dict(edge_before)}"
    )
    # The model key after 20 KB of body (the OpenAI SDK sends messages first): routed by it still.
    padded = {"prompt": SHORT_PROMPT, "n_predict": 4, "metadata": "x" * 20_480, "model": offload["model"]}
    routed = farm.post(json.dumps(padded).encode())
    figure(
        f"offload: model {offload['model']} named after 20 KB of body -> {routed.status} from {routed.server}"
    )
    expect(
        routed.status == 200 and routed.server.startswith("offload/"),
        f"a model named after 20 KB reaches its backend: {routed}",
    )

    try:
        for server in farm.servers:
            farm.systemctl(server.node, "stop", server.unit)
        down = max(farm.wait_status(farm.backend, server.name, "DOWN", timeout=30) for server in farm.servers)
        during = [farm.complete() for _ in range(4)]
        figure(
            f"offload: edge pool stopped (all DOWN after {down:.1f} s) -> "
            f"{dict(Counter((a.status, a.server) for a in during))}"
        )
        expect(
            all(a.status == 200 and a.server.startswith("offload/") for a in during),
            "edge down: requests answered by the offload pool",
        )
    finally:
        for server in farm.servers:
            farm.systemctl(server.node, "start", server.unit)
    started = time.monotonic()
    farm.all_edge_up()
    back = [farm.complete() for _ in range(4)]
    figure(
        f"offload: edge back UP {time.monotonic() - started:.1f} s after the start, no operator action ->"
        f" {dict(Counter((a.status, a.server) for a in back))}"
    )
    expect(
        all(a.status == 200 and a.server.startswith(farm.backend + "/") for a in back),
        "edge back: served there",
    )

    farm.docker("stop", "-t", "1", offload["container"])
    offload_down = farm.wait_status("offload", offload["server"], "DOWN", timeout=30)
    with steady_load(farm, clients=2) as load:
        hinted_while_down = [farm.complete(headers={"X-Pifarm-Offload": "1"}) for _ in range(6)]
    answers = [answer for _, answer in load.answers] + hinted_while_down
    pools = Counter((a.status, a.server.split("/")[0]) for a in answers)
    figure(
        f"offload pool down (DOWN after {offload_down:.1f} s): {len(answers)} requests"
        f" ({len(hinted_while_down)} with the hint) -> {dict(pools)}"
    )
    expect(
        all(a.status == 200 and a.server.startswith(farm.backend + "/") for a in answers),
        "offload down: every request stays on the edge and is answered",
    )


class Watcher:
    """Results and dead letters as they are published, seen with the admin user."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.results: Counter[str] = Counter()
        self.dead: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> Watcher:
        admin = self.settings["admin"]
        self.nc = await nats.connect(self.settings["servers"], user=admin["user"], password=admin["password"])
        await self.nc.subscribe(f"{RESULTS_PREFIX}.>", cb=self.on_result)
        await self.nc.subscribe(f"{DEAD_PREFIX}.>", cb=self.on_dead)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.drain()

    async def on_result(self, msg) -> None:
        self.results[msg.subject.rsplit(".", 1)[-1]] += 1

    async def on_dead(self, msg) -> None:
        letter = json.loads(msg.data)
        self.dead[letter.get("id", "?")] = letter

    async def wait(self, what: str, done: Callable[[], bool], timeout: float) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{what}: not within {timeout:.0f} s")
            await asyncio.sleep(0.2)
        return time.monotonic() - started


def submit(settings: dict[str, Any], model: str, prompt: str, job_id: str, n_predict: int) -> None:
    producer = {"servers": settings["servers"], **settings["producer"]}
    done = subprocess.run(
        ["pifarm-agent", "job", "submit", "--no-wait", "--model", model, "--prompt", prompt,
         "--id", job_id, "--n-predict", str(n_predict)],
        input=json.dumps({"nats": producer}), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"job submit {job_id}: {done.stdout} {done.stderr}")


async def case_jobs(farm: Farm) -> None:
    settings = farm.settings["nats"]
    unit = farm.settings["worker_unit"]
    victim, *others = list(farm.settings["nodes"])
    run = uuid.uuid4().hex[:8]
    async with Watcher(settings) as watch:
        for node in others:
            farm.systemctl(node, "stop", unit)
        try:
            ids = [f"verify-kill-{run}-{n}" for n in range(3)]
            for job_id in ids:
                submit(settings, farm.model, "Write a long story about a lighthouse.", job_id, 160)
            await asyncio.sleep(1.5)
            farm.systemctl(victim, "kill", "-s", "SIGKILL", unit)
            killed = time.monotonic()
            for node in others:
                farm.systemctl(node, "start", unit)
            await watch.wait("every job answered", lambda: all(watch.results[i] for i in ids), timeout=90)
            answered = time.monotonic() - killed
            await asyncio.sleep(3)
        finally:
            for node in others:
                farm.systemctl(node, "start", unit)
        lost = sum(1 for i in ids if watch.results[i] == 0)
        duplicates = sum(max(0, watch.results[i] - 1) for i in ids)
        figure(
            f"jobs: worker on {victim} SIGKILLed mid-job; {len(ids)} jobs, lost {lost},"
            f" duplicates {duplicates}, all answered {answered:.1f} s after the kill"
        )
        expect(lost == 0 and duplicates == 0, f"jobs: exactly once, lost {lost} duplicates {duplicates}")

        failing = f"verify-dead-{run}"
        submit(settings, farm.model, LONG_PROMPT, failing, 8)
        took = await watch.wait("the failing job's dead letter", lambda: failing in watch.dead, timeout=60)
        letter = watch.dead[failing]
        figure(
            f"jobs: a job that always fails is on {names(farm.model).dead_subject} after {took:.1f} s,"
            f" {letter.get('deliveries')} deliveries: {letter.get('reason', '')[:120]}"
        )
        expect(watch.results[failing] == 0, "the failing job has no result")


def case_protection(farm: Farm) -> None:
    """Run once the gateway requires API keys and limits each client's request rate."""
    protection = farm.settings["protection"]
    limit = protection["rate_limit_per_10s"]
    # The offload container was stopped by the offload case: its name no longer resolves, and the
    # gateway's configuration (reloaded for this case) still had to apply.
    offload = farm.status("offload", farm.settings["offload"]["server"])
    figure(f"offload endpoint whose name does not resolve: configuration applied, server {offload}")
    expect(not offload.startswith("UP"), f"protection: an unresolvable offload server is not UP ({offload})")
    metrics_url = farm.stats_url.split("/stats")[0] + "/metrics"
    anonymous = requests.get(metrics_url, timeout=10).status_code
    with_auth = requests.get(metrics_url, auth=farm.stats_auth, timeout=10)
    figure(f"gateway /metrics: without the stats credential {anonymous}, with it {with_auth.status_code}")
    expect(
        anonymous == 401 and with_auth.status_code == 200 and "haproxy_backend_" in with_auth.text,
        f"protection: /metrics wants the stats credential: {anonymous} without, {with_auth.status_code} with",
    )
    good = {"Authorization": f"Bearer {protection['api_key']}"}
    refused = {
        "no key": farm.complete(headers={}).status,
        "unknown key": farm.complete(headers={"Authorization": "Bearer not-a-key"}).status,
        "key without Bearer": farm.complete(headers={"Authorization": protection["api_key"]}).status,
    }
    figure(f"api keys: {refused}")
    expect(set(refused.values()) == {401}, f"protection: requests without a valid key get 401, got {refused}")
    # Refused requests are not counted (the key check comes first): the burst starts from zero.
    burst = [farm.complete(n_predict=1, headers=good).status for _ in range(limit + 10)]
    statuses = Counter(burst)
    figure(
        f"rate limit {limit} per 10 s: {len(burst)} requests in a burst with a valid key -> {dict(statuses)},"
        f" first 429 at request {burst.index(429) + 1 if 429 in burst else '-'}"
    )
    expect(
        burst[:limit] == [200] * limit and set(burst[limit:]) == {429},
        f"protection: {limit} answered, the rest 429, got {burst}",
    )
    # HAProxy's rate blends the previous 10 s period in: two quiet periods clear it.
    time.sleep(21)
    after = farm.complete(n_predict=1, headers=good).status
    figure(f"rate limit: after 21 s without requests -> {after}")
    expect(after == 200, f"protection: answered again after the window, got {after}")
    # Twice the cap at once with one key (each generates about 2 s, so all overlap): the cap's
    # worth answered, the rest refused at once; 5 requests in the window, under the rate limit.
    cap = protection["max_in_flight"]
    with ThreadPoolExecutor(max_workers=2 * cap) as pool:
        answers = list(
            pool.map(lambda _n: farm.complete(n_predict=128, headers=good, ignore_eos=True), range(2 * cap))
        )
    statuses = Counter(answer.status for answer in answers)
    refused_fast = [round(a.seconds, 2) for a in answers if a.status == 429]
    figure(
        f"in flight per key, cap {cap}: {2 * cap} requests at once with one key -> {dict(statuses)};"
        f" 429 after {refused_fast} s"
    )
    expect(
        statuses == Counter({200: cap, 429: cap})
        and all("in flight" in str(a.body) for a in answers if a.status == 429),
        f"protection: {cap} in flight per key answered, the rest 429, got {dict(statuses)}",
    )


# --- a corrupt model on a node's SSD ---------------------------------------------------

FLIP_A_BYTE = (
    "import sys; f = open(sys.argv[1], 'r+b'); f.seek(int(sys.argv[2])); b = f.read(1); f.seek(-1, 1);"
    " f.write(bytes([b[0] ^ 1])); f.close()"
)


def current_model(farm: Farm, server: EdgeServer) -> tuple[str, str]:
    """(sha256 of the node's current model file, sha256 its signed manifest names)."""
    current = f"{farm.settings['exporter']['models_dir']}/{server.model}/current"
    actual = farm.docker("exec", server.node, "sha256sum", f"{current}/model.gguf").split()[0]
    manifest = json.loads(farm.docker("exec", server.node, "cat", f"{current}/manifest.json"))
    return actual, manifest["sha256"]


def flip_a_byte(farm: Farm, server: EdgeServer) -> None:
    """One byte in the middle of the node's current model: the size stays, only the SHA-256 tells."""
    path = f"{farm.settings['exporter']['models_dir']}/{server.model}/current/model.gguf"
    size = int(farm.docker("exec", server.node, "stat", "-c", "%s", path))
    farm.docker("exec", server.node, "python3", "-c", FLIP_A_BYTE, path, str(size // 2))


def case_corrupt_model(farm: Farm) -> None:
    """A byte flipped in a node's current model file, then its llama-server restarted: it never serves
    the corrupt file. With the store in reach the unit fetches a good copy before llama-server starts;
    cut off from the store it stays down, out of rotation, until it can."""
    server = farm.servers[0]
    store = farm.settings["store"]
    # The cases before restarted this unit several times within its StartLimitIntervalSec.
    farm.systemctl(server.node, "reset-failed", server.unit)
    flip_a_byte(farm, server)
    before = current_model(farm, server)
    started = time.monotonic()
    farm.systemctl(server.node, "restart", server.unit)
    repaired_in = time.monotonic() - started
    up = farm.wait_status(farm.backend, server.name, "UP", timeout=90)
    after = current_model(farm, server)
    journal = farm.docker("exec", server.node, "journalctl", "-u", server.unit, "-n", "40", "--no-pager")
    figure(
        f"corrupt model: {server.node}'s current model with one byte flipped (sha256 {before[0][:12]}, signed"
        f" {before[1][:12]}) fetched again before llama-server started: unit restarted in"
        f" {repaired_in:.1f} s, back UP {up:.1f} s later"
    )
    expect(before[0] != before[1], "corrupt model: the flipped file no longer matches its manifest")
    expect(after[0] == after[1], f"corrupt model: repaired at the restart, got {after}")
    expect("repaired from the store" in journal, "corrupt model: the journal says it was repaired")

    flip_a_byte(farm, server)
    # Cut off from the store: the node's route to it blackholed (the store is moto, in memory: a
    # restart of it would forget every model).
    farm.docker("exec", server.node, "ip", "route", "add", "blackhole", store["address"])
    try:
        with contextlib.suppress(AssertionError):  # the start fails: that is the point
            farm.systemctl(server.node, "restart", server.unit)
        down = farm.wait_status(farm.backend, server.name, "DOWN", timeout=60)
        answers = [farm.complete() for _ in range(8)]
        state = farm.systemctl(server.node, "show", "-p", "ActiveState", "--value", server.unit)
        figure(
            f"corrupt model, store out of reach: the unit refuses to start ({state}), {server.name} DOWN"
            f" after {down:.1f} s; 8 requests answered by {dict(Counter(a.server for a in answers))}"
        )
        expect(state != "active", f"corrupt model: without the store the unit stays down, got {state}")
        expect(
            all(a.status == 200 and server.name not in a.server for a in answers),
            f"corrupt model: the other nodes answer meanwhile: {[(a.status, a.server) for a in answers]}",
        )
    finally:
        farm.docker("exec", server.node, "ip", "route", "del", "blackhole", store["address"])
        farm.systemctl(server.node, "reset-failed", server.unit)
        farm.systemctl(server.node, "restart", server.unit)
    farm.wait_status(farm.backend, server.name, "UP", timeout=90)
    after = current_model(farm, server)
    expect(after[0] == after[1], f"corrupt model: repaired once the store is back, got {after}")


# --- staged rollouts (playbooks/rollout_model.yml, run as an operator would) ------------


def served_versions(farm: Farm) -> dict[str, str | None]:
    """The version of the model each node's llama-server serves, as its farm exporter reports it."""
    urls = farm.settings["exporter"]["urls"]
    versions: dict[str, str | None] = {}
    for server in farm.servers:
        samples = metric_samples(urls[server.node])
        versions[server.node] = next(
            (
                dict(labels)["version"]
                for (name, labels), _value in samples.items()
                if name == "pifarm_model_active_info" and dict(labels).get("server") == server.instance
            ),
            None,
        )
    return versions


@dataclass
class Rollout:
    rc: int
    seconds: float
    report: dict[str, Any]
    output: str

    def node(self, name: str) -> dict[str, Any]:
        return next(row for row in self.report.get("nodes", []) if row["node"] == name)

    def changed(self) -> int:
        return sum(int(count) for count in re.findall(r" changed=(\d+) ", self.output))


def run_rollout(farm: Farm, version: str, *flags: str) -> Rollout:
    """ansible-playbook rollout_model.yml for the model, with the test's short gate; its JSON report."""
    config = farm.settings["rollout"]
    report = f"{config['report_dir']}/rollout-{version}-{uuid.uuid4().hex[:6]}.json"
    extra = {
        **config["vars"],
        "model_rollout_model": farm.model,
        "model_rollout_version": version,
        "model_rollout_report_file": report,
    }
    argv = [
        "ansible-playbook",
        "-i",
        config["inventory"],
        config["playbook"],
        "-e",
        json.dumps(extra),
        *flags,
    ]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    try:
        with open(report, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        data = {}
    if not data:
        print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", flush=True)
    return Rollout(done.returncode, seconds, data, done.stdout)


def failed_answers(load: SteadyLoad) -> list[Answer]:
    return [answer for _sent, answer in load.answers if answer.status != 200]


def case_rollout(farm: Farm) -> None:
    """A good version, node by node under steady load: nothing fails, every node ends on it, and a
    second run changes nothing; --check plans the next one and switches nothing."""
    version = farm.settings["rollout"]["versions"]["good"]
    before = served_versions(farm)
    with steady_load(farm, clients=2) as load:
        rollout = run_rollout(farm, version)
    after = served_versions(farm)
    failed = failed_answers(load)
    per_node = {row["node"]: row["seconds"] for row in rollout.report.get("nodes", [])}
    figure(
        f"rollout: {before} -> {version} on {len(per_node)} nodes in {rollout.seconds:.1f} s"
        f" (playbook, prefetch and gate of {farm.settings['rollout']['vars']['model_rollout_gate_window']} s"
        f" included); seconds per node {per_node}; requests under steady load {len(load.answers)},"
        f" failed {len(failed)}"
    )
    expect(
        rollout.rc == 0, f"rollout: the playbook failed (rc {rollout.rc}): {rollout.report.get('stopped')}"
    )
    expect(set(after.values()) == {version}, f"rollout: every node serves {version}, got {after}")
    expect(not failed, f"rollout: {len(failed)} requests failed under the rollout: {failed[:3]}")
    gates = rollout.report.get("gates", [])
    expect(bool(gates) and gates[0]["passed"], f"rollout: the gate after the canary passed: {gates}")

    again = run_rollout(farm, version)
    figure(
        f"rollout: a second run for {version}: {again.seconds:.1f} s, changed={again.changed()},"
        f" results {[row['result'] for row in again.report.get('nodes', [])]}"
    )
    expect(again.rc == 0 and again.changed() == 0, f"rollout: a second run changes nothing (rc {again.rc})")

    planned = run_rollout(farm, farm.settings["rollout"]["versions"]["broken"], "--check")
    expect(planned.rc == 0, f"rollout --check: rc {planned.rc}")
    expect(
        [row["result"] for row in planned.report.get("nodes", [])]
        == ["check mode: planned"] * len(farm.servers),
        f"rollout --check: every node planned, got {planned.report.get('nodes')}",
    )
    expect(served_versions(farm) == after, "rollout --check: no node changed version")


def stopped_rollout(
    farm: Farm, what: str, version: str
) -> tuple[Rollout, list[Answer], dict[str, str | None]]:
    """A rollout that must stop at the canary and roll it back, under steady load."""
    before = served_versions(farm)
    canary, *others = [server.node for server in farm.servers]
    with steady_load(farm, clients=2) as load:
        rollout = run_rollout(farm, version)
    after = served_versions(farm)
    failed = failed_answers(load)
    row = rollout.node(canary) if rollout.report else {}
    figure(
        f"rollout {what}: {version} stopped after {rollout.seconds:.1f} s: {rollout.report.get('stopped')};"
        f" {canary} {row.get('result')}, serving {after.get(canary)} again {row.get('recovery_seconds')} s"
        f" after the failure was detected; requests under steady load {len(load.answers)},"
        f" failed {len(failed)}"
    )
    expect(rollout.rc != 0, f"rollout {what}: the playbook fails")
    expect(row.get("result") == "rolled back", f"rollout {what}: {canary} rolled back, got {row}")
    expect(after == before, f"rollout {what}: every node serves what it did, {before}, got {after}")
    expect(
        all(rollout.node(node)["result"] == "not reached" for node in others),
        f"rollout {what}: {others} never touched: {rollout.report.get('nodes')}",
    )
    expect(not failed, f"rollout {what}: {len(failed)} requests failed: {failed[:3]}")
    return rollout, failed, after


def case_rollout_broken(farm: Farm) -> None:
    """A correctly signed model llama-server cannot load: only the canary is touched, and it comes back."""
    rollout, _failed, _after = stopped_rollout(
        farm, "of a broken model", farm.settings["rollout"]["versions"]["broken"]
    )
    expect(
        "did not answer" in str(rollout.report.get("stopped")), "rollout of a broken model: its health failed"
    )


def case_rollout_gate(farm: Farm) -> None:
    """A model that loads and answers its smoke test but generates far slower than the baseline: the
    gate after the canary fails on the tokens/s ratio and the canary is rolled back."""
    rollout, _failed, _after = stopped_rollout(
        farm, "failing the gate", farm.settings["rollout"]["versions"]["slow"]
    )
    gates = rollout.report.get("gates", [])
    failed_checks = [check["check"] for gate in gates for check in gate["checks"] if not check["passed"]]
    ratio = next((c["value"] for g in gates for c in g["checks"] if c["check"] == "tokens/s ratio"), None)
    figure(f"rollout failing the gate: failed checks {failed_checks}, tokens/s ratio canary/baseline {ratio}")
    expect("tokens/s ratio" in failed_checks, f"rollout failing the gate: the tokens/s ratio failed: {gates}")


CASES: dict[str, Callable[[Farm], Any]] = {
    "exporter": case_exporter,
    "spread": case_spread,
    "bad requests": case_bad_requests,
    "slowloris": case_slowloris,
    "queue": case_queue,
    "failover": case_failover,
    "crash": case_crash,
    "offload": case_offload,
    "corrupt model": case_corrupt_model,
    "jobs": lambda farm: asyncio.run(case_jobs(farm)),
    "protection": case_protection,
    "rollout": case_rollout,
    "rollout broken": case_rollout_broken,
    "rollout gate": case_rollout_gate,
}
# What a failing case raises: reported, and the next case still runs.
CASE_ERRORS = (
    AssertionError,
    OSError,
    LookupError,
    ValueError,
    requests.RequestException,
    subprocess.SubprocessError,
)
# Needs the gateway reconverged with API keys and a rate limit, or the rollout's versions
# published: asked for by name only.
NAMED_ONLY = {"protection", "rollout", "rollout broken", "rollout gate"}


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        farm = Farm(json.load(handle))
    wanted = sys.argv[2:] or [name for name in CASES if name not in NAMED_ONLY]
    cases = [(name, CASES[name]) for name in wanted]
    farm.all_edge_up()
    for name, case in cases:
        started = time.monotonic()
        try:
            case(farm)
        except CASE_ERRORS as exc:
            expect(False, f"{name}: {type(exc).__name__}: {exc}")
        print(f"case {name}: {time.monotonic() - started:.1f} s", flush=True)
        try:
            farm.all_edge_up()
        except AssertionError as exc:
            expect(False, f"after {name}: {exc}")
    return finish(f"all {len(cases)} cases passed")


if __name__ == "__main__":
    sys.exit(main())
