"""Benchmark of the inference runtime (llama.cpp's llama-server, as the nodes run it). It prints
figures and never fails on a timing.

Every ratio is taken within one run of this script, on this host, with the cached llama.cpp
build (scripts/llama-server.sh --cached-only) and the test model (Gemma 3 270M Q4_K_M from
scripts/test-model.sh):

1. Serving efficiency. ``llama-bench -p 0 -n 128`` gives the bare decode rate of the model
   (tg128: 128 tokens, no sampling, no HTTP). llama-server with one slot answers single
   sequential POST /completion requests of 128 tokens (``ignore_eos`` so every request decodes
   all 128; ``cache_prompt`` off so no request reuses another's work; the server's default
   sampling, as a client that sets nothing gets). The server's own ``timings.predicted_per_second``
   (generation only) over llama-bench's tg is what the goal (>= 0.95) is about: what sampling,
   detokenising, slot handling and the HTTP thread cost per token. The client-side rate (128 /
   request wall time, prompt and HTTP included) is printed next to it. Same threads (--threads,
   default: all CPUs) for both. The two sides run in pairs, one llama-bench run and one request
   per round, in alternating order, and the goal is about the median of the per-round ratios:
   on a shared host a llama-bench taken minutes before the requests measured another host
   (15 against 44 tok/s in one such try), whereas neighbours in time see the same load.
2. Continuous batching. llama-server with four slots; per round, one request alone and four
   concurrent clients (odd rounds one first, even rounds four first, so neither always runs on
   a warmer or quieter host). Aggregate tok/s = tokens predicted / wall time from the first send
   to the last reply. Goal: four clients >= 2.0 x one client (median of the per-round ratios).
   In both server phases the server's own /metrics counter of predicted tokens must agree with
   the replies.
   Next to every timed figure of 1 and 2 is the share of its time in which some task on the
   host waited for a CPU (/proc/pressure/cpu): with as many threads as CPUs, any other work
   on the host slows llama.cpp's threads, and this shows which figures it touched.
3. Build once vs compile per node. build_seconds is read from BUILDINFO in the cached artifact:
   the build script measured it (cmake configure + build) when it built that artifact into this
   host's cache. The install is measured here, as the llama_server role does it after the
   download: SHA-256 of the tarball checked against its .sha256, unpacked with tar into a staging
   directory, ARTIFACT.sha256 written, renamed into place (median of --runs). For N = 4 and 32
   nodes: compile per node = N x build; build once = build + N x install. Goal at N = 4: build
   once >= N/2 = 2 x faster in machine time. Both sides are this host's times; a Pi 5 compiles
   and unpacks at its own speed, and the download from the store is not counted.

Goals are informational. The exit status is 1 only when something failed (a binary that did not
run, a server that did not start, a reply without its 128 tokens), 2 for bad arguments, 130 when
interrupted, 0 otherwise.

Usage: python bench/llama_serving.py [--only {efficiency,batching,build}] [--threads T]
                                     [--bench-reps R] [--requests N] [--rounds N] [--runs N]
                                     [--model PATH] [--workdir DIR] [--json]
The model defaults to $PIFARM_TEST_MODEL, else what scripts/test-model.sh provides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

# Sorted before the checkout's other modules: it puts files/ and tests/integration on sys.path.
from bench_common import REPO, BenchError, met, print_figures, resolve_model
from integration_helpers import free_port, stop_process

from pifarm_agent.progress import MB
from pifarm_agent.store import file_sha256

PHASES = ("efficiency", "batching", "build")
N_PREDICT = 128
CLIENTS = 4
EFFICIENCY_CTX = 2048
# Each of the four slots gets 1024 cells, far more than the prompt and 128 tokens need.
BATCHING_CTX = CLIENTS * 1024
PROMPT = "Building a website can be done in 10 simple steps:"
EFFICIENCY_GOAL = 0.95
BATCHING_GOAL = 2.0
NODE_COUNTS = (4, 32)
GOAL_NODES = 4
START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 300.0
# llama-server's graceful stop waits for the requests in flight (it held on until the client's
# read timeout when stopped mid-request), so a server stopped during a round is killed after this.
STOP_TIMEOUT = 5.0
# What 1 GbE carries, for the estimate of the download the install figure leaves out.
LINK_BYTES_PER_S = 117 * MB
NO_CACHED_BUILD = 3
EXIT_INTERRUPTED = 130


# -- setup ---------------------------------------------------------------------------------


@dataclass
class Build:
    """The cached llama.cpp artifact and the directory its binaries were unpacked into."""

    bin_dir: Path
    artifact: Path

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path}: not an executable (the cached build lacks {name})")
        return path


def resolve_build() -> Build:
    """The binaries of the cached build; this benchmark never starts a 15-minute compile."""
    script = REPO / "scripts" / "llama-server.sh"
    result = subprocess.run([str(script), "--cached-only"], capture_output=True, text=True, check=False)
    if result.returncode == NO_CACHED_BUILD:
        raise BenchError(
            f"no cached llama.cpp build: {script.relative_to(REPO)} --cached-only exited {NO_CACHED_BUILD}; "
            f"run {script.relative_to(REPO)} once (no argument) to build it (about 15 minutes on 2 cores)"
        )
    if result.returncode != 0:
        raise BenchError(
            f"{script.relative_to(REPO)} --cached-only exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-400:]}"
        )
    bin_dir = Path(result.stdout.strip().splitlines()[-1])
    # The script unpacks <name>.tar.gz into <name>/ and prints <name>/bin.
    artifact = bin_dir.parent.with_name(bin_dir.parent.name + ".tar.gz")
    if not artifact.is_file():
        raise BenchError(f"{bin_dir} has no artifact {artifact} next to it")
    return Build(bin_dir, artifact)


@dataclass
class Context:
    """What every phase uses: the binaries, the model, the thread count and the work directory."""

    build: Build
    model: Path
    threads: int
    work: Path


# -- child processes -----------------------------------------------------------------------


def run_child(argv: list[str]) -> tuple[int, str, str]:
    """Run ``argv`` to completion; on Ctrl-C or any error here the child is stopped, not orphaned."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate()
    finally:
        stop_process(process, STOP_TIMEOUT)
    return process.returncode, stdout, stderr


