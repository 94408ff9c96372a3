"""Checks a live Prometheus of the farm from the controller: targets, rules, the dashboard, an alert.

Run by the monitoring and farm scenarios (tasks/measure.yml). It
* waits until every target is up (each job and host printed);
* runs every PromQL expression of the deployed alert rules and of the Grafana dashboard against
  Prometheus's query API: each must parse and evaluate without error (an empty result is fine:
  a rule about a node that is well has nothing to return);
* runs the rules' unit tests on the monitoring host (promtool test rules) and prints the count;
* optionally stops a unit on a host (docker exec ... systemctl stop), waits for the named alert to be
  pending or firing, starts the unit again and waits for the alert to clear.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from measuring import expect, figure, finish

RULES_FILE = "/etc/prometheus/rules/pifarm.yml"
RULES_TEST = "/etc/prometheus/tests/pifarm-rules-test.yml"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {response.status_code}: {body.get('error', body)}")
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        return self.get("targets", state="active")["activeTargets"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.get("alerts")["alerts"]


def docker(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *argv], capture_output=True, text=True, check=False)


def wait_targets_up(prometheus: Prometheus, timeout: float, jobs: set[str]) -> None:
    started = time.monotonic()
    while True:
        targets = prometheus.targets()
        down = [t for t in targets if t["health"] != "up"]
        if (targets and not down) or time.monotonic() - started > timeout:
            break
        time.sleep(2)
    by_job: dict[str, list[str]] = {}
    for target in targets:
        health = "" if target["health"] == "up" else f" {target['health'].upper()}"
        by_job.setdefault(target["labels"]["job"], []).append(f"{target['labels'].get('host', '?')}{health}")
    figure(
        f"targets: {len(targets) - len(down)} of {len(targets)} up after {time.monotonic() - started:.0f} s:"
        f" {dict(sorted(by_job.items()))}"
    )
    for target in down:
        print(f"  down: {target['scrapeUrl']}: {target.get('lastError')}", flush=True)
    expect(bool(targets) and not down, f"every target is up ({len(down)} not)")
    missing = sorted(jobs - set(by_job))
    expect(not missing, f"Prometheus scrapes every expected job (missing: {missing})")


def rule_expressions(container: str) -> list[tuple[str, str]]:
    done = docker("exec", container, "cat", RULES_FILE)
    if done.returncode != 0:
        raise AssertionError(f"cannot read {RULES_FILE}: {done.stderr.strip()}")
    groups = yaml.safe_load(done.stdout)["groups"]
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"]) for group in groups for rule in group["rules"]
    ]


def dashboard_expressions(path: Path) -> list[tuple[str, str]]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append(
                (f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query)
            )
    return found


def grafana_to_promql(expr: str) -> str:
    """Dashboard variables as Grafana would fill them: every value, the scrape-sized rate window."""
    for variable in ("$host", "${host}", "$model", "${model}"):
        expr = expr.replace(f'"{variable}"', '".*"').replace(f"'{variable}'", "'.*'")
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")


def check_expressions(prometheus: Prometheus, expressions: list[tuple[str, str]], where: str) -> None:
    errors, returned = [], 0
    for name, expr in expressions:
        query = expr
        if expr.startswith("label_values("):
            # A Grafana variable query: label_values(metric, label) is a series lookup.
            metric = expr[len("label_values(") : -1].split(",")[0].strip()
            query = f"count({metric})"
        try:
            result = prometheus.get("query", query=grafana_to_promql(query))
            returned += bool(result["result"])
        except AssertionError as exc:
            errors.append(f"{name}: {exc}")
    figure(
        f"{where}: {len(expressions)} PromQL expressions evaluated, {len(errors)} errors,"
        f" {returned} returned data"
    )
    for error in errors:
        print(f"  {error}", flush=True)
    expect(not errors and bool(expressions), f"{where}: every expression evaluates ({len(errors)} errors)")


def rule_unit_tests(container: str) -> None:
    done = docker("exec", container, "promtool", "test", "rules", RULES_TEST)
    output = (done.stdout + done.stderr).strip()
    cases = docker("exec", container, "grep", "-c", "alertname:", RULES_TEST).stdout.strip()
    last = output.splitlines()[-1] if output else ""
    figure(f"alert rule unit tests (promtool test rules): {cases} alert checks -> {last}")
    expect(done.returncode == 0, f"promtool test rules passes: {output[-500:]}")


def alert_state(prometheus: Prometheus, name: str) -> str | None:
    states = {alert["state"] for alert in prometheus.alerts() if alert["labels"].get("alertname") == name}
    return "firing" if "firing" in states else "pending" if "pending" in states else None


def check_alert(prometheus: Prometheus, container: str, unit: str, name: str, timeout: float) -> None:
    stopped = docker("exec", container, "systemctl", "stop", unit)
    expect(stopped.returncode == 0, f"stop {unit} on {container}: {stopped.stderr.strip()}")
    started = time.monotonic()
    state = None
    try:
        while state is None and time.monotonic() - started < timeout:
            time.sleep(1)
            state = alert_state(prometheus, name)
        seconds = time.monotonic() - started
    finally:
        docker("exec", container, "systemctl", "start", unit)
    back = time.monotonic()
    while alert_state(prometheus, name) is not None and time.monotonic() - back < timeout:
        time.sleep(1)
    cleared = alert_state(prometheus, name) is None
    figure(
        f"alert: {unit} stopped on {container} -> {name} {state or 'never raised'} after {seconds:.1f} s;"
        f" started again -> {'cleared' if cleared else 'still raised'} after {time.monotonic() - back:.1f} s"
    )
    expect(state in ("pending", "firing"), f"{name} goes pending when {unit} stops")
    expect(cleared, f"{name} clears when {unit} is back")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prometheus", required=True, help="Prometheus URL as the controller reaches it")
    parser.add_argument("--container", required=True, help="the monitoring host's container")
    parser.add_argument("--dashboard", required=True, type=Path)
    parser.add_argument(
        "--stop-unit", help="a unit to stop, on --unit-container (default: the monitoring host)"
    )
    parser.add_argument("--unit-container")
    parser.add_argument("--alert", help="the alert that stopping --stop-unit raises")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--jobs", default="", help="comma-separated scrape jobs that must have targets")
    args = parser.parse_args()
    prometheus = Prometheus(args.prometheus)
    for name, check in (
        (
            "targets",
            lambda: wait_targets_up(prometheus, args.timeout, set(filter(None, args.jobs.split(",")))),
        ),
        ("rules", lambda: check_expressions(prometheus, rule_expressions(args.container), "alert rules")),
        (
            "dashboard",
            lambda: check_expressions(prometheus, dashboard_expressions(args.dashboard), "dashboard"),
        ),
        ("rule tests", lambda: rule_unit_tests(args.container)),
        (
            "alert",
            lambda: (
                args.stop_unit
                and check_alert(
                    prometheus,
                    args.unit_container or args.container,
                    args.stop_unit,
                    args.alert,
                    args.timeout,
                )
            ),
        ),
    ):
        started = time.monotonic()
        try:
            check()
        except (AssertionError, OSError, ValueError, KeyError, requests.RequestException) as exc:
            expect(False, f"{name}: {type(exc).__name__}: {exc}")
        print(f"check {name}: {time.monotonic() - started:.1f} s", flush=True)
    return finish("all checks passed")


if __name__ == "__main__":
    raise SystemExit(main())
