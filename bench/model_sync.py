"""Benchmark of the node agent's model sync. It prints figures and never fails on a timing.

What is measured, against a local moto S3 server (the tests' stand-in for MinIO) holding the
real test model (Gemma 3 270M Q4_K_M, ~253 MB) published and signed by the agent with a fresh
minisign key:

1. Throughput, N runs. Each run fetches the same object three times, in the order raw,
   raw+sha, sync on odd runs and the reverse on even ones, so that no side always comes first
   or last (cache and writeback effects), with a pause before each transfer (--settle):
   a. raw: one HTTP GET of a presigned URL with urllib3, streamed in the agent's chunk size into
      a file on the same filesystem, then fsync'd. No hashing, no checks.
   b. raw+sha: the same with SHA-256 computed while streaming. Not part of the goal: it shows
      how much of the agent's overhead is the hash itself.
   c. sync: ``ModelCache.sync`` into an empty cache: manifest and signature fetch and
      verification, download with SHA-256 while streaming, size/hash check, promotion into the
      content-addressed entry, atomic switch of ``current``.
   The raw GET is the baseline because it is the least any download of the object costs on this
   host: the same server, network path, HTTP library (urllib3), chunk size and disk. What the
   sync takes on top of it is the agent's own overhead (hashing, signature, fsyncs, renames), and
   the median of the per-run ratios sync/raw is what the goal (<= 1.10) is about. The raw file
   is fsync'd like the agent's download, so durability is not counted as agent overhead; the
   fsync's share of the raw time is printed. Over loopback the transfer runs at memory speed, so
   every CPU cycle the agent spends per byte shows in full; --link-mb-s caps the transfers with
   a proxy at a node's link rate (1 GbE carries about 117 MB/s) to see the ratio a node sees.
2. Re-sync of the model that is already current: ``ModelCache.sync`` in-process, and the CLI
   ``pifarm-agent model sync`` as the node's timer and the model_sync module run it (a new
   process, interpreter start included). Goal: <= 1 s and 0 bytes of model fetched. Both go
   through a counting TCP proxy, so the bytes that crossed the wire are printed as well.
3. Peak RSS of ``pifarm-agent model sync`` in its own process (ru_maxrss from os.wait4, taken
   by a small runner process; see RUNNER for why not from here), for the full model and for a
   copy truncated to 1/8 of it, published under another name, next to the CLI's idle footprint
   (``model list``). Streaming keeps memory flat: the goal is full/eighth <= 1.10.

Goals are informational. The exit status is 1 only when something failed (a sync error, a
wrong result, a server that did not start), 2 for bad arguments, 0 otherwise.

Usage: python bench/model_sync.py [--runs N] [--model PATH] [--json]
                                  [--settle SECONDS] [--link-mb-s MB_S] [--workdir DIR]
The model defaults to $PIFARM_TEST_MODEL, else what scripts/test-model.sh provides.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import minisign
import urllib3

# Sorted before the checkout's other modules: it puts files/ and tests/integration on sys.path.
from bench_common import REPO, BenchError, met, print_figures, resolve_model
from integration_helpers import (
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    CuttingProxy,
    MotoServer,
    manifest_for,
    store_config,
)

from pifarm_agent.cache import ModelCache
from pifarm_agent.progress import MB
from pifarm_agent.signing import sign_manifest
from pifarm_agent.store import CHUNK, ModelStore, StoreConfig, file_sha256, object_key

NAME = "bench-model"
EIGHTH_NAME = "bench-model-eighth"
VERSION = "1.0.0"
RATIO_GOAL = 1.10
RESYNC_SECONDS_GOAL = 1.0
RSS_RATIO_GOAL = 1.10
CLI_CHANGED = 2


# -- setup ---------------------------------------------------------------------------------


def truncated_copy(model: Path, dest: Path, size: int) -> Path:
    with model.open("rb") as src, dest.open("wb") as out:
        left = size
        while left:
            block = src.read(min(CHUNK, left))
            if not block:
                raise BenchError(f"model {model} ended before {size} bytes")
            out.write(block)
            left -= len(block)
    return dest


def publish(store: ModelStore, path: Path, name: str, secret_key: minisign.SecretKey) -> dict[str, Any]:
    """Sign and upload ``path`` as ``name`` 1.0.0, as the publisher does."""
    sha256 = file_sha256(path)
    manifest = replace(manifest_for(path, VERSION, sha256), name=name)
    raw = manifest.to_json()
    result = store.publish(path, raw, sign_manifest(raw, secret_key))
    if not result.changed:
        raise BenchError(f"publish {name} {VERSION}: the fresh bucket already held it ({result.status})")
    return {"name": name, "size": manifest.size, "sha256": sha256, "key": result.keys[0]}


# -- measurements --------------------------------------------------------------------------


def raw_get(url: str, dest: Path, model: dict[str, Any], *, sha256: bool = False) -> dict[str, float]:
    """One GET of a presigned URL, streamed into ``dest`` and fsync'd; hashed only when asked."""
    digest = hashlib.sha256() if sha256 else None
    started = time.perf_counter()
    pool = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=60.0), retries=False)
    response = pool.request("GET", url, preload_content=False)
    try:
        if response.status != 200:
            raise BenchError(f"raw GET: HTTP {response.status}")
        received = 0
        with dest.open("wb") as out:
            for chunk in response.stream(CHUNK):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
                received += len(chunk)
            out.flush()
            synced = time.perf_counter()
            os.fsync(out.fileno())
            fsync = time.perf_counter() - synced
    finally:
        response.release_conn()
    seconds = time.perf_counter() - started
    if received != model["size"]:
        raise BenchError(f"raw GET: received {received} bytes, the object has {model['size']}")
    if digest is not None and digest.hexdigest() != model["sha256"]:
        raise BenchError(f"raw GET: sha256 {digest.hexdigest()}, published {model['sha256']}")
    return {"seconds": seconds, "fsync_seconds": fsync}