class LlamaServer:
    """llama-server on a free loopback port, its output in a log file; a context manager that
    terminates and reaps it whatever happens inside (Ctrl-C included)."""

    def __init__(self, ctx: Context, slots: int, n_ctx: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ctx.work / f"llama-server-{slots}-slots.log"
        self.argv = [
            str(ctx.build.binary("llama-server")),
            "-m",
            str(ctx.model),
            "-t",
            str(ctx.threads),
            "--parallel",
            str(slots),
            "--metrics",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-c",
            str(n_ctx),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, STOP_TIMEOUT)

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:])

    def wait_ready(self) -> None:
        """GET /health until 200 (503 while the model loads, refused before the socket is up)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"llama-server exited {self.process.returncode} at start: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise BenchError(f"llama-server not healthy within {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def complete(self, session: requests.Session) -> dict[str, Any]:
        """One POST /completion of N_PREDICT tokens; client-side send and reply times included."""
        body = {"prompt": PROMPT, "n_predict": N_PREDICT, "ignore_eos": True, "cache_prompt": False}
        sent = time.perf_counter()
        try:
            response = session.post(f"{self.url}/completion", json=body, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            raise BenchError(f"POST /completion: {exc}; server log: {self.log_tail()}") from None
        replied = time.perf_counter()
        if response.status_code != 200:
            raise BenchError(f"POST /completion: HTTP {response.status_code}: {response.text[:300]}")
        reply = response.json()
        timings = reply.get("timings", {})
        if reply.get("tokens_predicted") != N_PREDICT or timings.get("predicted_n") != N_PREDICT:
            raise BenchError(
                f"POST /completion: {reply.get('tokens_predicted')} tokens predicted "
                f"(timings {timings.get('predicted_n')}), asked for {N_PREDICT} with ignore_eos"
            )
        return {
            "sent": sent,
            "replied": replied,
            "wall_seconds": replied - sent,
            "tokens": N_PREDICT,
            "slot": reply.get("id_slot"),
            "server_tok_s": timings["predicted_per_second"],
            "prompt_tokens": timings.get("prompt_n"),
        }

    def predicted_total(self) -> float:
        """llamacpp:tokens_predicted_total from /metrics (--metrics)."""
        response = requests.get(f"{self.url}/metrics", timeout=10)
        if response.status_code != 200:
            raise BenchError(f"GET /metrics: HTTP {response.status_code}")
        for line in response.text.splitlines():
            if line.startswith("llamacpp:tokens_predicted_total "):
                return float(line.split()[1])
        raise BenchError("GET /metrics: no llamacpp:tokens_predicted_total")


def check_metrics(server: LlamaServer, replies: int) -> None:
    """The server's own count of predicted tokens must be what the replies said."""
    counted = server.predicted_total()
    if counted != replies * N_PREDICT:
        raise BenchError(
            f"/metrics counts {counted:.0f} predicted tokens, the {replies} replies {replies * N_PREDICT}"
        )


