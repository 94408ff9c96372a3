"""What the benchmarks share: the checkout on sys.path, their error, the test model and the way out.

The benchmarks run as ``python bench/<name>.py`` (``make bench``, ``make bench-serving``), which puts
this directory first on sys.path: they import this module by its plain name, before anything from
the agent package or the integration tests' helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The agent package, the integration tests' helpers (moto server, proxies, manifests, processes) and
# what the scenarios' measuring scripts share (a steady load).
sys.path[:0] = [
    str(REPO / "files"),
    str(REPO / "tests" / "integration"),
    str(REPO / "molecule" / "resources"),
]

EXIT_FAILED = 1


class BenchError(Exception):
    """Something the benchmark relies on did not work; the figures that need it are missing."""


def docker(*argv: str) -> str:
    done = subprocess.run(["docker", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"docker {' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def address(container: str) -> str:
    """A local farm container's address on its docker network."""
    return docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container)


def resolve_model(explicit: str | None) -> Path:
    """--model, else $PIFARM_TEST_MODEL, else scripts/test-model.sh (as the integration tests do)."""
    path = explicit or os.environ.get("PIFARM_TEST_MODEL")
    if not path:
        # Its pip download runs with this interpreter (the venv's), as under scripts/run-tests.sh.
        result = subprocess.run(
            [str(REPO / "scripts" / "test-model.sh")],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
            env=dict(os.environ, PYTHON=sys.executable),
        )
        if result.returncode != 0:
            raise BenchError("scripts/test-model.sh could not provide the test model (see its output above)")
        path = result.stdout.strip().splitlines()[-1]
    model = Path(path)
    if not model.is_file():
        raise BenchError(f"model {model}: not a file")
    return model


def met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def print_figures(figures: dict[str, Any], as_json: bool, report: Callable[[dict[str, Any]], None]) -> int:
    """One JSON object or the ``report``, then the failures on stderr; the exit status."""
    figures["ok"] = not figures["failures"]
    if as_json:
        print(json.dumps(figures, sort_keys=True))
    else:
        report(figures)
    for failure in figures["failures"]:
        # The report is paragraphs: a failure after it stands apart like one.
        gap = "" if as_json else "\n"
        print(f"{gap}FAILED {failure['phase']}: {failure['error']}", file=sys.stderr)
    return 0 if figures["ok"] else EXIT_FAILED
