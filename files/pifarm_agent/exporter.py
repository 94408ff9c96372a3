"""The farm exporter: a node's Pi health, its services' footprint and its models, for Prometheus.

``pifarm-agent exporter serve --config exporter.json`` serves ``/metrics`` (prometheus-client).
Every figure is read when Prometheus scrapes, so nothing is older than the scrape:

* Pi health: SoC temperature, the eight ``vcgencmd get_throttled`` flags as one gauge each
  (decoded by :mod:`pifarm_agent.pi_hardware`, the code the pi_facts module runs), CPU
  frequencies, NPU presence;
* the llama-server instances' and the worker's resident memory and CPU time (psutil, the unit's
  main process and its children);
* per model: the active version and sha256 per instance (an info metric), versions held, cache
  bytes, and the last sync's outcome, time, bytes fetched and duration (recorded by the cache);
* on a gateway, the job router: nats-server's connections, routes, traffic and slow consumers
  (``/varz``), whether JetStream can take jobs, and per stream and consumer the messages held,
  pending, awaiting an ack and redelivered (``/jsz``) — the queue depth. nats-server serves only
  JSON and Debian packages no NATS exporter; a stream's or consumer's figures come only from the
  server that leads it, so two or three gateways never count one queue twice;
* on a gateway, the front door's request latency: a histogram fed by HAProxy's per-request log
  lines over UDP on the loopback (:mod:`pifarm_agent.request_log`), since HAProxy keeps no
  percentiles.

Inference latency and tokens/s are not here: Prometheus scrapes each llama-server's own
``/metrics`` (``--metrics``), so nothing is counted twice. A source that is absent (no
``vcgencmd`` off a Pi, no thermal zone, no cache yet) is not an error: its metrics are left
out and ``pifarm_exporter_source_up{source=...}`` says 0 (the job router's and the NPU
utilisation's sources, and the models' without a cache root, are listed only where they are
configured: a gateway holds no models). HailoRT reports NPU
utilisation only in the process that owns the device, and only when that process runs with
``HAILO_MONITOR=1``: HailoRT then
writes the device's utilisation in percent, once a second, to
``/tmp/nnc_utilization/nnc_utilization<random>`` (mode 0600, the process's user). With
``npu_utilization_dir`` set, the newest such file younger than NPU_UTILIZATION_MAX_AGE is
exported; an older one is left by a process that is gone.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from pifarm_agent.cache import SYNC_REACHED_STORE, ModelCache
from pifarm_agent.pi_hardware import (
    THROTTLED_BITS,
    decode_throttled,
    detect_npu,
    parse_get_throttled,
    pci_devices,
    read_temperature_c,
)
from pifarm_agent.request_log import EdgeLatency

EXPORTER_KEYS = (
    "node",
    "address",
    "port",
    "root",
    "vcgencmd",
    "systemctl",
    "cache_root",
    "instances",
    "services",
    "nats_monitoring_url",
    "npu_utilization_dir",
    "request_log_port",
)
COMMAND_TIMEOUT = 5.0
# Listed in pifarm_exporter_source_up only where configured: nodes run no job router.
NATS_SOURCE = "nats"
# /jsz with every account's streams and their consumers (nats-server's monitoring API).
NATS_JSZ_QUERY = "jsz?accounts=true&streams=true&consumers=true"
NPU_UTILIZATION_SOURCE = "npu_utilization"
EDGE_REQUESTS_SOURCE = "edge_requests"
# HAProxy runs on the same gateway: its log lines never cross the network.
REQUEST_LOG_ADDRESS = "127.0.0.1"
# HailoRT's TempFile names: NNC_UTILIZATION_FILE_NAME plus mkstemp's six characters.
NPU_UTILIZATION_GLOB = "nnc_utilization??????"
# HailoRT rewrites the file every second (HAILO_MONITOR_TIME_INTERVAL, default 1000 ms).
NPU_UTILIZATION_MAX_AGE = 10.0
CPUFREQ_GLOB = "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"


class ExporterConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Instance:
    """A llama-server instance: its name, the model it serves and its systemd unit."""

    name: str
    model: str
    unit: str


@dataclass(frozen=True)
class Service:
    name: str
    unit: str


@dataclass(frozen=True)
class ExporterConfig:
    node: str
    address: str
    port: int
    root: str
    vcgencmd: str | None
    systemctl: str
    cache_root: str | None
    instances: tuple[Instance, ...]
    services: tuple[Service, ...]
    nats_monitoring_url: str | None = None
    npu_utilization_dir: str | None = None
    request_log_port: int | None = None

    @classmethod
    def parse(cls, data: Any, where: str = "exporter config") -> ExporterConfig:
        if not isinstance(data, dict):
            raise ExporterConfigError(f"{where}: expected a JSON object")
        unknown = sorted(set(data) - set(EXPORTER_KEYS))
        if unknown:
            known = ", ".join(EXPORTER_KEYS)
            raise ExporterConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {known})")
        for key in ("node", "port"):
            if key not in data:
                raise ExporterConfigError(f"{where}: the key {key} is missing")
        port = _port(data["port"], f"{where}.port")
        log_port = data.get("request_log_port")
        if log_port is not None:
            log_port = _port(log_port, f"{where}.request_log_port")
        root = _text(data.get("root", "/"), f"{where}.root")
        vcgencmd = data.get("vcgencmd")
        if vcgencmd is None and os.path.abspath(root) == "/":
            # As pi_facts does: the board's own vcgencmd, only when reading the live system.
            vcgencmd = shutil.which("vcgencmd")
        services = tuple(
            Service(_text(item.get("name"), f"{place}.name"), _unit(item, place))
            for i, item in enumerate(_items(data.get("services", []), f"{where}.services"))
            for place in (f"{where}.services[{i}]",)
        )
        instances = tuple(
            Instance(
                _text(item.get("name"), f"{where}.instances[{i}].name"),
                _text(item.get("model"), f"{where}.instances[{i}].model"),
                _unit(item, f"{where}.instances[{i}]"),
            )
            for i, item in enumerate(_items(data.get("instances", []), f"{where}.instances"))
        )
        nats_url = data.get("nats_monitoring_url")
        if nats_url is not None:
            nats_url = _text(nats_url, f"{where}.nats_monitoring_url").rstrip("/")
            if not nats_url.startswith(("http://", "https://")):
                raise ExporterConfigError(
                    f"{where}.nats_monitoring_url: {nats_url!r} is not an http(s) URL"
                    " (nats-server's monitoring port, for example http://127.0.0.1:8222)"
                )
        return cls(
            node=_text(data["node"], f"{where}.node"),
            address=_text(data.get("address", "0.0.0.0"), f"{where}.address"),
            port=port,
            root=root,
            vcgencmd=_text(vcgencmd, f"{where}.vcgencmd") if vcgencmd is not None else None,
            systemctl=_text(data.get("systemctl", "systemctl"), f"{where}.systemctl"),
            cache_root=_text(data["cache_root"], f"{where}.cache_root") if data.get("cache_root") else None,
            instances=instances,
            services=services,
            nats_monitoring_url=nats_url,
            npu_utilization_dir=(
                _text(data["npu_utilization_dir"], f"{where}.npu_utilization_dir")
                if data.get("npu_utilization_dir") is not None
                else None
            ),
            request_log_port=log_port,
        )


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ExporterConfigError(f"{where}: {value!r} is not a port number")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ExporterConfigError(f"{where}: expected a non-empty string, got {value!r:.60}")
    return value


def _items(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ExporterConfigError(f"{where}: expected a list of objects")
    return value


def _unit(item: dict[str, Any], where: str) -> str:
    unit = _text(item.get("unit"), f"{where}.unit")
    if not unit.endswith(".service"):
        raise ExporterConfigError(f"{where}.unit: {unit!r} is not a .service unit")
    return unit


def load_config(path: str | Path) -> ExporterConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExporterConfigError(f"exporter config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ExporterConfigError(f"exporter config {path}: not JSON ({exc})") from None
    return ExporterConfig.parse(data, f"exporter config {path}")


Runner = Callable[[list[str]], str]
Fetcher = Callable[[str], Any]


def run_command(argv: list[str]) -> str:
    """stdout of a command that must succeed within COMMAND_TIMEOUT."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True)
    return done.stdout