def cpu_pressure_us() -> int | None:
    """The kernel's count of microseconds in which some task waited for a CPU (PSI), if any."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            return int(dict(field.split("=", 1) for field in line.split()[1:])["total"])
    return None


def with_cpu_wait(action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``action()``'s figures plus ``cpu_wait``: the share of its wall time in which some task on
    this host waited for a CPU. The host is shared, and a round in which other work took the CPUs
    shows here rather than only as a slow figure."""
    before, started = cpu_pressure_us(), time.perf_counter()
    figures = action()
    after, seconds = cpu_pressure_us(), time.perf_counter() - started
    waited = None if before is None or after is None else (after - before) / 1e6 / seconds
    return {**figures, "cpu_wait": waited}


# -- phases --------------------------------------------------------------------------------


def llama_bench(ctx: Context, reps: int) -> dict[str, Any]:
    argv = [str(ctx.build.binary("llama-bench")), "-m", str(ctx.model), "-t", str(ctx.threads)]
    argv += ["-p", "0", "-n", str(N_PREDICT), "-r", str(reps), "-o", "json"]
    code, stdout, stderr = run_child(argv)
    if code != 0:
        raise BenchError(f"llama-bench exited {code}: {stderr.strip()[-400:]}")
    try:
        rows = json.loads(stdout)
    except ValueError:
        raise BenchError(f"llama-bench printed no JSON: {stdout.strip()[:300]}") from None
    tg = [row for row in rows if row.get("n_prompt") == 0 and row.get("n_gen") == N_PREDICT]
    if len(tg) != 1:
        raise BenchError(f"llama-bench gave {len(tg)} tg{N_PREDICT} results, expected 1")
    return {"argv": argv, "tok_s": tg[0]["avg_ts"], "samples_tok_s": tg[0]["samples_ts"]}


