"""What the scenarios' measuring scripts share (molecule/*/verify_*.py).

tasks/measure.yml runs them with this directory on PYTHONPATH. A script prints
``[figures]`` lines, which make test repeats in its summary, and collects failed
expectations instead of stopping at the first, so one run shows every outcome.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

failures: list[str] = []


def figure(text: str) -> None:
    print(f"[figures] {text}", flush=True)


def expect(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        print(f"FAILED: {what}", flush=True)


def finish(passed: str) -> int:
    """The script's exit status: 1 with the failures on stderr, else 0 after ``passed``."""
    if failures:
        print(f"{len(failures)} failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    print(passed)
    return 0


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample a Prometheus endpoint serves, as {(name, sorted labels): value}."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


class SteadyLoad:
    """Clients calling ``send`` back to back until stopped; ``answers`` holds (time sent, result)."""

    def __init__(self, send: Callable[[], Any], clients: int) -> None:
        self.send = send
        self.answers: list[tuple[float, Any]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            self.answers.append((sent, self.send()))

    def __enter__(self) -> SteadyLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