def agent_sync(
    config: StoreConfig,
    public_key: minisign.PublicKey,
    root: Path,
    model: dict[str, Any],
    version: str | None,
) -> dict[str, Any]:
    """``ModelCache.sync`` as the agent runs it, with a fresh store client and cache object."""
    started = time.perf_counter()
    store = ModelStore(config)
    cache = ModelCache(root, public_key, progress_stream=io.StringIO())
    result = cache.sync(store, model["name"], version)
    seconds = time.perf_counter() - started
    if result.sha256 != model["sha256"]:
        raise BenchError(f"sync {model['name']}: active sha256 {result.sha256}, published {model['sha256']}")
    current = cache.current(model["name"])
    if current is None or current.sha256 != model["sha256"]:
        raise BenchError(f"sync {model['name']}: current does not point at {model['sha256'][:12]}")
    return {"seconds": seconds, "status": result.status, "bytes_fetched": result.bytes_fetched}


# Peak RSS needs a process that did not come from this one: on exec, Linux carries the old
# address space's high-water mark into the new program's ru_maxrss, so a child spawned from this
# process (hundreds of MB after publishing) would report at least this process's peak. This
# runner, a bare interpreter of ~10 MB, spawns the agent, times it and writes its rusage.
RUNNER = """
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_pid, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
result = {"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss, "seconds": seconds}
with open(report, "w") as out:
    json.dump(result, out)
"""


