"""Checks the nats role's cluster, TLS and MQTT options on two gateways, from the controller.

verify.yml runs it with one argument: a JSON settings file (mode 0600, credentials
included) with the gateways' addresses, the ports (the farm exporters' too), the test CA
and the admin and producer users. The JetStream streams are declared with the agent's own
stream configurations (``jobs.stream_configs``), as inference_worker declares them. Each check prints
``[figures]`` lines; the exit status is 1 when any failed, with the reasons last.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import nats
import paho.mqtt.client as mqtt
import requests
from nats.js.errors import BadRequestError

from measuring import expect, figure, finish, metric_samples
from pifarm_agent.jobs import (
    DEAD_STREAM,
    JOBS_STREAM,
    DeclareSettings,
    mqtt_result_topic,
    names,
    result_subject,
    stream_configs,
)

MODEL = "gemma3-270m"


class Gateways:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.addresses: dict[str, str] = settings["gateways"]
        self.ports = {key: int(value) for key, value in settings["ports"].items()}
        self.tls = ssl.create_default_context(cafile=settings["ca_file"])

    def url(self, gateway: str) -> str:
        return f"tls://{self.addresses[gateway]}:{self.ports['client']}"

    def monitoring(self, gateway: str, path: str) -> dict[str, Any]:
        response = requests.get(
            f"http://{self.addresses[gateway]}:{self.ports['monitoring']}/{path}", timeout=10
        )
        response.raise_for_status()
        return response.json()

    async def connect(self, gateway: str, user: str = "admin", tls: ssl.SSLContext | None = None) -> Any:
        credentials = self.settings[user]
        return await nats.connect(
            self.url(gateway),
            user=credentials["user"],
            password=credentials["password"],
            tls=tls or self.tls,
            connect_timeout=5,
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )


def check_cluster(gateways: Gateways) -> None:
    routes = {name: gateways.monitoring(name, "routez")["num_routes"] for name in gateways.addresses}
    meta = {name: gateways.monitoring(name, "jsz").get("meta_cluster", {}) for name in gateways.addresses}
    leaders = {info.get("leader") for info in meta.values()}
    figure(
        f"cluster: routes per gateway {routes}; JetStream meta group size"
        f" {[info.get('cluster_size') for info in meta.values()]}, leader {leaders}"
    )
    expect(
        set(routes.values()) == {len(gateways.addresses) - 1},
        f"cluster: every gateway routes to the others {routes}",
    )
    expect(
        len(leaders) == 1
        and None not in leaders
        and all(info.get("cluster_size") == 2 for info in meta.values()),
        f"cluster: one JetStream meta group over both gateways {meta}",
    )


def server_info(address: str, port: int) -> dict[str, Any]:
    """The INFO line a server sends before any TLS: what it asks of clients."""
    with socket.create_connection((address, port), timeout=5) as sock:
        line = sock.makefile("rb").readline().decode()
    return json.loads(line.removeprefix("INFO "))


async def check_tls(gateways: Gateways) -> None:
    first = next(iter(gateways.addresses))
    info = server_info(gateways.addresses[first], gateways.ports["client"])
    try:
        await gateways.connect(first, tls=ssl.create_default_context())
        system_ca = "accepted"
    except Exception as exc:
        system_ca = f"refused ({type(exc).__name__})"
    connection = await gateways.connect(first)
    verified = connection.connected_url.scheme if connection.connected_url else None
    await connection.close()
    figure(
        f"tls: client port requires TLS {info.get('tls_required')}; certificate checked against the test CA"
        f" -> connected ({verified}); against the system CAs only -> {system_ca}"
    )
    expect(info.get("tls_required") is True, "tls: the client port requires TLS")
    expect(system_ca.startswith("refused"), "tls: a certificate from another CA is not trusted")


async def check_routing(gateways: Gateways) -> None:
    """A message published on one gateway reaches a subscriber on the other."""
    first, second = list(gateways.addresses)
    subscriber = await gateways.connect(second)
    publisher = await gateways.connect(first)
    try:
        subject = f"pifarm.results.route-{uuid.uuid4().hex[:8]}"
        subscription = await subscriber.subscribe(subject)
        await subscriber.flush()
        # Interest travels over the route asynchronously: retry until it arrives.
        started = time.monotonic()
        received = None
        while received is None and time.monotonic() - started < 10:
            await publisher.publish(subject, b"over the route")
            await publisher.flush()
            try:
                received = await subscription.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
        figure(
            f"cluster: published on {first}, received on {second}:"
            f" {received is not None} after {time.monotonic() - started:.2f} s"
        )
        expect(
            received is not None and received.data == b"over the route", "cluster: message crosses the route"
        )
    finally:
        await subscriber.close()
        await publisher.close()


class Device:
    """An MQTT device logging in as the producer, over TLS checked against the test CA."""

    def __init__(
        self, gateways: Gateways, gateway: str, *, tls: bool = True, password: str | None = None
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pifarm-test-{uuid.uuid4().hex[:8]}"
        )
        producer = gateways.settings["producer"]
        self.client.username_pw_set(producer["user"], password or producer["password"])
        if tls:
            self.client.tls_set(ca_certs=gateways.settings["ca_file"])
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: str | None = None
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _client, _data, message: self.messages.append(message)
        self.address, self.port = gateways.addresses[gateway], gateways.ports["mqtt"]

    def _on_connect(self, _client: Any, _data: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        self.reason = str(reason)
        self.connected.set()

    def __enter__(self) -> Device:
        try:
            self.client.connect(self.address, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.reason = f"connection failed ({type(exc).__name__})"
            self.connected.set()
            return self
        self.client.loop_start()
        self.connected.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def ok(self) -> bool:
        return self.reason == "Success"


async def jobs_in_stream(connection: Any) -> int:
    return (await connection.jetstream().stream_info(JOBS_STREAM)).state.messages


async def check_mqtt(gateways: Gateways) -> None:
    first, second = list(gateways.addresses)
    plain = Device(gateways, first, tls=False)
    with plain:
        pass
    wrong = Device(gateways, first, password="not-the-password")
    with wrong:
        pass
    figure(f"mqtt: without TLS -> {plain.reason}; wrong password over TLS -> {wrong.reason}")
    expect(not plain.ok, "mqtt: a plain (non-TLS) connection is refused")
    expect(not wrong.ok, "mqtt: a wrong password is refused")

    admin = await gateways.connect(second)
    try:
        before = await jobs_in_stream(admin)
        job_id = f"mqtt-{uuid.uuid4().hex[:12]}"
        job = {"id": job_id, "model": MODEL, "prompt": "Say hi", "n_predict": 4}
        with Device(gateways, first) as device:
            expect(device.ok, f"mqtt: the producer logs in over TLS ({device.reason})")
            device.client.subscribe(mqtt_result_topic(job_id), qos=1)
            subscribed = device.subscribed.wait(10)
            published = device.client.publish(names(MODEL).mqtt_jobs_topic, json.dumps(job), qos=1)
            published.wait_for_publish(10)
            after = before
            started = time.monotonic()
            while after == before and time.monotonic() - started < 10:
                await asyncio.sleep(0.2)
                after = await jobs_in_stream(admin)
            # The worker's answer, published on the other gateway.
            await admin.publish(result_subject(job_id), b'{"text": "hi"}')
            await admin.flush()
            deadline = time.monotonic() + 10
            while not device.messages and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        stored = None
        if after > before:
            message = await admin.jetstream().get_last_msg(JOBS_STREAM, names(MODEL).job_subject)
            stored = json.loads(message.data)
        figure(
            f"mqtt: device on {first} (TLS, producer) QoS 1 subscribe {subscribed}, job published ->"
            f" {JOBS_STREAM} {before} -> {after} messages (read on {second}); result published on {second} ->"
            f" device got {len(device.messages)} message(s) on {[m.topic for m in device.messages]}"
        )
        expect(
            after == before + 1 and stored == job, f"mqtt: the job is in the work queue as sent ({stored})"
        )
        expect(
            [m.topic for m in device.messages] == [mqtt_result_topic(job_id)],
            "mqtt: the device receives the result published by a NATS client",
        )
    finally:
        await admin.close()


async def declare_streams(gateways: Gateways) -> None:
    """The work queue and dead letters, with the configurations the agent declares."""
    settings = DeclareSettings.parse({"nats": {"servers": ["nats://unused:4222"]}, "models": [MODEL]})
    connection = await gateways.connect(next(iter(gateways.addresses)))
    try:
        js = connection.jetstream()
        for config in stream_configs(settings):
            try:
                await js.add_stream(config)
            except BadRequestError:
                await js.update_stream(config)
    finally:
        await connection.close()


def check_exporters(gateways: Gateways) -> None:
    """Each gateway's farm exporter reads its own nats-server; a stream is reported once, by its leader."""
    reporters: dict[str, list[str]] = {JOBS_STREAM: [], DEAD_STREAM: []}
    jobs_held = []
    for gateway, address in gateways.addresses.items():
        samples = metric_samples(f"http://{address}:{gateways.ports['exporter']}/metrics")
        nats_up = samples.get(("pifarm_exporter_source_up", (("source", "nats"),)))
        available = samples.get(("pifarm_nats_jetstream_available", ()))
        routes = samples.get(("pifarm_nats_routes", ()))
        running = samples.get(("pifarm_service_running", (("service", "nats"),)))
        for stream, reporting in reporters.items():
            held = samples.get(("pifarm_nats_stream_messages", (("stream", stream),)))
            if held is not None:
                reporting.append(gateway)
                if stream == JOBS_STREAM:
                    jobs_held.append(held)
        figure(
            f"exporter on {gateway}: nats source up {nats_up}, JetStream available {available},"
            f" routes {routes}, nats-server running {running}"
        )
        expect(nats_up == 1.0, f"exporter: {gateway} reads its nats-server")
        expect(available == 1.0, f"exporter: {gateway}'s JetStream takes jobs")
        expect(
            routes == len(gateways.addresses) - 1, f"exporter: {gateway} has a route to each other gateway"
        )
        expect(running == 1.0, f"exporter: {gateway}'s nats-server unit is running")
    figure(f"exporters: streams reported by {reporters}; jobs held {jobs_held}")
    for gateway in gateways.addresses:
        check_npu_utilization(gateways, gateway, gateway in gateways.settings["npu_utilization_gateways"])
    for stream, gateways_reporting in reporters.items():
        expect(len(gateways_reporting) == 1, f"exporter: {stream} is reported by its leader only")
    expect(jobs_held and jobs_held[0] >= 1, "exporter: the MQTT job is counted in the work queue")


