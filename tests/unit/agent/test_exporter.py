"""The farm exporter on recorded Pi 5 trees and vcgencmd outputs, fake process tables and a real cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from agent_helpers import NAME, metric_samples, publish
from prometheus_client import generate_latest

from pifarm_agent import exporter
from pifarm_agent.exporter import ExporterConfig, ExporterConfigError, registry_for
from pifarm_agent.store import StoreUnreachableError

PI5 = Path(__file__).resolve().parents[1] / "fixtures" / "pi5"
NATS = Path(__file__).resolve().parents[1] / "fixtures" / "nats"
NATS_URL = "http://127.0.0.1:8222"
VCGENCMD = PI5 / "vcgencmd"
FLAGS = (
    "under_voltage",
    "freq_capped",
    "throttled",
    "soft_temp_limit",
    "under_voltage_occurred",
    "freq_capped_occurred",
    "throttled_occurred",
    "soft_temp_limit_occurred",
)


def config(tree: str = "pi5-8gb-hailo8", **extra) -> ExporterConfig:
    return ExporterConfig.parse({"node": "node1", "port": 9110, "root": str(PI5 / tree), **extra})


class Commands:
    """Stands in for vcgencmd and systemctl: recorded outputs by argv."""

    def __init__(self, throttled: str = "0x0", main_pids: dict[str, int] | None = None) -> None:
        self.throttled = throttled
        self.main_pids = main_pids or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> str:
        self.calls.append(argv)
        if argv[1:] == ["get_throttled"]:
            if self.throttled == "fails":
                raise subprocess.CalledProcessError(255, argv, "", "VCHI initialization failed")
            return (VCGENCMD / f"get_throttled-{self.throttled}.txt").read_text()
        if argv[1] == "show":
            return f"{self.main_pids.get(argv[-1], 0)}\n"
        raise AssertionError(f"unexpected command {argv}")


class NatsMonitoring:
    """Stands in for nats-server's monitoring port: recorded documents by path."""

    def __init__(self, jsz: dict | None = None, *, down: bool = False) -> None:
        self.documents = {
            "varz": json.loads((NATS / "varz.json").read_text()),
            "jsz?accounts=true&streams=true&consumers=true": jsz or recorded_jsz(),
        }
        self.down = down
        self.urls: list[str] = []

    def __call__(self, url: str):
        self.urls.append(url)
        if self.down:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return copy.deepcopy(self.documents[url.removeprefix(NATS_URL + "/")])


def recorded_jsz() -> dict:
    return json.loads((NATS / "jsz-streams.json").read_text())