def efficiency(ctx: Context, reps: int, rounds: int) -> dict[str, Any]:
    """Rounds of one llama-bench run and one server request, in alternating order."""
    server = LlamaServer(ctx, 1, EFFICIENCY_CTX)
    rows = []
    with server, requests.Session() as session:
        # Not counted: the first request faults the weights in and sizes the server's buffers.
        server.complete(session)
        for index in range(1, rounds + 1):
            order = ("bench", "server") if index % 2 else ("server", "bench")
            measured: dict[str, dict[str, Any]] = {}
            for side in order:
                measured[side] = with_cpu_wait(
                    (lambda: llama_bench(ctx, reps))
                    if side == "bench"
                    else (lambda: server.complete(session))
                )
            bench, reply = measured["bench"], measured["server"]
            client_tok_s = N_PREDICT / reply["wall_seconds"]
            rows.append(
                {
                    "round": index,
                    "order": list(order),
                    "bench_tok_s": bench["tok_s"],
                    "bench_samples_tok_s": bench["samples_tok_s"],
                    "server_tok_s": reply["server_tok_s"],
                    "client_tok_s": client_tok_s,
                    "wall_seconds": reply["wall_seconds"],
                    "prompt_tokens": reply["prompt_tokens"],
                    "bench_cpu_wait": bench["cpu_wait"],
                    "server_cpu_wait": reply["cpu_wait"],
                    "ratio": reply["server_tok_s"] / bench["tok_s"],
                    "client_ratio": client_tok_s / bench["tok_s"],
                }
            )
        check_metrics(server, rounds + 1)
    ratio = statistics.median(row["ratio"] for row in rows)
    return {
        "bench_argv": bench["argv"],
        "server_argv": server.argv,
        "rounds": rows,
        "median": {key: statistics.median(row[key] for row in rows) for key in MEDIAN_KEYS},
        "ratio": ratio,
        "goal": EFFICIENCY_GOAL,
        "goal_met": ratio >= EFFICIENCY_GOAL,
    }


MEDIAN_KEYS = ("bench_tok_s", "server_tok_s", "client_tok_s", "wall_seconds", "ratio", "client_ratio")


def concurrent(
    server: LlamaServer, sessions: list[requests.Session], pool: ThreadPoolExecutor
) -> dict[str, Any]:
    """len(sessions) clients released together; tokens over first send to last reply."""
    start = threading.Barrier(len(sessions))

    def client(session: requests.Session) -> dict[str, Any]:
        start.wait(timeout=REQUEST_TIMEOUT)
        return server.complete(session)

    replies = [future.result() for future in [pool.submit(client, s) for s in sessions]]
    wall = max(r["replied"] for r in replies) - min(r["sent"] for r in replies)
    tokens = sum(r["tokens"] for r in replies)
    return {
        "clients": len(sessions),
        "wall_seconds": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "slots": sorted(r["slot"] for r in replies),
        "server_tok_s_each": [r["server_tok_s"] for r in replies],
    }


def batching(ctx: Context, rounds: int) -> dict[str, Any]:
    server = LlamaServer(ctx, CLIENTS, BATCHING_CTX)
    sessions = [requests.Session() for _ in range(CLIENTS)]
    # Not a `with` block: its exit would wait for requests in flight; on Ctrl-C the server goes
    # first, which ends them.
    pool = ThreadPoolExecutor(max_workers=CLIENTS)
    rows = []
    try:
        with server:
            concurrent(server, sessions, pool)
            for index in range(1, rounds + 1):
                order = (1, CLIENTS) if index % 2 else (CLIENTS, 1)
                measured = {
                    n: with_cpu_wait(lambda n=n: concurrent(server, sessions[:n], pool)) for n in order
                }
                one, many = measured[1], measured[CLIENTS]
                rows.append(
                    {
                        "round": index,
                        "order": list(order),
                        "one": one,
                        "many": many,
                        "ratio": many["tok_s"] / one["tok_s"],
                    }
                )
            check_metrics(server, CLIENTS + rounds * (1 + CLIENTS))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for session in sessions:
            session.close()
    ratio = statistics.median(row["ratio"] for row in rows)
    return {
        "server_argv": server.argv,
        "rounds": rows,
        "one_tok_s": statistics.median(row["one"]["tok_s"] for row in rows),
        "many_tok_s": statistics.median(row["many"]["tok_s"] for row in rows),
        "ratio": ratio,
        "goal": BATCHING_GOAL,
        "goal_met": ratio >= BATCHING_GOAL,
    }


def read_buildinfo(artifact: Path) -> dict[str, str]:
    try:
        with tarfile.open(artifact, "r:gz") as tar:
            member = tar.extractfile("BUILDINFO")
            if member is None:
                raise BenchError(f"{artifact}: BUILDINFO is not a file")
            text = member.read().decode()
    except (tarfile.TarError, KeyError) as exc:
        raise BenchError(f"{artifact}: no readable BUILDINFO ({exc})") from None
    info = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if not info.get("build_seconds", "").isdigit():
        raise BenchError(f"{artifact}: BUILDINFO has no build_seconds")
    return info


