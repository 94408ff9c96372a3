"""A staged rollout against a raw restart, under the same fixed load, on the running local farm.

Needs the farm of ``make farm``. Clients keep sending short chat requests through the gateway
while, first, each node's llama-server is restarted in turn without draining it (the raw way a
model switch restarted an instance before rollouts: ``systemctl restart``, then wait for
``/health``), then ``playbooks/rollout_model.yml`` rolls a re-release of the served model out
(the model requantized to its own type with a new name in its metadata: a new sha256, the same
answers). Printed per node: the seconds each path took and the requests that failed meanwhile,
and the ratio of the two times. Goal: at most 30 s per node for the rollout, 0 failed.
Figures only: nothing here fails on a slow result, only when something does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
import yaml
from bench_common import EXIT_FAILED, REPO, BenchError, address, docker, met, print_figures

from measuring import SteadyLoad

FARM = yaml.safe_load((REPO / "roles" / "farm" / "defaults" / "main.yml").read_text())
INSTANCE = yaml.safe_load((REPO / "inventory" / "local" / "group_vars" / "pifarm_nodes.yml").read_text())[
    "llama_server_instances"
][0]
NODES = ("node1", "node2")
CACHE = Path(os.environ.get("PIFARM_CACHE", Path.home() / ".cache" / "pifarm"))
PROMPT = [{"role": "user", "content": "Write one short sentence about cats."}]


def ask(url: str) -> int:
    """One short chat request through the gateway; its status, 0 when it got no answer."""
    try:
        return requests.post(
            url + "/v1/chat/completions",
            json={"model": INSTANCE["model"], "messages": PROMPT, "max_tokens": 8},
            timeout=120,
        ).status_code
    except requests.RequestException:
        return 0


def failed_since(load: SteadyLoad, mark: int) -> int:
    return sum(1 for _sent, status in load.answers[mark:] if status != 200)


def raw_restart(node: str) -> float:
    """systemctl restart of the node's instance, then GET /health = 200: no drain, no probe."""
    unit = FARM["farm_units"]["llama_server"].replace("{instance}", INSTANCE["name"])
    health = f"http://{address(node)}:{INSTANCE['port']}/health"
    started = time.monotonic()
    docker("exec", node, "systemctl", "restart", unit)
    while time.monotonic() - started < 300:
        try:
            if requests.get(health, timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise BenchError(f"{node}: {health} did not answer 200 within 300 s of the restart")


def playbook(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        # The venv's, beside this interpreter: make puts it on PATH, a plain run may not.
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(REPO / "inventory" / "local"),
            *argv,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        # As make runs it: this checkout as pifarm.inference, the venv's tools (ansible-playbook, and
        # pifarm-agent, which publishing runs) first.
        env={
            "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".venv" / "collections"),
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        },
    )
    return done


def publish_re_release(work: Path, version: str) -> None:
    """The served model requantized to its own type, named anew: a version with a new sha256."""
    model = subprocess.run(
        [str(REPO / "scripts" / "test-model.sh"), INSTANCE["model"]],
        capture_output=True,
        text=True,
        check=False,
    )
    if model.returncode != 0:
        raise BenchError(f"scripts/test-model.sh {INSTANCE['model']}: {model.stderr.strip()[-300:]}")
    release = work / f"{INSTANCE['model']}-{version}.gguf"
    quantize = CACHE / "llama.cpp" / "current" / "bin" / "llama-quantize"
    done = subprocess.run(
        [str(quantize), "--allow-requantize", "--override-kv", f"general.name=str:bench-{version}",
         model.stdout.strip().splitlines()[-1], str(release), "Q4_1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"llama-quantize: {done.stderr.strip()[-300:]}")
    published = playbook(
        str(REPO / "molecule" / "resources" / "publish_test_model.yml"),
        "-e", f"pifarm_test_model={INSTANCE['model']}",
        "-e", f"pifarm_test_model_version={version}",
        "-e", f"pifarm_test_model_file={release}",
    )  # fmt: skip
    if published.returncode != 0:
        raise BenchError(f"publishing {version} failed: {published.stdout[-800:]}{published.stderr[-800:]}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    gateway = f"http://{address(args.gateway)}:{FARM['farm_gateway_port']}"
    # Newer than any earlier run's (a version is at most 9 digits a part): minutes since 2026.
    version = f"{args.major}.0.{int(time.time() - 1_767_225_600) // 60}"
    figures: dict[str, Any] = {"version": version, "clients": args.clients, "failures": []}
    with tempfile.TemporaryDirectory(prefix="pifarm-bench-rollout-") as work:
        publish_re_release(Path(work), version)
        report = Path(work) / "report.json"
        with SteadyLoad(lambda: ask(gateway), args.clients) as load:
            time.sleep(2)
            raw = {}
            for node in NODES:
                mark = len(load.answers)
                seconds = raw_restart(node)
                time.sleep(1)  # the requests that were running on it end
                raw[node] = {"seconds": round(seconds, 1), "failed": failed_since(load, mark)}
            mark = len(load.answers)
            rolled = playbook(
                str(REPO / "playbooks" / "rollout_model.yml"),
                "-e", json.dumps({
                    "model_rollout_model": INSTANCE["model"], "model_rollout_version": version,
                    "model_rollout_gate_window": args.gate_window, "model_rollout_gate_min_requests": 5,
                    # Two nodes sharing a busy 2-core host differ by up to a third in tokens/s.
                    "model_rollout_gate_min_tokens_per_second_ratio": args.min_tps_ratio,
                    "model_rollout_report_file": str(report),
                }),
            )  # fmt: skip
            rollout_failed = failed_since(load, mark)
            requests_sent = len(load.answers) - mark
        summary = json.loads(report.read_text()) if report.is_file() else {}
        if rolled.returncode != 0 or not summary:
            raise BenchError(
                f"the rollout of {version} failed: {summary.get('stopped') or rolled.stdout[-1500:]}"
            )
    per_node = {row["node"]: row["seconds"] for row in summary["nodes"]}
    figures.update(
        raw=raw,
        rollout={"per_node": per_node, "total_seconds": summary["seconds"], "failed": rollout_failed,
                 "requests": requests_sent, "gate_window": args.gate_window},
        statuses=dict(Counter(status for _sent, status in load.answers)),
    )  # fmt: skip
    if rollout_failed:
        figures["failures"].append({"phase": "rollout", "error": f"{rollout_failed} requests failed"})
    return figures


def report(figures: dict[str, Any]) -> None:
    raw, rollout = figures["raw"], figures["rollout"]
    print(
        f"rollout of a re-release ({figures['version']}) under {figures['clients']} clients,"
        " against a raw restart:"
    )
    for node in NODES:
        seconds = rollout["per_node"].get(node)
        ratio = f"{seconds / raw[node]['seconds']:.1f}x" if seconds and raw[node]["seconds"] else "-"
        print(
            f"  {node}: raw restart {raw[node]['seconds']:.1f} s, {raw[node]['failed']} failed;"
            f" rollout {seconds} s (drain, switch, health, probe, enable) -> {ratio} the time;"
            f" goal <= 30 s per node: {met(seconds is not None and seconds <= 30)}"
        )
    print(
        f"  rollout total {rollout['total_seconds']} s (gate window {rollout['gate_window']} s included):"
        f" {rollout['failed']} of {rollout['requests']} requests failed"
        f" (goal 0: {met(rollout['failed'] == 0)});"
        f" the raw restarts failed {sum(r['failed'] for r in raw.values())}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--gateway", default="gateway1", help="gateway container (default gateway1)")
    parser.add_argument("--clients", type=int, default=2, help="clients of the fixed load (default 2)")
    parser.add_argument("--gate-window", type=int, default=20, help="the gate's window, s (default 20)")
    parser.add_argument(
        "--min-tps-ratio", type=float, default=0.5, help="the gate's tokens/s ratio threshold (default 0.5)"
    )
    parser.add_argument("--major", type=int, default=2, help="major version of the re-release (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        figures = run(args)
    except (BenchError, requests.RequestException, OSError, ValueError) as exc:
        print(f"bench/rollout.py: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return print_figures(figures, args.json, report)


if __name__ == "__main__":
    sys.exit(main())
