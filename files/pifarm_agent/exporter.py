"""The farm exporter: a node's Pi health, its services' footprint and its models, for Prometheus.

``pifarm-agent exporter serve --config exporter.json`` serves ``/metrics`` (prometheus-client).
Every figure is read when Prometheus scrapes, so nothing is older than the scrape:

* Pi health: SoC temperature, the eight ``vcgencmd get_throttled`` flags as one gauge each
  (decoded by :mod:`pifarm_agent.pi_hardware`, the code the pi_facts module runs), CPU
  frequencies, NPU presence;
* the llama-server instances' and the worker's resident memory and CPU time (psutil, the unit's
  main process and its children);
* per model: the active version and sha256 per instance (an info metric), versions held, cache
  bytes, and the last sync's outcome, time, bytes fetched and duration (recorded by the cache).

Inference latency and tokens/s are not here: Prometheus scrapes each llama-server's own
``/metrics`` (``--metrics``), so nothing is counted twice. A source that is absent (no
``vcgencmd`` off a Pi, no thermal zone, no cache yet) is not an error: its metrics are left
out and ``pifarm_exporter_source_up{source=...}`` says 0. NPU utilisation is not exported:
HailoRT reports it only to the process that owns the device.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
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
)
COMMAND_TIMEOUT = 5.0
SOURCES = ("temperature", "throttling", "cpufreq", "npu", "services", "models")
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
        port = data["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ExporterConfigError(f"{where}.port: {port!r} is not a port number")
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
        )


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


def run_command(argv: list[str]) -> str:
    """stdout of a command that must succeed within COMMAND_TIMEOUT."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True)
    return done.stdout


class FarmCollector(Collector):
    """Reads every source at each scrape; a failing source is reported, never raised."""

    def __init__(self, config: ExporterConfig, *, run: Runner = run_command) -> None:
        self.config = config
        self.run = run
        # Reads only: the cache never verifies a signature here, so it needs no public key.
        self.cache = ModelCache(config.cache_root, None) if config.cache_root else None

    def collect(self) -> Iterator[Metric]:
        up: dict[str, bool] = {}
        for source, read in (
            ("temperature", self._temperature),
            ("throttling", self._throttling),
            ("cpufreq", self._cpufreq),
            ("npu", self._npu),
            ("services", self._services),
            ("models", self._models),
        ):
            try:
                metrics = list(read())
            except (OSError, ValueError, subprocess.SubprocessError, psutil.Error):
                metrics = []
            up[source] = bool(metrics)
            yield from metrics
        source_up = GaugeMetricFamily(
            "pifarm_exporter_source_up", "1 when the source could be read at this scrape", labels=["source"]
        )
        for source in SOURCES:
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
        for name, unit in watched:
            pid = self._main_pid(unit)
            processes = _process_tree(pid)
            running.add_metric([name], 1.0 if processes else 0.0)
            if not processes:
                continue
            memory.add_metric([name], float(sum(process.memory_info().rss for process in processes)))
            times = [process.cpu_times() for process in processes]
            cpu.add_metric([name], sum(time.user + time.system for time in times))
        yield from (running, memory, cpu)

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


def registry_for(config: ExporterConfig, *, run: Runner = run_command) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(config, run=run))
    return registry


def serve(config: ExporterConfig) -> None:
    """Serves /metrics until the process is stopped (systemd's SIGTERM ends it)."""
    try:
        server, thread = start_http_server(config.port, addr=config.address, registry=registry_for(config))
    except OSError as exc:
        raise RuntimeError(f"metrics on {config.address}:{config.port}: {exc.strerror or exc}") from None
    print(f"pifarm exporter of {config.node} on http://{config.address}:{config.port}/metrics", flush=True)
    try:
        thread.join()
    finally:
        server.shutdown()