def install_once(artifact: Path, expected: str, root: Path) -> float:
    """What the llama_server role does with the downloaded tarball; returns the seconds it took."""
    name = artifact.name.removesuffix(".tar.gz")
    staging, final = root / f".{name}.staging", root / name
    started = time.perf_counter()
    actual = file_sha256(artifact)
    if actual != expected:
        raise BenchError(f"{artifact}: sha256 {actual}, its .sha256 says {expected}")
    staging.mkdir()
    code, _stdout, stderr = run_child(["tar", "-xzf", str(artifact), "-C", str(staging)])
    if code != 0:
        raise BenchError(f"tar -xzf {artifact} exited {code}: {stderr.strip()[-300:]}")
    (staging / "ARTIFACT.sha256").write_text(f"{expected}\n")
    staging.rename(final)
    seconds = time.perf_counter() - started
    if not os.access(final / "bin" / "llama-server", os.X_OK):
        raise BenchError(f"the unpacked {artifact.name} has no executable bin/llama-server")
    return seconds


def build_vs_compile(ctx: Context, runs: int) -> dict[str, Any]:
    artifact = ctx.build.artifact
    info = read_buildinfo(artifact)
    sha_file = artifact.with_name(artifact.name + ".sha256")
    try:
        expected = sha_file.read_text().split()[0].lower()
    except (OSError, IndexError):
        raise BenchError(f"{sha_file}: no sha256 for the artifact") from None
    installs = []
    for index in range(runs):
        root = ctx.work / f"install-{index}"
        root.mkdir()
        try:
            installs.append(install_once(artifact, expected, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    build = float(info["build_seconds"])
    install = statistics.median(installs)
    nodes = {}
    for count in NODE_COUNTS:
        per_node, once = count * build, build + count * install
        nodes[str(count)] = {"compile_per_node_seconds": per_node, "build_once_seconds": once}
        nodes[str(count)]["ratio"] = per_node / once
    goal = GOAL_NODES / 2
    return {
        "artifact": str(artifact),
        "artifact_bytes": artifact.stat().st_size,
        "buildinfo": info,
        "build_seconds": build,
        "install_seconds": installs,
        "install_median_seconds": install,
        "nodes": nodes,
        "goal_nodes": GOAL_NODES,
        "goal": goal,
        "goal_met": nodes[str(GOAL_NODES)]["ratio"] >= goal,
    }


# -- output --------------------------------------------------------------------------------


def minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:,.1f} min)"


def format_row(template: str, *cells: object) -> str:
    return template.format(*cells).rstrip()


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


CPU_WAIT_NOTE = (
    "    wait: share of that measurement's time in which some task on this host waited for a CPU\n"
    "          (/proc/pressure/cpu); high values mean other work took the CPUs from the figure next to it"
)
EFFICIENCY_ROW = "    {:>6}  {:<13} {:>11} {:>5}  {:>12} {:>5}  {:>12}  {:>12}  {:>12}"


def report_efficiency(data: dict[str, Any]) -> None:
    print(f"\n1. serving efficiency (one slot, single sequential requests of {N_PREDICT} tokens)")
    print(f"  llama-bench  {' '.join(data['bench_argv'][3:])}")
    print(f"  llama-server {' '.join(data['server_argv'][3:])}")
    print("    bench: llama-bench's tg128 avg_ts (decode only: no sampling, no HTTP)")
    print("    server: the server's timings.predicted_per_second (generation, sampling included)")
    print("    client: 128 / request wall time (prompt, generation and HTTP)")
    print(CPU_WAIT_NOTE)
    header = ("round", "order", "bench tok/s", "wait", "server tok/s", "wait", "client tok/s")
    print(format_row(EFFICIENCY_ROW, *header, "server/bench", "client/bench"))
    median = {**data["median"], "round": "median", "order": [], "bench_cpu_wait": "", "server_cpu_wait": ""}
    for row in [*data["rounds"], median]:
        print(
            format_row(
                EFFICIENCY_ROW,
                row["round"],
                ",".join(row["order"]),
                f"{row['bench_tok_s']:.2f}",
                row["bench_cpu_wait"] if row is median else percent(row["bench_cpu_wait"]),
                f"{row['server_tok_s']:.2f}",
                row["server_cpu_wait"] if row is median else percent(row["server_cpu_wait"]),
                f"{row['client_tok_s']:.2f}",
                f"{row['ratio']:.3f}",
                f"{row['client_ratio']:.3f}",
            )
        )
    print(
        f"  median ratio server/bench {data['ratio']:.3f}, goal ≥ {data['goal']:.2f}: {met(data['goal_met'])}"
    )