def run_cli(argv: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """``python -m pifarm_agent.cli ARGV`` (through RUNNER): exit code, JSON, wall time, peak RSS."""
    out_path, err_path, report_path = (workdir / f"cli.{suffix}" for suffix in ("out", "err", "json"))
    report_path.unlink(missing_ok=True)
    agent = [sys.executable, "-m", "pifarm_agent.cli", *argv]
    with out_path.open("wb") as out, err_path.open("wb") as err:
        runner = subprocess.run(
            [sys.executable, "-c", RUNNER, str(report_path), *agent],
            stdout=out,
            stderr=err,
            env=env,
            check=False,
        )
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if runner.returncode != 0 or not report_path.is_file():
        raise BenchError(f"RSS runner for pifarm-agent {' '.join(argv[:3])} failed: {stderr.strip()[-400:]}")
    report = json.loads(report_path.read_text())
    try:
        payload = json.loads(stdout)
    except ValueError:
        raise BenchError(
            f"pifarm-agent {' '.join(argv[:3])}: exit {report['exit']}, no JSON on stdout: "
            f"{(stdout + stderr).strip()[-400:]}"
        ) from None
    # Linux reports ru_maxrss in KiB.
    return {
        "exit": report["exit"],
        "payload": payload,
        "seconds": report["seconds"],
        "peak_rss_bytes": report["maxrss_kib"] * 1024,
    }


def cli_sync(
    config_path: Path, env: dict[str, str], workdir: Path, model: dict[str, Any], version: str | None
) -> dict[str, Any]:
    argv = ["model", "sync", model["name"], "--config", str(config_path), "--json"]
    if version:
        argv += ["--version", version]
    run = run_cli(argv, env, workdir)
    payload = run["payload"]
    if run["exit"] not in (0, CLI_CHANGED) or payload.get("sha256") != model["sha256"]:
        raise BenchError(
            f"pifarm-agent model sync {model['name']}: exit {run['exit']}: {payload.get('message')}"
        )
    run["status"] = payload["status"]
    run["bytes_fetched"] = payload["bytes_fetched"]
    return run


# -- phases --------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase uses: the work directory, the server, the published models and the key."""

    work: Path
    server: MotoServer
    store_config: StoreConfig
    public_key: minisign.PublicKey
    public_key_path: Path
    models: dict[str, dict[str, Any]]

    def agent_config(self, root: Path, endpoint: str) -> tuple[Path, dict[str, str]]:
        """An agent config file for ``root`` and ``endpoint``; credentials only in the environment."""
        path = root.with_suffix(".json")
        config = {
            "endpoint": endpoint,
            "bucket": BUCKET,
            "secure": False,
            "public_key": str(self.public_key_path),
            "cache_root": str(root),
        }
        path.write_text(json.dumps(config))
        env = dict(os.environ, PIFARM_S3_ACCESS_KEY=ACCESS_KEY, PIFARM_S3_SECRET_KEY=SECRET_KEY)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "files"), env.get("PYTHONPATH")]))
        return path, env