def scrape(
    cfg: ExporterConfig,
    commands: Commands | None = None,
    nats: NatsMonitoring | None = None,
    now: Callable[[], float] = time.time,
) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed back from the exposition text."""
    registry = registry_for(cfg, run=commands or Commands(), fetch=nats or NatsMonitoring(down=True), now=now)
    return metric_samples(generate_latest(registry).decode())


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def sources(samples: dict) -> dict[str, float]:
    return {
        dict(labels)["source"]: v
        for (name, labels), v in samples.items()
        if name == "pifarm_exporter_source_up"
    }


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"port": 9110}, "the key node is missing"),
        ({"node": "n", "port": 0}, "is not a port number"),
        ({"node": "n", "port": "9110"}, "is not a port number"),
        ({"node": "n", "port": 9110, "colour": "red"}, "unknown keys colour"),
        (
            {"node": "n", "port": 9110, "services": [{"name": "w", "unit": "pifarm-worker"}]},
            "is not a .service unit",
        ),
        (
            {"node": "n", "port": 9110, "instances": [{"name": "g", "unit": "x.service"}]},
            "instances[0].model",
        ),
        ({"node": "n", "port": 9110, "instances": {"name": "g"}}, "expected a list of objects"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(data, message):
    with pytest.raises(ExporterConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        ExporterConfig.parse(data)


def test_a_recorded_tree_runs_no_vcgencmd_unless_given_one():
    assert config().vcgencmd is None
    assert config(vcgencmd="/usr/bin/vcgencmd").vcgencmd == "/usr/bin/vcgencmd"


# -- Pi health ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recording", "set_flags"),
    [
        ("0x0", set()),
        ("0x50000", {"under_voltage_occurred", "throttled_occurred"}),
        ("0x50005", {"under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"}),
        ("0x80008", {"soft_temp_limit", "soft_temp_limit_occurred"}),
    ],
)
def test_each_get_throttled_flag_is_its_own_gauge(recording, set_flags):
    samples = scrape(config(vcgencmd="vcgencmd"), Commands(throttled=recording))
    assert {flag for flag in FLAGS if value(samples, f"pifarm_pi_{flag}") == 1.0} == set_flags
    assert all(value(samples, f"pifarm_pi_{flag}") in (0.0, 1.0) for flag in FLAGS)
    assert value(samples, "pifarm_pi_throttled_raw") == int(recording, 16)
    assert sources(samples)["throttling"] == 1.0


def test_a_pi_tree_gives_temperature_frequencies_and_the_npu():
    samples = scrape(config())
    temperature = (PI5 / "pi5-8gb-hailo8/sys/class/thermal/thermal_zone0/temp").read_text()
    assert value(samples, "pifarm_soc_temperature_celsius") == round(int(temperature) / 1000, 1)
    assert {cpu: value(samples, "pifarm_cpu_frequency_hertz", cpu=cpu) for cpu in "0123"} == {
        "0": 2.4e9,
        "1": 2.4e9,
        "2": 1.5e9,
        "3": 1.5e9,
    }
    assert value(samples, "pifarm_npu_present", type="hailo8", driver_loaded="true") == 1.0


def test_the_hailo10h_of_the_ai_hat_plus_2_is_found():
    samples = scrape(config("pi5-16gb-hailo10h"))
    assert value(samples, "pifarm_npu_present", type="hailo10h", driver_loaded="true") == 1.0


def test_absent_sources_are_left_out_and_said_so():
    """The x86 aggregator: no vcgencmd, no cpufreq in the recording, no NPU, no services, no cache root."""
    samples = scrape(config("non-pi-x86-aggregator"))
    assert not any(name.startswith("pifarm_pi_") for name, _ in samples)
    assert not any(name == "pifarm_cpu_frequency_hertz" for name, _ in samples)
    assert value(samples, "pifarm_npu_present", type="none", driver_loaded="false") == 0.0
    assert sources(samples) == {
        "temperature": 1.0,
        "throttling": 0.0,
        "cpufreq": 0.0,
        "npu": 1.0,
        "services": 0.0,
    }


def test_a_failing_vcgencmd_costs_only_its_own_metrics():
    samples = scrape(config(vcgencmd="vcgencmd"), Commands(throttled="fails"))
    assert sources(samples)["throttling"] == 0.0
    assert sources(samples)["temperature"] == 1.0
    assert value(samples, "pifarm_pi_under_voltage") is None


# -- services ----------------------------------------------------------------------------


class FakeProcess:
    """A psutil.Process over a fake process table {pid: (rss, user, system, children)}."""

    table: ClassVar[dict[int, tuple[int, float, float, list[int]]]] = {}

    def __init__(self, pid: int) -> None:
        if pid not in self.table:
            raise exporter.psutil.NoSuchProcess(pid)
        self.pid = pid

    def memory_info(self):
        return type("Memory", (), {"rss": self.table[self.pid][0]})()

    def cpu_times(self):
        _, user, system, _ = self.table[self.pid]
        return type("Times", (), {"user": user, "system": system})()

    def create_time(self):
        return 1_765_000_000.0 + self.pid

    def children(self, recursive: bool = False):
        found = []
        for child in self.table[self.pid][3]:
            found.append(FakeProcess(child))
            if recursive:
                found.extend(FakeProcess(child).children(recursive=True))
        return found


@pytest.fixture
def processes(monkeypatch):
    FakeProcess.table = {
        # llama-server instance gemma: main process only
        4100: (420_000_000, 310.5, 12.25, []),
        # the worker, with one child
        5200: (61_000_000, 2.0, 0.5, [5201]),
        5201: (1_000_000, 0.25, 0.25, []),
    }
    monkeypatch.setattr(exporter.psutil, "Process", FakeProcess)
    return FakeProcess.table


def test_services_report_the_memory_and_cpu_of_their_process_trees(processes):
    cfg = config(
        instances=[
            {"name": "gemma", "model": "gemma3-270m", "unit": "pifarm-llama@gemma.service"},
            {"name": "qwen", "model": "qwen", "unit": "pifarm-llama@qwen.service"},
        ],
        services=[{"name": "worker", "unit": "pifarm-worker.service"}],
    )
    commands = Commands(main_pids={"pifarm-llama@gemma.service": 4100, "pifarm-worker.service": 5200})
    samples = scrape(cfg, commands)
    assert value(samples, "pifarm_service_running", service="llama-server@gemma") == 1.0
    assert value(samples, "pifarm_service_resident_memory_bytes", service="llama-server@gemma") == 420_000_000
    assert value(samples, "pifarm_service_cpu_seconds_total", service="llama-server@gemma") == 322.75
    assert value(samples, "pifarm_service_resident_memory_bytes", service="worker") == 62_000_000
    assert value(samples, "pifarm_service_cpu_seconds_total", service="worker") == 3.0
    assert (
        value(samples, "pifarm_service_start_time_seconds", service="llama-server@gemma") == 1_765_004_100.0
    )
    assert value(samples, "pifarm_service_start_time_seconds", service="llama-server@qwen") is None
    # qwen's unit is stopped (MainPID 0): running 0 and no figures rather than zeros.
    assert value(samples, "pifarm_service_running", service="llama-server@qwen") == 0.0
    assert value(samples, "pifarm_service_resident_memory_bytes", service="llama-server@qwen") is None
    assert ["systemctl", "show", "--property=MainPID", "--value", "pifarm-worker.service"] in commands.calls


def test_a_process_gone_between_systemctl_and_psutil_counts_as_stopped(processes):
    cfg = config(services=[{"name": "worker", "unit": "pifarm-worker.service"}])
    samples = scrape(cfg, Commands(main_pids={"pifarm-worker.service": 9999}))
    assert value(samples, "pifarm_service_running", service="worker") == 0.0


# -- models ------------------------------------------------------------------------------


def test_the_active_version_and_the_last_sync_come_from_the_cache(cache, source, keypair):
    artifact = publish(source, keypair, 1, "1.0.0")
    cache.sync(source, NAME)
    cfg = config(
        cache_root=str(cache.root),
        instances=[{"name": "tiny1", "model": NAME, "unit": "pifarm-llama@tiny1.service"}],
    )
    samples = scrape(cfg)
    info = {"server": "tiny1", "model": NAME, "version": "1.0.0", "sha256": artifact.manifest.sha256}
    assert value(samples, "pifarm_model_active_info", **info) == 1.0
    assert value(samples, "pifarm_model_versions_cached", model=NAME) == 1.0
    assert value(samples, "pifarm_model_sync_success", model=NAME) == 1.0
    assert value(samples, "pifarm_model_sync_fetched_bytes", model=NAME) == len(artifact.data)
    assert value(samples, "pifarm_model_sync_timestamp_seconds", model=NAME) > 1.7e9
    assert value(samples, "pifarm_model_cache_bytes") >= len(artifact.data)

    # The store down: the model is served from the cache, and the sync counts as not successful.
    source.unreachable = True
    assert cache.sync(source, NAME).status == "served-from-cache"
    samples = scrape(cfg)
    assert value(samples, "pifarm_model_sync_success", model=NAME) == 0.0
    assert value(samples, "pifarm_model_active_info", **info) == 1.0

    # A first sync that fails is recorded too: no version held, the failure with its reason.
    with pytest.raises(StoreUnreachableError):
        cache.sync(source, "other")
    samples = scrape(cfg)
    assert value(samples, "pifarm_model_sync_success", model="other") == 0.0
    assert value(samples, "pifarm_model_versions_cached", model="other") == 0.0
    assert cache.sync_status("other")["message"] == "fake store: connection refused"


def test_no_cache_yet_is_an_absent_source(tmp_path):
    samples = scrape(config(cache_root=str(tmp_path / "missing")))
    assert sources(samples)["models"] == 0.0


# -- job router (gateways) -----------------------------------------------------------------


def gateway(**extra) -> ExporterConfig:
    return config("non-pi-x86-aggregator", **{"nats_monitoring_url": NATS_URL + "/", **extra})


def test_the_job_router_figures_come_from_varz_and_jsz():
    nats = NatsMonitoring()
    samples = scrape(gateway(), nats=nats)
    assert nats.urls == [f"{NATS_URL}/varz", f"{NATS_URL}/jsz?accounts=true&streams=true&consumers=true"]
    assert sources(samples)["nats"] == 1.0
    assert value(samples, "pifarm_nats_server_info", server_name="pifarm-itest", version="2.9.10") == 1.0
    assert value(samples, "pifarm_nats_messages_total", direction="in") == 10.0
    assert value(samples, "pifarm_nats_bytes_total", direction="out") == 3139.0
    assert value(samples, "pifarm_nats_routes") == 0.0
    assert value(samples, "pifarm_nats_slow_consumers_total") == 0.0
    assert value(samples, "pifarm_nats_jetstream_available") == 1.0
    # The queue depth: three gemma jobs nobody took yet, one dead letter held.
    assert value(samples, "pifarm_nats_stream_messages", stream="PIFARM_JOBS") == 3.0
    assert value(samples, "pifarm_nats_stream_last_sequence", stream="PIFARM_DEAD") == 1.0
    pending = {
        dict(labels)["consumer"]: v
        for (name, labels), v in samples.items()
        if name == "pifarm_nats_consumer_pending_messages"
    }
    assert pending == {"worker-gemma3-270m": 3.0, "worker-qwen2_5-0_5b": 0.0}
    assert (
        value(
            samples,
            "pifarm_nats_consumer_ack_pending_messages",
            stream="PIFARM_JOBS",
            consumer="worker-gemma3-270m",
        )
        == 0.0
    )


def test_only_the_leader_of_a_stream_or_consumer_reports_it():
    """Two gateways both list a replicated stream: the one that does not lead it stays silent."""
    jsz = recorded_jsz()
    jobs = jsz["account_details"][0]["stream_detail"][0]
    jobs["cluster"] = {"leader": "gateway2", "replicas": [{"name": "pifarm-itest", "current": True}]}
    jobs["consumer_detail"][0]["cluster"] = {"leader": "pifarm-itest"}
    jobs["consumer_detail"][1]["cluster"] = {"leader": "gateway2"}
    samples = scrape(gateway(), nats=NatsMonitoring(jsz))
    assert value(samples, "pifarm_nats_stream_messages", stream="PIFARM_JOBS") is None
    assert value(samples, "pifarm_nats_stream_messages", stream="PIFARM_DEAD") == 1.0
    assert (
        value(
            samples,
            "pifarm_nats_consumer_pending_messages",
            stream="PIFARM_JOBS",
            consumer="worker-gemma3-270m",
        )
        == 3.0
    )
    assert (
        value(
            samples,
            "pifarm_nats_consumer_pending_messages",
            stream="PIFARM_JOBS",
            consumer="worker-qwen2_5-0_5b",
        )
        is None
    )


def test_jetstream_without_a_meta_leader_takes_no_jobs():
    jsz = recorded_jsz()
    jsz["meta_cluster"] = {"name": "pifarm", "leader": "", "cluster_size": 2}
    assert value(scrape(gateway(), nats=NatsMonitoring(jsz)), "pifarm_nats_jetstream_available") == 0.0
    jsz["meta_cluster"]["leader"] = "gateway2"
    assert value(scrape(gateway(), nats=NatsMonitoring(jsz)), "pifarm_nats_jetstream_available") == 1.0


def test_a_stopped_job_router_is_an_absent_source_not_a_failure():
    samples = scrape(gateway(), nats=NatsMonitoring(down=True))
    assert sources(samples)["nats"] == 0.0
    assert not any(name.startswith("pifarm_nats_") for name, _ in samples)
    assert sources(samples)["temperature"] == 1.0


def test_nodes_do_not_list_the_job_router_source():
    assert "nats" not in sources(scrape(config()))


@pytest.mark.parametrize("url", ["127.0.0.1:8222", "nats://127.0.0.1:4222", ""])
def test_the_job_router_url_must_be_http(url):
    with pytest.raises(ExporterConfigError, match="nats_monitoring_url"):
        gateway(nats_monitoring_url=url)


# -- NPU utilisation (HailoRT with HAILO_MONITOR=1) ---------------------------------------------

NOW = 1_800_000_000.0


def utilization_file(root: Path, suffix: str, text: str, age: float) -> Path:
    """A file as HailoRT's MonitorHandler writes it: std::to_string(percent) and a newline."""
    directory = root / "tmp" / "nnc_utilization"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"nnc_utilization{suffix}"
    path.write_text(text)
    os.utime(path, (NOW - age, NOW - age))
    return path


