"""Gateway overhead on the running local farm: direct to one llama-server versus through HAProxy.

Needs the farm of ``make farm``. The same requests go, interleaved round by round, straight to one
node's llama-server and through the gateway's HAProxy, while HAProxy's runtime API holds every
other server of the model's edge pool in maintenance, so both paths end at the same llama-server
(restored afterwards). Printed: p50/p90 latency of a one-token completion and the added p50 (goal
at most 1 ms), generation rate of longer completions and its ratio (goal at least 0.98), and the
round trip of a job through NATS JetStream and a worker against the same request over HTTP.
Figures only: nothing here fails on a slow result, only when something does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests
import yaml
from bench_common import EXIT_FAILED, REPO, BenchError, address, docker

from pifarm_agent import jobs

# The farm's ports and user names, and the local farm's llama-server instances: from where the
# roles and the local inventory take them.
FARM = yaml.safe_load((REPO / "roles" / "farm" / "defaults" / "main.yml").read_text())
INSTANCE = yaml.safe_load((REPO / "inventory" / "local" / "group_vars" / "pifarm_nodes.yml").read_text())[
    "llama_server_instances"
][0]
SECRETS = Path(os.environ.get("PIFARM_CACHE", Path.home() / ".cache" / "pifarm")) / "farm-secrets"
ADMIN_SOCKET = "/run/haproxy/admin.sock"
# One line to HAProxy's runtime API from inside the gateway container (the socket is local to it).
RUNTIME_API = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
    " s.sendall(sys.argv[2].encode() + b'\\n'); print(s.makefile().read())"
)
PROMPT = "The capital of France is"


def runtime_api(gateway: str, command: str) -> str:
    return docker("exec", gateway, "python3", "-c", RUNTIME_API, ADMIN_SOCKET, command)


def edge_servers(gateway: str, backend: str) -> list[str]:
    lines = runtime_api(gateway, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return [
        row["svname"]
        for row in rows
        if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
    ]


def completion(url: str, n_predict: int, **extra: Any) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = requests.post(
        url + "/completion",
        json={"prompt": PROMPT, "n_predict": n_predict, "cache_prompt": True, **extra},
        timeout=300,
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
    return seconds, response.json()


def pct(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency(direct: str, gateway: str, rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for warm in (direct, gateway):
        completion(warm, 1)
    for number in range(rounds):
        # Alternate who goes first, so drift on the host weighs on both paths alike.
        order = ("direct", "gateway") if number % 2 == 0 else ("gateway", "direct")
        for path in order:
            times[path].append(completion(direct if path == "direct" else gateway, 1)[0] * 1000)
    return {
        path: {"p50_ms": statistics.median(values), "p90_ms": pct(values, 0.9)}
        for path, values in times.items()
    } | {"added_p50_ms": statistics.median(times["gateway"]) - statistics.median(times["direct"])}


def throughput(direct: str, gateway: str, rounds: int, n_predict: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    for number in range(rounds):
        order = ("direct", "gateway") if number % 2 == 0 else ("gateway", "direct")
        for path in order:
            seconds, body = completion(direct if path == "direct" else gateway, n_predict, ignore_eos=True)
            rates[path].append(body.get("tokens_predicted", n_predict) / seconds)
    direct_rate = statistics.median(rates["direct"])
    gateway_rate = statistics.median(rates["gateway"])
    return {
        "n_predict": n_predict,
        "direct_tok_s": direct_rate,
        "gateway_tok_s": gateway_rate,
        "ratio": gateway_rate / direct_rate,
    }


def nats_round_trip(
    direct: str, servers: list[str], model: str, rounds: int, n_predict: int
) -> dict[str, Any]:
    password = (SECRETS / "nats-producer-password").read_text().strip()
    user = FARM["farm_nats_users"]["producer"]
    settings = jobs.NatsSettings.parse({"servers": servers, "user": user, "password": password})
    http_ms: list[float] = []
    job_ms: list[float] = []
    llama_ms: list[float] = []
    for _ in range(rounds):
        http_ms.append(completion(direct, n_predict)[0] * 1000)
        job = jobs.Job(id=f"bench-{uuid.uuid4().hex}", model=model, prompt=PROMPT, n_predict=n_predict)
        result = asyncio.run(jobs.submit(settings, job, wait=True, timeout=120))
        job_ms.append(result["round_trip_ms"])
        llama_ms.append(result["latency_ms"])
    return {
        "n_predict": n_predict,
        "http_p50_ms": statistics.median(http_ms),
        "job_p50_ms": statistics.median(job_ms),
        "job_llama_p50_ms": statistics.median(llama_ms),
        "added_p50_ms": statistics.median(job_ms) - statistics.median(http_ms),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = INSTANCE["model"]
    backend = "edge_" + jobs.token(model)  # gateway_haproxy's backend name
    target = f"{args.node}_{INSTANCE['name']}"
    servers = edge_servers(args.gateway, backend)
    if target not in servers:
        raise BenchError(
            f"{backend} has no server {target} (servers: {servers}); is the farm up (make farm)?"
        )
    gateway_ip = address(args.gateway)
    direct = f"http://{address(args.node)}:{INSTANCE['port']}"
    gateway = f"http://{gateway_ip}:{FARM['farm_gateway_port']}"
    others = [server for server in servers if server != target]
    for server in others:
        runtime_api(args.gateway, f"set server {backend}/{server} state maint")
    try:
        figures = {
            "latency": latency(direct, gateway, args.rounds),
            "throughput": throughput(direct, gateway, max(3, args.rounds // 5), args.n_predict),
        }
    finally:
        for server in others:
            runtime_api(args.gateway, f"set server {backend}/{server} state ready")
    figures["nats"] = nats_round_trip(
        direct, [f"nats://{gateway_ip}:{FARM['farm_nats_port']}"], model, max(3, args.rounds // 4), 16
    )
    figures["pinned_to"] = f"{backend}/{target}"
    return figures


def report(figures: dict[str, Any]) -> None:
    lat, rate, job = figures["latency"], figures["throughput"], figures["nats"]
    print(f"gateway overhead, both paths ending at {figures['pinned_to']}:")
    print(
        f"  one-token completion p50: direct {lat['direct']['p50_ms']:.2f} ms, through HAProxy"
        f" {lat['gateway']['p50_ms']:.2f} ms -> added {lat['added_p50_ms']:+.2f} ms (goal <= 1 ms);"
        f" p90 {lat['direct']['p90_ms']:.2f} / {lat['gateway']['p90_ms']:.2f} ms"
    )
    print(
        f"  generation ({rate['n_predict']} tokens): direct {rate['direct_tok_s']:.1f} tok/s, through HAProxy"
        f" {rate['gateway_tok_s']:.1f} tok/s -> ratio {rate['ratio']:.3f} (goal >= 0.98)"
    )
    print(
        f"  NATS job round trip ({job['n_predict']} tokens) p50 {job['job_p50_ms']:.1f} ms (llama-server"
        f" {job['job_llama_p50_ms']:.1f} ms of it) vs direct HTTP {job['http_p50_ms']:.1f} ms ->"
        f" added {job['added_p50_ms']:+.1f} ms"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--gateway", default="gateway1", help="gateway container (default gateway1)")
    parser.add_argument("--node", default="node1", help="node container of the direct path (default node1)")
    parser.add_argument("--rounds", type=int, default=40, help="latency rounds per path (default 40)")
    parser.add_argument(
        "--n-predict", type=int, default=128, help="tokens per throughput request (default 128)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        figures = run(args)
    except (BenchError, jobs.JobError, requests.RequestException, OSError) as exc:
        print(f"bench/gateway.py: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        report(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