def fetch_json(url: str) -> Any:
    """The JSON document at url, within COMMAND_TIMEOUT."""
    with urllib.request.urlopen(url, timeout=COMMAND_TIMEOUT) as answer:
        return json.load(answer)


class FarmCollector(Collector):
    """Reads every source at each scrape; a failing source is reported, never raised."""

    def __init__(
        self,
        config: ExporterConfig,
        *,
        run: Runner = run_command,
        fetch: Fetcher = fetch_json,
        now: Callable[[], float] = time.time,
        edge: EdgeLatency | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.fetch = fetch
        self.now = now
        self.edge = edge
        # Reads only: the cache never verifies a signature here, so it needs no public key.
        self.cache = ModelCache(config.cache_root, None) if config.cache_root else None

    def collect(self) -> Iterator[Metric]:
        up: dict[str, bool] = {}
        readers: list[tuple[str, Callable[[], Iterator[Metric]]]] = [
            ("temperature", self._temperature),
            ("throttling", self._throttling),
            ("cpufreq", self._cpufreq),
            ("npu", self._npu),
            ("services", self._services),
        ]
        if self.cache is not None:
            readers.append(("models", self._models))
        if self.config.nats_monitoring_url:
            readers.append((NATS_SOURCE, self._nats))
        if self.config.npu_utilization_dir:
            readers.append((NPU_UTILIZATION_SOURCE, self._npu_utilization))
        if self.config.request_log_port:
            readers.append((EDGE_REQUESTS_SOURCE, self._edge_requests))
        for source, read in readers:
            try:
                metrics = list(read())
            except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError, psutil.Error):
                metrics = []
            up[source] = bool(metrics)
            yield from metrics
        source_up = GaugeMetricFamily(
            "pifarm_exporter_source_up", "1 when the source could be read at this scrape", labels=["source"]
        )
        for source, _read in readers:
            source_up.add_metric([source], 1.0 if up[source] else 0.0)
        yield source_up

    # -- Pi health ------------------------------------------------------------------------

    def _temperature(self) -> Iterator[Metric]:
        celsius = read_temperature_c(self.config.root)
        if celsius is not None:
            yield _gauge("pifarm_soc_temperature_celsius", "SoC temperature (thermal_zone0)", value=celsius)

    def _throttling(self) -> Iterator[Metric]:
        if self.config.vcgencmd is None:
            return
        raw = parse_get_throttled(self.run([self.config.vcgencmd, "get_throttled"]))
        decoded = decode_throttled(raw)
        for flag, bit in THROTTLED_BITS.items():
            when = "since boot" if bit >= 16 else "now"
            yield GaugeMetricFamily(
                f"pifarm_pi_{flag}", f"vcgencmd get_throttled bit {bit} ({when})", value=float(decoded[flag])
            )
        yield _gauge("pifarm_pi_throttled_raw", "vcgencmd get_throttled as a number", value=float(raw))

    def _cpufreq(self) -> Iterator[Metric]:
        pattern = os.path.join(glob.escape(self.config.root), CPUFREQ_GLOB)
        family = _gauge("pifarm_cpu_frequency_hertz", "Current CPU frequency", "cpu")
        found = False
        for path in sorted(glob.glob(pattern)):
            cpu = Path(path).parent.parent.name.removeprefix("cpu")
            family.add_metric([cpu], int(Path(path).read_text(encoding="ascii").strip()) * 1000.0)
            found = True
        if found:
            yield family

    def _npu(self) -> Iterator[Metric]:
        npu = detect_npu(pci_devices(self.config.root), self.config.root)
        present = GaugeMetricFamily(
            "pifarm_npu_present", "1 when a Hailo NPU is on PCIe, by type", labels=["type", "driver_loaded"]
        )
        present.add_metric(
            [npu["type"], "true" if npu["device_node"] else "false"], 0.0 if npu["type"] == "none" else 1.0
        )
        yield present

    def _npu_utilization(self) -> Iterator[Metric]:
        directory = os.path.join(self.config.root, self.config.npu_utilization_dir.lstrip("/"))
        files = [
            (os.stat(path).st_mtime, path)
            for path in glob.glob(os.path.join(glob.escape(directory), NPU_UTILIZATION_GLOB))
        ]
        if not files:
            return
        written, newest = max(files)
        if self.now() - written > NPU_UTILIZATION_MAX_AGE:
            return
        percent = float(Path(newest).read_text(encoding="ascii").strip())
        yield _gauge(
            "pifarm_npu_utilization_ratio",
            "Share of the last monitor interval the NPU was busy (HailoRT, HAILO_MONITOR=1)",
            value=percent / 100.0,
        )

    def _edge_requests(self) -> Iterator[Metric]:
        # The histogram itself is registered beside this collector; this says it is fed.
        if self.edge is not None and self.edge.listening:
            yield _gauge(
                "pifarm_edge_request_log_listening",
                "1 while the exporter receives HAProxy's request log lines",
                value=1.0,
            )

    # -- services -------------------------------------------------------------------------

    def _main_pid(self, unit: str) -> int:
        text = self.run([self.config.systemctl, "show", "--property=MainPID", "--value", unit]).strip()
        return int(text or "0")

    def _services(self) -> Iterator[Metric]:
        watched = [(service.name, service.unit) for service in self.config.services] + [
            (f"llama-server@{instance.name}", instance.unit) for instance in self.config.instances
        ]
        if not watched:
            return
        running = _gauge("pifarm_service_running", "1 when the unit has a main process", "service")
        memory = _gauge("pifarm_service_resident_memory_bytes", "RSS of the unit's processes", "service")
        cpu = CounterMetricFamily(
            "pifarm_service_cpu_seconds",
            "User and system CPU time of the unit's processes",
            labels=["service"],
        )
        # changes() over it counts restarts: the rollout's gate and the dashboard read it.
        started = _gauge(
            "pifarm_service_start_time_seconds",
            "Start time of the unit's main process (Unix time)",
            "service",
        )
        for name, unit in watched:
            pid = self._main_pid(unit)
            processes = _process_tree(pid)
            running.add_metric([name], 1.0 if processes else 0.0)
            if not processes:
                continue
            memory.add_metric([name], float(sum(process.memory_info().rss for process in processes)))
            times = [process.cpu_times() for process in processes]
            cpu.add_metric([name], sum(time.user + time.system for time in times))
            started.add_metric([name], processes[0].create_time())
        yield from (running, memory, cpu, started)

    # -- models ---------------------------------------------------------------------------

    def _models(self) -> Iterator[Metric]:
        if self.cache is None or not self.cache.root.is_dir():
            return
        active = InfoMetricFamily(
            "pifarm_model_active",
            "The model version each llama-server instance serves from the cache",
            labels=["server"],
        )
        for instance in self.config.instances:
            entry = self.cache.current(instance.model)
            if entry is not None:
                labels = {"model": instance.model, "version": entry.version, "sha256": entry.sha256}
                active.add_metric([instance.name], labels)
        versions = _gauge("pifarm_model_versions_cached", "Verified versions held", "model")
        success = _gauge("pifarm_model_sync_success", "1 when the last sync reached the store", "model")
        when = _gauge("pifarm_model_sync_timestamp_seconds", "Time of the last sync", "model")
        fetched = _gauge("pifarm_model_sync_fetched_bytes", "Bytes the last sync fetched", "model")
        duration = _gauge("pifarm_model_sync_duration_seconds", "Duration of the last sync", "model")
        for name in self.cache.names():
            versions.add_metric([name], float(len(self.cache.entries(name))))
        for name in self.cache.synced_names():
            status = self.cache.sync_status(name)
            if status is None:
                continue
            success.add_metric([name], 1.0 if status.get("status") in SYNC_REACHED_STORE else 0.0)
            when.add_metric([name], float(status.get("time", 0)))
            fetched.add_metric([name], float(status.get("bytes_fetched", 0)))
            duration.add_metric([name], float(status.get("seconds", 0)))
        yield from (active, versions, success, when, fetched, duration)
        yield _gauge(
            "pifarm_model_cache_bytes", "Bytes under the model cache", value=_tree_bytes(self.cache.root)
        )

    # -- job router -----------------------------------------------------------------------

    def _nats(self) -> Iterator[Metric]:
        base = self.config.nats_monitoring_url
        varz = self.fetch(f"{base}/varz")
        jsz = self.fetch(f"{base}/{NATS_JSZ_QUERY}")
        server = varz["server_name"]
        info = InfoMetricFamily("pifarm_nats_server", "The nats-server this exporter reads")
        info.add_metric([], {"server_name": server, "version": str(varz.get("version", ""))})
        yield info
        for key, documentation in (
            ("connections", "Client connections now"),
            ("routes", "Routes to the other gateways' servers now"),
            ("subscriptions", "Subscriptions now"),
        ):
            yield _gauge(f"pifarm_nats_{key}", documentation, value=float(varz[key]))
        yield CounterMetricFamily(
            "pifarm_nats_slow_consumers",
            "Clients dropped for reading too slowly",
            value=float(varz["slow_consumers"]),
        )
        messages = CounterMetricFamily(
            "pifarm_nats_messages", "Messages received and sent", labels=["direction"]
        )
        traffic = CounterMetricFamily(
            "pifarm_nats_bytes", "Payload bytes received and sent", labels=["direction"]
        )
        for direction in ("in", "out"):
            messages.add_metric([direction], float(varz[f"{direction}_msgs"]))
            traffic.add_metric([direction], float(varz[f"{direction}_bytes"]))
        yield from (messages, traffic)
        # Clustered, JetStream takes no job while its meta group has no leader (no quorum).
        meta = jsz.get("meta_cluster")
        available = "config" in jsz and (meta is None or bool(meta.get("leader")))
        yield _gauge(
            "pifarm_nats_jetstream_available",
            "1 when JetStream is enabled and, in a cluster, its meta group has a leader",
            value=1.0 if available else 0.0,
        )
        yield from self._nats_streams(server, jsz)

    @staticmethod
    def _nats_streams(server: str, jsz: dict[str, Any]) -> Iterator[Metric]:
        stream_figures = {
            "messages": _gauge("pifarm_nats_stream_messages", "Messages the stream holds", "stream"),
            "bytes": _gauge("pifarm_nats_stream_bytes", "Bytes the stream holds", "stream"),
            "last_seq": _gauge(
                "pifarm_nats_stream_last_sequence",
                "Sequence of the stream's last message (counts every one)",
                "stream",
            ),
        }
        consumer_figures = {
            "num_pending": _gauge(
                "pifarm_nats_consumer_pending_messages", "Messages not yet delivered", "stream", "consumer"
            ),
            "num_ack_pending": _gauge(
                "pifarm_nats_consumer_ack_pending_messages",
                "Messages delivered, not yet acked",
                "stream",
                "consumer",
            ),
            "num_redelivered": _gauge(
                "pifarm_nats_consumer_redelivered_messages",
                "Messages delivered more than once",
                "stream",
                "consumer",
            ),
            "num_waiting": _gauge(
                "pifarm_nats_consumer_waiting_pulls",
                "Pull requests waiting (idle workers)",
                "stream",
                "consumer",
            ),
        }
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                stream_leader = (stream.get("cluster") or {}).get("leader", server)
                if stream_leader == server:
                    for key, family in stream_figures.items():
                        family.add_metric([stream["name"]], float(stream["state"][key]))
                for consumer in stream.get("consumer_detail") or []:
                    if (consumer.get("cluster") or {}).get("leader", stream_leader) != server:
                        continue
                    for key, family in consumer_figures.items():
                        family.add_metric([stream["name"], consumer["name"]], float(consumer[key]))
        yield from stream_figures.values()
        yield from consumer_figures.values()


