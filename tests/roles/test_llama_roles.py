"""runtime_builder and llama_server: their checks.

Bad input fails before the host is touched (the unreachable host of
tests/playbook_harness.py), or, for checks that read the host, in check mode on this
machine with a model cache in a temporary directory: each with a message naming
the value and never a credential. The artifacts commands both roles run
(``pifarm-agent artifact``) are tested in tests/integration/test_artifacts.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from playbook_harness import (
    ARGSPEC,
    LOCALHOST,
    assert_refused_before_the_host,
    first_failed_task,
    recap,
    run_role,
)
from store_fixtures import STORE_CREDENTIALS

PUBLISHER = {
    "farm_store_publisher_access_key": STORE_CREDENTIALS["farm_store_publisher_access_key"],
    "farm_store_publisher_secret_key": STORE_CREDENTIALS["farm_store_publisher_secret_key"],
    "runtime_builder_store_endpoint": "http://storage1:9000",
}
GEMMA = {"name": "gemma", "model": "gemma3-270m", "port": 8080}


# -- runtime_builder: checks before the host ------------------------------------------------


@pytest.mark.parametrize(
    ("override", "failing_task", "named"),
    [
        pytest.param({"runtime_builder_jobs": "many"}, ARGSPEC, "runtime_builder_jobs", id="jobs-not-int"),
        pytest.param(
            {"farm_store_publisher_secret_key": "has a space"},
            "Assert the publisher's store credentials are set",
            "farm_store_publisher_secret_key must be set",
            id="secret-with-whitespace",
        ),
        pytest.param(
            {"runtime_builder_llama_source": "/nonexistent/llama.cpp.tar.gz"},
            "Assert an operator source comes with its sha256 and version name",
            "runtime_builder_llama_source=/nonexistent/llama.cpp.tar.gz must be a tarball",
            id="source-missing",
        ),
        pytest.param(
            {"runtime_builder_llama_source_sha256": "0" * 64},
            "Assert the sha256 and version name describe an operator source",
            "set runtime_builder_llama_source too",
            id="sha256-without-source",
        ),
        pytest.param(
            {"runtime_builder_artifact_cache": "/nonexistent/cache"},
            "Assert the controller's artifact cache is a directory",
            "runtime_builder_artifact_cache=/nonexistent/cache is not a directory",
            id="cache-not-a-directory",
        ),
        pytest.param(
            {"runtime_builder_nice": 40},
            "Assert the build settings are sane",
            "runtime_builder_nice=40 (0-19)",
            id="nice-out-of-range",
        ),
        pytest.param(
            {"runtime_builder_store_endpoint": None},
            "Assert the store can be found",
            "the inventory group pifarm_storage has no host",
            id="no-store",
        ),
        pytest.param(
            {"runtime_builder_store_endpoint": "storage1:9000"},
            "Assert the store endpoint is scheme://host:port",
            "storage1:9000 is not scheme://host:port",
            id="endpoint-without-scheme",
        ),
    ],
)
def test_runtime_builder_refuses_bad_input_before_touching_the_host(
    tmp_path, ansible_env, override, failing_task, named
):
    result = run_role("runtime_builder", tmp_path, ansible_env, {**PUBLISHER, **override})
    assert_refused_before_the_host(result, failing_task, named)
    for secret in (STORE_CREDENTIALS["farm_store_publisher_secret_key"], "has a space"):
        assert secret not in result.stdout, "a credential was printed"


def test_runtime_builder_refuses_an_architecture_without_flags(tmp_path, ansible_env):
    """On this machine, in check mode: the architecture comes from its facts."""
    extra = {**PUBLISHER, "runtime_builder_arch_flags": {"riscv64": "-DGGML_NATIVE=ON"}}
    result = run_role("runtime_builder", tmp_path, ansible_env, extra, inventory=LOCALHOST, check=True)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert "Assert build flags are set for the builder's architecture" in first_failed_task(result)
    assert f"set runtime_builder_arch_flags.{os.uname().machine}, for example" in result.stdout


def test_runtime_builder_good_input_reaches_the_host(tmp_path, ansible_env):
    result = run_role("runtime_builder", tmp_path, ansible_env, PUBLISHER)
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
    assert STORE_CREDENTIALS["farm_store_publisher_secret_key"] not in result.stdout


# -- llama_server: checks before the host ---------------------------------------------------


@pytest.mark.parametrize(
    ("instances", "extra", "failing_task", "named"),
    [
        pytest.param([{**GEMMA, "slots": "many"}], {}, ARGSPEC, "llama_server_instances", id="slots-not-int"),
        pytest.param(
            [{**GEMMA, "threads": 4}],
            {},
            "Assert each instance's threads fit into the inference cores",
            "threads=4, but farm_cpu_inference_cores=1-3 has 3 CPU(s)",
            id="more-threads-than-inference-cores",
        ),
        pytest.param(
            [{**GEMMA, "name": "Gemma"}],
            {},
            "Assert each instance has a valid name, model and port",
            "llama_server_instances[0] (name Gemma",
            id="bad-name",
        ),
        pytest.param(
            [{**GEMMA, "port": 80}],
            {},
            "Assert each instance has a valid name, model and port",
            "port 80)",
            id="privileged-port",
        ),
        pytest.param(
            [GEMMA, {**GEMMA, "name": "gemma2"}],
            {},
            "Assert no instance name or port is used twice",
            "on ports 8080, 8080",
            id="port-used-twice",
        ),
        pytest.param(
            [{**GEMMA, "slots": 8, "ctx_size": 1024}],
            {},
            "Assert each instance's slots, context and batch sizes are sane",
            "ctx_size=1024 (at least 256 tokens per slot",
            id="context-too-small-for-the-slots",
        ),
        pytest.param(
            [{**GEMMA, "api_key": "Zq short"}],
            {},
            "Assert each API key is usable",
            "The api_key of instance(s) gemma must be",
            id="api-key-too-short",
        ),
        pytest.param(
            [GEMMA],
            {"llama_server_artifact": "llama.cpp-latest"},
            "Assert the artifact and the other settings are sane",
            "llama_server_artifact=llama.cpp-latest",
            id="bad-artifact-name",
        ),
        pytest.param(
            [GEMMA],
            {"llama_server_artifact_sha256": "abc123"},
            "Assert the artifact and the other settings are sane",
            "llama_server_artifact_sha256=abc123",
            id="bad-artifact-sha256",
        ),
    ],
)
def test_llama_server_refuses_bad_input_before_touching_the_host(
    tmp_path, ansible_env, instances, extra, failing_task, named
):
    result = run_role("llama_server", tmp_path, ansible_env, {"llama_server_instances": instances, **extra})
    assert_refused_before_the_host(result, failing_task, named)
    assert "Zq short" not in result.stdout, "an API key was printed"


def test_llama_server_good_input_reaches_the_host(tmp_path, ansible_env):
    instance = {**GEMMA, "api_key": "Key-7c1e0b9d4f2a6e38", "slots": 4, "ctx_size": 8192}
    result = run_role("llama_server", tmp_path, ansible_env, {"llama_server_instances": [instance]})
    counts = recap(result)
    assert counts["unreachable"] == 1
    assert counts["failed"] == 0
    assert "Key-7c1e0b9d4f2a6e38" not in result.stdout


# -- llama_server: checks that read the node, on this machine in check mode -----------------


def cached_model(models_dir: Path, name: str, memory_mb: int) -> Path:
    """A model in the cache's layout: <name>/<sha256>/{model.gguf,manifest.json} and current -> <sha256>."""
    data = b"GGUF" + os.urandom(64)
    sha256 = hashlib.sha256(data).hexdigest()
    entry = models_dir / name / sha256
    entry.mkdir(parents=True)
    (entry / "model.gguf").write_bytes(data)
    manifest = {
        "schema": 1,
        "name": name,
        "version": "1.0.0",
        "format": "gguf",
        "quantization": "Q4_K_M",
        "size": len(data),
        "sha256": sha256,
        "context_length": 32768,
        "memory_required_mb": memory_mb,
        "npu_required": False,
        "created": "2026-11-22T12:00:00Z",
    }
    (entry / "manifest.json").write_text(json.dumps(manifest))
    (models_dir / name / "current").symlink_to(sha256)
    return entry