def npu_scrape(root: Path) -> dict:
    cfg = ExporterConfig.parse(
        {"node": "node1", "port": 9110, "root": str(root), "npu_utilization_dir": "/tmp/nnc_utilization"}
    )
    return scrape(cfg, now=lambda: NOW)


def test_the_npu_utilisation_hailort_writes_is_exported(tmp_path):
    utilization_file(tmp_path, "Xa81Qz", "37.500000\n", age=0.8)
    samples = npu_scrape(tmp_path)
    assert value(samples, "pifarm_npu_utilization_ratio") == 0.375
    assert sources(samples)["npu_utilization"] == 1.0


def test_a_file_left_by_a_process_that_is_gone_is_ignored(tmp_path):
    utilization_file(tmp_path, "Old000", "99.000000\n", age=3600)
    samples = npu_scrape(tmp_path)
    assert value(samples, "pifarm_npu_utilization_ratio") is None
    assert sources(samples)["npu_utilization"] == 0.0
    utilization_file(tmp_path, "New111", "12.250000\n", age=1)
    assert value(npu_scrape(tmp_path), "pifarm_npu_utilization_ratio") == 0.1225


def test_no_monitored_process_is_an_absent_source(tmp_path):
    samples = npu_scrape(tmp_path)
    assert sources(samples)["npu_utilization"] == 0.0
    assert "npu_utilization" not in sources(scrape(config()))
