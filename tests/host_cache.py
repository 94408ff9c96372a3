"""The test model and the llama.cpp build, from this host's caches, for the tests that run them.

Integration tests (tests/integration) and playbook tests (tests/roles) both import it; tests/ is
on sys.path through tests/conftest.py. Each fixture that uses these adds the checks of its own.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What scripts/llama-server.sh --cached-only exits with when nothing is built yet.
NO_CACHED_BUILD = 3


def cached_test_model() -> Path:
    """The real GGUF: $PIFARM_TEST_MODEL, else scripts/test-model.sh fetches it. Never skipped."""
    path = os.environ.get("PIFARM_TEST_MODEL")
    if not path:
        result = subprocess.run(
            [str(REPO / "scripts" / "test-model.sh")], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            pytest.fail(
                f"scripts/test-model.sh could not provide the test model:\n{result.stderr}", pytrace=False
            )
        path = result.stdout.strip().splitlines()[-1]
    model = Path(path)
    if not model.is_file():
        pytest.fail(
            f"test model {model} does not exist (PIFARM_TEST_MODEL or scripts/test-model.sh)", pytrace=False
        )
    return model


def cached_llama_bin(tool: str) -> Path:
    """The unpacked llama.cpp build: $PIFARM_LLAMA_BIN, else the cache of scripts/llama-server.sh.

    Skips (with the reason in the summary) when nothing is built: compiling takes minutes, and the
    CI build step that fills the cache comes with the runtime_builder role. Fails when the
    directory has no executable ``tool``.
    """
    path = os.environ.get("PIFARM_LLAMA_BIN")
    if not path:
        result = subprocess.run(
            [str(REPO / "scripts" / "llama-server.sh"), "--cached-only"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == NO_CACHED_BUILD:
            pytest.skip(
                f"no cached llama.cpp build (scripts/llama-server.sh --cached-only exit {NO_CACHED_BUILD}): "
                "run scripts/llama-server.sh once (builds it, about 15 min on 2 cores) or set "
                f"PIFARM_LLAMA_BIN to a directory holding {tool}"
            )
        if result.returncode != 0:
            pytest.fail(f"scripts/llama-server.sh --cached-only failed:\n{result.stderr}", pytrace=False)
        path = result.stdout.strip().splitlines()[-1]
    bin_dir = Path(path)
    if not os.access(bin_dir / tool, os.X_OK):
        pytest.fail(f"{bin_dir} holds no {tool} (PIFARM_LLAMA_BIN or scripts/llama-server.sh)", pytrace=False)
    return bin_dir