def node_check(tmp_path, ansible_env, models_dir: Path, **extra) -> subprocess.CompletedProcess:
    cores = f"0-{os.cpu_count() - 1}" if (os.cpu_count() or 1) > 1 else "0"
    variables = {
        "farm_models_dir": str(models_dir),
        "farm_cpu_inference_cores": cores,
        "llama_server_instances": [GEMMA],
        **extra,
    }
    return run_role("llama_server", tmp_path, ansible_env, variables, inventory=LOCALHOST, check=True)


def test_llama_server_refuses_a_model_that_is_not_in_the_cache(tmp_path, ansible_env):
    models = tmp_path / "models"
    models.mkdir()
    result = node_check(tmp_path, ansible_env, models)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert "Assert each instance's model is in the cache" in first_failed_task(result)
    assert f"the model path {models}/gemma3-270m/current/model.gguf does not exist" in " ".join(
        result.stdout.split()
    )


def test_llama_server_refuses_a_manifest_asking_for_more_memory_than_the_node_has(tmp_path, ansible_env):
    models = tmp_path / "models"
    cached_model(models, "gemma3-270m", memory_mb=64 * 1024 * 1024)
    result = node_check(tmp_path, ansible_env, models)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["changed"] == 0
    assert "Assert each model is a GGUF that fits into this node's memory" in first_failed_task(result)
    assert "memory_required_mb=67108864 in its manifest, but the node has" in " ".join(result.stdout.split())


def test_llama_server_refuses_instances_whose_limits_do_not_fit_together(tmp_path, ansible_env):
    models = tmp_path / "models"
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    cached_model(models, "gemma3-270m", memory_mb=total_mb * 3 // 5)
    instances = [GEMMA, {**GEMMA, "name": "gemma-b", "port": 8081}]
    result = node_check(tmp_path, ansible_env, models, llama_server_instances=instances)
    assert recap(result, "localhost")["failed"] == 1
    assert "Assert the instances' memory limits fit together" in first_failed_task(result)
    assert "serve fewer or smaller models here" in result.stdout


def test_llama_server_refuses_inference_cores_the_node_does_not_have(tmp_path, ansible_env):
    models = tmp_path / "models"
    models.mkdir()
    result = node_check(
        tmp_path,
        ansible_env,
        models,
        farm_cpu_inference_cores="0,255",
        llama_server_instances=[{**GEMMA, "threads": 1}],
    )
    assert recap(result, "localhost")["failed"] == 1
    assert "Assert the inference cores exist on this node" in first_failed_task(result)
    assert "farm_cpu_inference_cores=0,255 names CPU 255" in result.stdout