BATCHING_ROW = "    {:>6}  {:<5} {:>14} {:>5} {:>15} {:>5} {:>6}  {}"


def report_batching(data: dict[str, Any]) -> None:
    title = f"{CLIENTS} slots; {CLIENTS} concurrent clients vs 1, {N_PREDICT} tokens each"
    print(f"\n2. continuous batching ({title})")
    print(f"  llama-server {' '.join(data['server_argv'][3:])}")
    print("    tok/s: tokens predicted / wall time from the first send to the last reply")
    print(CPU_WAIT_NOTE)
    print(
        format_row(
            BATCHING_ROW,
            "round",
            "order",
            "1 client tok/s",
            "wait",
            f"{CLIENTS} clients tok/s",
            "wait",
            "ratio",
            "slots",
        )
    )
    for row in data["rounds"]:
        one, many = row["one"], row["many"]
        print(
            format_row(
                BATCHING_ROW,
                row["round"],
                ",".join(map(str, row["order"])),
                f"{one['tok_s']:.2f}",
                percent(one["cpu_wait"]),
                f"{many['tok_s']:.2f}",
                percent(many["cpu_wait"]),
                f"{row['ratio']:.2f}",
                ",".join(map(str, many["slots"])),
            )
        )
    print(
        format_row(
            BATCHING_ROW,
            "median",
            "",
            f"{data['one_tok_s']:.2f}",
            "",
            f"{data['many_tok_s']:.2f}",
            "",
            f"{data['ratio']:.2f}",
            "",
        )
    )
    ratio, goal = data["ratio"], data["goal"]
    print(
        f"  median ratio {CLIENTS} clients / 1 client {ratio:.2f}, goal ≥ {goal:.1f}: {met(data['goal_met'])}"
    )


def report_build(data: dict[str, Any], cpus: int) -> None:
    info = data["buildinfo"]
    print("\n3. build once vs compile per node (machine time)")
    print(f"  artifact   {data['artifact']} ({data['artifact_bytes'] / MB:.1f} MB)")
    for key in ("version", "arch", "source", "compiler", "cmake", "targets", "cmake_flags", "built_at"):
        if key in info:
            print(f"    {key:<12} {info[key]}")
    print(
        f"  build      {minutes(data['build_seconds'])}: BUILDINFO build_seconds, measured by the build "
        "script (cmake configure + build)"
    )
    built_at = info.get("built_at")
    print(f"             when it built this artifact on this host ({cpus} CPUs; built_at {built_at})")
    installs = ", ".join(f"{value:.3f}" for value in data["install_seconds"])
    print(f"  install    {data['install_median_seconds']:.3f} s median, measured now ({installs} s)")
    print("             sha256 check against .sha256 + tar -xzf into staging + ARTIFACT.sha256 + rename")
    download = data["artifact_bytes"] / LINK_BYTES_PER_S
    print(f"             not counted: the download from the store (about {download:.2f} s per node at 1 GbE)")
    print(f"    {'nodes':>5}  {'compile per node':>24}  {'build once':>24}  ratio")
    for count, row in data["nodes"].items():
        print(
            f"    {count:>5}  {minutes(row['compile_per_node_seconds']):>24}  "
            f"{minutes(row['build_once_seconds']):>24}  {row['ratio']:>5.2f}"
        )
    ratio = data["nodes"][str(data["goal_nodes"])]["ratio"]
    print(
        f"  build once is {ratio:.2f} x faster at N = {data['goal_nodes']}, goal ≥ N/2 = {data['goal']:.0f}: "
        f"{met(data['goal_met'])}"
    )