def _gauge(name: str, documentation: str, *labels: str, value: float | None = None) -> GaugeMetricFamily:
    if value is not None:
        return GaugeMetricFamily(name, documentation, value=float(value))
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _process_tree(pid: int) -> list[psutil.Process]:
    """The process and its children; empty when there is none (a stopped unit's MainPID is 0)."""
    if pid <= 0:
        return []
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                continue
    return total


def registry_for(
    config: ExporterConfig,
    *,
    run: Runner = run_command,
    fetch: Fetcher = fetch_json,
    now: Callable[[], float] = time.time,
    listen: bool = False,
) -> CollectorRegistry:
    """The exporter's registry; with ``listen`` the request log port is bound (OSError if taken)."""
    registry = CollectorRegistry(auto_describe=False)
    edge = None
    if config.request_log_port:
        edge = EdgeLatency(registry)
        if listen:
            edge.listen(REQUEST_LOG_ADDRESS, config.request_log_port)
    registry.register(FarmCollector(config, run=run, fetch=fetch, now=now, edge=edge))
    return registry


def serve(config: ExporterConfig) -> None:
    """Serves /metrics until the process is stopped (systemd's SIGTERM ends it)."""
    try:
        registry = registry_for(config, listen=True)
    except OSError as exc:
        where = f"{REQUEST_LOG_ADDRESS}:{config.request_log_port}/udp"
        raise RuntimeError(f"request log on {where}: {exc.strerror or exc}") from None
    try:
        server, thread = start_http_server(config.port, addr=config.address, registry=registry)
    except OSError as exc:
        raise RuntimeError(f"metrics on {config.address}:{config.port}: {exc.strerror or exc}") from None
    print(f"pifarm exporter of {config.node} on http://{config.address}:{config.port}/metrics", flush=True)
    try:
        thread.join()
    finally:
        server.shutdown()