class ThrottledProxy(CuttingProxy):
    """The counting proxy of the integration tests, capped at ``rate`` bytes/s over all connections,
    like the one network link a node downloads through."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.rate = rate
        self._link = threading.Lock()
        self._free_at = time.monotonic()
        super().__init__(target_port)

    def _pass_downstream(self, client: socket.socket, data: bytes) -> bool:
        with self._link:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + len(data) / self.rate
            delay = start - now
        if delay > 0:
            time.sleep(delay)
        return super()._pass_downstream(client, data)


SIDES = ("raw", "hashed", "sync")


def throughput(bench: Bench, runs: int, settle: float, link_mb_s: float | None) -> dict[str, Any]:
    model = bench.models["full"]
    proxy = ThrottledProxy(bench.server.port, link_mb_s * MB) if link_mb_s else None
    try:
        config = replace(bench.store_config, endpoint=proxy.endpoint) if proxy else bench.store_config
        url = ModelStore(config).client.presigned_get_object(
            BUCKET, object_key(model["name"], VERSION, "model.gguf")
        )
        rows = [throughput_run(bench, config, url, index, settle) for index in range(1, runs + 1)]
    finally:
        if proxy is not None:
            proxy.close()
    median = {
        key: statistics.median(row[key] for row in rows) for key in rows[0] if key not in ("run", "order")
    }
    return {
        "link": f"throttled to {link_mb_s:g} MB/s by a proxy" if link_mb_s else "loopback, not throttled",
        "settle_seconds": settle,
        "runs": rows,
        "median": median,
        "goal": RATIO_GOAL,
        "goal_met": median["ratio"] <= RATIO_GOAL,
    }


def throughput_run(bench: Bench, config: StoreConfig, url: str, index: int, settle: float) -> dict[str, Any]:
    """raw GET, raw GET + SHA-256 and agent sync of the model; reversed order on even runs."""
    model = bench.models["full"]
    raw_file, cache_root = bench.work / "raw.gguf", bench.work / "sync-cache"
    order = SIDES if index % 2 else SIDES[::-1]
    measured: dict[str, dict[str, Any]] = {}
    for side in order:
        # Lets the previous transfer's writeback and frees settle; not timed.
        time.sleep(settle)
        if side != "sync":
            measured[side] = raw_get(url, raw_file, model, sha256=side == "hashed")
            raw_file.unlink()
            continue
        measured[side] = agent_sync(config, bench.public_key, cache_root, model, VERSION)
        shutil.rmtree(cache_root)
        if measured[side]["bytes_fetched"] != model["size"]:
            raise BenchError(
                f"sync run {index}: fetched {measured[side]['bytes_fetched']} bytes, "
                f"expected the whole {model['size']}"
            )
    raw, hashed, sync = (measured[side]["seconds"] for side in SIDES)
    return {
        "run": index,
        "order": list(order),
        "raw_seconds": raw,
        "raw_fsync_seconds": measured["raw"]["fsync_seconds"],
        "raw_mb_per_s": model["size"] / raw / MB,
        "raw_sha256_seconds": hashed,
        "sync_seconds": sync,
        "sync_mb_per_s": model["size"] / sync / MB,
        "ratio": sync / raw,
    }


def resync(bench: Bench) -> dict[str, Any]:
    """Sync once, then again (latest, as the timer asks) through a proxy that counts the bytes."""
    model = bench.models["full"]
    root = bench.work / "resync-cache"
    first = agent_sync(bench.store_config, bench.public_key, root, model, None)
    if first["status"] != "changed":
        raise BenchError(f"first sync into an empty cache reported {first['status']}, not changed")
    proxy = CuttingProxy(bench.server.port)
    try:
        proxied = replace(bench.store_config, endpoint=proxy.endpoint)
        library = agent_sync(proxied, bench.public_key, root, model, None)
        library["wire_bytes"] = proxy.downstream
        proxy.reset_counter()
        config_path, env = bench.agent_config(root, proxy.endpoint)
        command = cli_sync(config_path, env, bench.work, model, None)
        command["wire_bytes"] = proxy.downstream
    finally:
        proxy.close()
    figures: dict[str, Any] = {"goal_seconds": RESYNC_SECONDS_GOAL, "goal_bytes": 0}
    for label, run in (("library", library), ("cli", command)):
        if run["status"] != "unchanged":
            raise BenchError(f"re-sync ({label}) of the active model reported {run['status']}, not unchanged")
        figures[label] = {key: run[key] for key in ("seconds", "status", "bytes_fetched", "wire_bytes")}
        figures[label]["goal_met"] = run["seconds"] <= RESYNC_SECONDS_GOAL and run["bytes_fetched"] == 0
    shutil.rmtree(root)
    return figures


def peak_rss(bench: Bench) -> dict[str, Any]:
    endpoint = bench.server.endpoint
    config_path, env = bench.agent_config(bench.work / "rss-idle-cache", endpoint)
    idle = run_cli(["model", "list", "--config", str(config_path), "--json"], env, bench.work)
    if idle["exit"] != 0:
        raise BenchError(f"pifarm-agent model list: exit {idle['exit']}: {idle['payload'].get('message')}")
    figures: dict[str, Any] = {"idle_bytes": idle["peak_rss_bytes"]}
    for label in ("eighth", "full"):
        model = bench.models[label]
        root = bench.work / f"rss-{label}-cache"
        config_path, env = bench.agent_config(root, endpoint)
        run = cli_sync(config_path, env, bench.work, model, VERSION)
        if run["exit"] != CLI_CHANGED or run["bytes_fetched"] != model["size"]:
            raise BenchError(
                f"pifarm-agent model sync {model['name']}: exit {run['exit']}, "
                f"fetched {run['bytes_fetched']} of {model['size']} bytes"
            )
        figures[label] = {"model_bytes": model["size"], "peak_rss_bytes": run["peak_rss_bytes"]}
        shutil.rmtree(root)
    figures["ratio"] = figures["full"]["peak_rss_bytes"] / figures["eighth"]["peak_rss_bytes"]
    figures["goal"] = RSS_RATIO_GOAL
    figures["goal_met"] = figures["ratio"] <= RSS_RATIO_GOAL
    return figures


# -- output --------------------------------------------------------------------------------


THROUGHPUT_HEADER = (
    "run",
    "order",
    "raw s",
    "(fsync)",
    "raw MB/s",
    "raw+sha s",
    "sync s",
    "sync MB/s",
    "sync/raw",
)
THROUGHPUT_ROW = "  {:>6}  {:<16} {:>6} {:>7} {:>8} {:>9} {:>6} {:>9} {:>8}"


def throughput_cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['raw_seconds']:.2f}",
        f"{row['raw_fsync_seconds']:.2f}",
        f"{row['raw_mb_per_s']:.1f}",
        f"{row['raw_sha256_seconds']:.2f}",
        f"{row['sync_seconds']:.2f}",
        f"{row['sync_mb_per_s']:.1f}",
        f"{row['ratio']:.3f}",
    ]


def report(figures: dict[str, Any]) -> None:
    print("pifarm model sync benchmark (figures only; goals are informational)")
    if "model" in figures:
        model = figures["model"]
        print(f"  model      {model['path']}")
        print(f"             {model['size']} bytes ({model['size'] / MB:.1f} MB), sha256 {model['sha256']}")
    if "store" in figures:
        store = figures["store"]
        print(f"  store      moto S3 server at {store['endpoint']} (stand-in for MinIO), bucket {BUCKET}")
        print(f"  work dir   {store['workdir']} (raw files and caches on the same filesystem)")
        print(f"  published  the model and a 1/8 copy, fresh signing key: {store['publish_seconds']:.1f} s")
    if "throughput" in figures:
        data = figures["throughput"]
        print(f"\nthroughput ({data['link']}, {data['settle_seconds']:g} s pause before each transfer)")
        print("  raw:      GET of a presigned URL into a file + fsync, no checks (the baseline)")
        print("  raw+sha:  the same with SHA-256 while streaming (shows what the hash alone costs)")
        print("  sync:     agent sync: fetch + SHA-256 + signature + size check + promote + activate")
        print(THROUGHPUT_ROW.format(*THROUGHPUT_HEADER))
        for row in data["runs"]:
            print(THROUGHPUT_ROW.format(row["run"], ",".join(row["order"]), *throughput_cells(row)))
        print(THROUGHPUT_ROW.format("median", "", *throughput_cells(data["median"])))
        ratio = data["median"]["ratio"]
        print(f"  median ratio sync/raw {ratio:.3f}, goal ≤ {data['goal']:.2f}: {met(data['goal_met'])}")
    if "resync" in figures:
        data = figures["resync"]
        print("\nre-sync of the model already verified and current (latest version, as the timer asks)")
        for label, title in (("library", "ModelCache.sync (in process)"), ("cli", "pifarm-agent model sync")):
            run = data[label]
            print(
                f"  {title:<29} {run['seconds']:.3f} s, {run['bytes_fetched']} model bytes fetched, "
                f"{run['wire_bytes']} bytes on the wire (listing, manifest, signature)"
            )
            print(f"  {'':<29} goal ≤ {data['goal_seconds']:.0f} s and 0 bytes: {met(run['goal_met'])}")
    if "rss" in figures:
        data = figures["rss"]
        print("\npeak RSS of pifarm-agent in a child process (must not grow with model size)")
        print(f"  {'idle (model list)':<38} {data['idle_bytes'] / MB:>7.1f} MB")
        for label, what in (("eighth", "sync of the 1/8 model"), ("full", "sync of the full model")):
            row = data[label]
            title = f"{what} ({row['model_bytes'] / MB:.1f} MB)"
            print(f"  {title:<38} {row['peak_rss_bytes'] / MB:>7.1f} MB")
        print(f"  full / eighth {data['ratio']:.3f}, goal ≤ {data['goal']:.2f}: {met(data['goal_met'])}")


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="raw GET + sync pairs (default 5)")
    parser.add_argument("--model", help="model file (default: $PIFARM_TEST_MODEL or scripts/test-model.sh)")
    parser.add_argument("--workdir", help="directory for the server, downloads and caches (default: $TMPDIR)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds of pause before each timed transfer (default 2)"
    )
    parser.add_argument(
        "--link-mb-s",
        type=float,
        help="cap the throughput runs at this many MB/s through a proxy, like a node's link "
        "(117 is about what 1 GbE carries; default: loopback, not capped)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with all figures")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.settle < 0 or (args.link_mb_s is not None and args.link_mb_s <= 0):
        parser.error("--settle must be 0 or more and --link-mb-s more than 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict[str, Any] = {"failures": []}
    try:
        model_path = resolve_model(args.model)
    except BenchError as exc:
        figures["failures"].append({"phase": "model", "error": str(exc)})
        return print_figures(figures, args.json, report)
    with tempfile.TemporaryDirectory(prefix="pifarm-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        server = MotoServer(work)
        try:
            server.start()
            bench = setup(figures, model_path, server, work)
        except Exception as exc:  # no figure can be taken without the store
            figures["failures"].append({"phase": "setup", "error": f"{type(exc).__name__}: {exc}"})
            server.stop()
            return print_figures(figures, args.json, report)
        try:
            phases: dict[str, Callable[[], Any]] = {
                "throughput": lambda: throughput(bench, args.runs, args.settle, args.link_mb_s),
                "resync": lambda: resync(bench),
                "rss": lambda: peak_rss(bench),
            }
            for name, action in phases.items():
                try:
                    figures[name] = action()
                except Exception as exc:  # reported; the other phases still run
                    figures["failures"].append({"phase": name, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            server.stop()
    return print_figures(figures, args.json, report)


def setup(figures: dict[str, Any], model_path: Path, server: MotoServer, work: Path) -> Bench:
    """A fresh signing key; the model and a 1/8 copy of it signed and published."""
    keypair = minisign.KeyPair.generate()
    public_key_path = work / "model.pub"
    public_key_path.write_bytes(bytes(keypair.public_key) + b"\n")
    config = store_config(server.endpoint)
    store = ModelStore(config)
    store.ensure_bucket()
    eighth_path = truncated_copy(model_path, work / "eighth.gguf", model_path.stat().st_size // 8)
    started = time.perf_counter()
    models = {
        "full": publish(store, model_path, NAME, keypair.secret_key),
        "eighth": publish(store, eighth_path, EIGHTH_NAME, keypair.secret_key),
    }
    publish_seconds = time.perf_counter() - started
    eighth_path.unlink()
    full = models["full"]
    figures["model"] = {"path": str(model_path), "size": full["size"], "sha256": full["sha256"]}
    figures["store"] = {
        "endpoint": server.endpoint,
        "bucket": BUCKET,
        "workdir": str(work),
        "publish_seconds": publish_seconds,
        "models": models,
    }
    return Bench(work, server, config, keypair.public_key, public_key_path, models)


if __name__ == "__main__":
    sys.exit(main())