def report(figures: dict[str, Any]) -> None:
    print("pifarm inference runtime benchmark (figures only; goals are informational)")
    if "host" in figures:
        host = figures["host"]
        print(f"  host       {host['cpus']} CPUs, {host['cpu'] or 'CPU model unknown'}")
        print(f"             load average {host['load_start']} at start, {host.get('load_end')} at end")
    if "binaries" in figures:
        print(f"  binaries   {figures['binaries']} (scripts/llama-server.sh --cached-only)")
    if "model" in figures:
        model = figures["model"]
        print(f"  model      {model['path']} ({model['size'] / MB:.1f} MB)")
        print(f"  threads    {figures['threads']} (llama-bench and llama-server alike)")
    if "efficiency" in figures:
        report_efficiency(figures["efficiency"])
    if "batching" in figures:
        report_batching(figures["batching"])
    if "build" in figures:
        report_build(figures["build"], figures["host"]["cpus"])


# -- main ----------------------------------------------------------------------------------


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--only", choices=PHASES, help="run one part (default: all three)")
    parser.add_argument(
        "--threads", type=positive, default=os.cpu_count() or 1, help="threads (default: all CPUs)"
    )
    parser.add_argument(
        "--requests",
        type=positive,
        default=5,
        help="efficiency rounds, each one llama-bench run and one timed request (default 5)",
    )
    parser.add_argument(
        "--bench-reps", type=positive, default=1, help="llama-bench -r in each efficiency round (default 1)"
    )
    parser.add_argument("--rounds", type=positive, default=3, help="1 vs 4 client rounds (default 3)")
    parser.add_argument("--runs", type=positive, default=5, help="timed artifact installs (default 5)")
    parser.add_argument("--model", help="model file (default: $PIFARM_TEST_MODEL or scripts/test-model.sh)")
    parser.add_argument("--workdir", help="directory for server logs and installs (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with all figures")
    return parser.parse_args(argv)


def interrupt(_signum: int, _frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, through every finally that stops a server.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    figures: dict[str, Any] = {"failures": [], "threads": args.threads}
    figures["host"] = {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_start": load_average()}
    try:
        build = resolve_build()
        figures["binaries"] = str(build.bin_dir)
        model = resolve_model(args.model) if args.only != "build" else None
    except BenchError as exc:
        figures["failures"].append({"phase": "setup", "error": str(exc)})
        return finish(args, figures)
    if model is not None:
        figures["model"] = {"path": str(model), "size": model.stat().st_size}
    try:
        with tempfile.TemporaryDirectory(prefix="pifarm-bench-", dir=args.workdir) as tmp:
            ctx = Context(build, model or Path(), args.threads, Path(tmp))
            phases: dict[str, Callable[[], dict[str, Any]]] = {
                "efficiency": lambda: efficiency(ctx, args.bench_reps, args.requests),
                "batching": lambda: batching(ctx, args.rounds),
                "build": lambda: build_vs_compile(ctx, args.runs),
            }
            for name, action in phases.items():
                if args.only not in (None, name):
                    continue
                try:
                    figures[name] = action()
                except Exception as exc:  # reported; the other phases still run
                    figures["failures"].append({"phase": name, "error": f"{type(exc).__name__}: {exc}"})
    except KeyboardInterrupt:
        figures["failures"].append({"phase": "interrupted", "error": "stopped by a signal; servers stopped"})
        finish(args, figures)
        return EXIT_INTERRUPTED
    return finish(args, figures)


def cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def finish(args: argparse.Namespace, figures: dict[str, Any]) -> int:
    figures["host"]["load_end"] = load_average()
    return print_figures(figures, args.json, report)


if __name__ == "__main__":
    sys.exit(main())