# As HailoRT's MonitorHandler writes it for a process run with HAILO_MONITOR=1: mkstemp's
# mode 0600, owned by that process's user (here nobody, not the exporter's).
NPU_FILE = "/tmp/nnc_utilization/nnc_utilizationQz81Xa"
WRITE_NPU_FILE = (
    f"mkdir -p {NPU_FILE.rsplit('/', 1)[0]} && printf '37.500000\\n' > {NPU_FILE}"
    f" && chown nobody:nogroup {NPU_FILE} && chmod 0600 {NPU_FILE}"
)


def check_npu_utilization(gateways: Gateways, gateway: str, enabled: bool) -> None:
    subprocess.run(["docker", "exec", gateway, "sh", "-c", WRITE_NPU_FILE], check=True, timeout=30)
    samples = metric_samples(f"http://{gateways.addresses[gateway]}:{gateways.ports['exporter']}/metrics")
    ratio = samples.get(("pifarm_npu_utilization_ratio", ()))
    listed = ("pifarm_exporter_source_up", (("source", "npu_utilization"),)) in samples
    source = samples.get(("pifarm_exporter_source_up", (("source", "npu_utilization"),)))
    figure(
        f"exporter on {gateway}: NPU utilisation reader {'on' if enabled else 'off'}"
        f" (source up {source}), ratio {ratio}"
    )
    if enabled:
        expect(ratio == 0.375, f"exporter: {gateway} reads HailoRT's mode-0600 utilisation file (37.5 %)")
    else:
        expect(ratio is None and not listed, f"exporter: {gateway} reads no NPU utilisation unless asked")


async def run(gateways: Gateways) -> None:
    for name, check in (
        ("cluster", lambda: asyncio.to_thread(check_cluster, gateways)),
        ("tls", lambda: check_tls(gateways)),
        ("routing", lambda: check_routing(gateways)),
        ("streams", lambda: declare_streams(gateways)),
        ("mqtt", lambda: check_mqtt(gateways)),
        ("exporters", lambda: asyncio.to_thread(check_exporters, gateways)),
    ):
        started = time.monotonic()
        try:
            await check()
        except Exception as exc:
            expect(False, f"{name}: {type(exc).__name__}: {exc}")
        print(f"check {name}: {time.monotonic() - started:.1f} s", flush=True)


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        gateways = Gateways(json.load(handle))
    asyncio.run(run(gateways))
    return finish("all checks passed")


if __name__ == "__main__":
    sys.exit(main())
