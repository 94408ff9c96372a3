"""llm_probe against the real llama-server binary serving the real Gemma 3 270M test model.

The server comes from the llama.cpp build cache (scripts/llama-server.sh; the ``llama_bin`` fixture
skips with the reason when nothing is built) and runs on a free port with ``-np 2 --metrics``.
Most tests run the module in-process (exit_json/fail_json raise, so results are seen before
Ansible's no_log masking); one runs it through the ``ansible`` command as a play would.
Run with ``-s`` to see the figures measured.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest
from ansible_collections.pifarm.inference.plugins.modules import llm_probe
from module_harness import fail_module, patch_module_exits, run_module

PROMPTS = [
    "Name the largest planet of the solar system.",
    "Write one sentence about Raspberry Pi computers.",
    "What is 12 times 12?",
]
API_KEY = "pifarm-itest-llama-key-7Hq2"


@pytest.fixture(autouse=True)
def _raising_exits(monkeypatch) -> None:
    patch_module_exits(monkeypatch)


def show(label: str, result: dict) -> None:
    for entry in result["results"]:
        print(
            f"{label}: ttft {entry['ttft_ms']:.0f} ms, latency {entry['latency_ms']:.0f} ms, "
            f"{entry['tokens']} tokens ({entry['tokens_source']}), {entry['tokens_per_second']:.1f} tok/s "
            f"client-side, server {entry['server_tokens_per_second']} tok/s"
        )
    if "latency_p50_ms" in result:
        print(
            f"{label}: p50 {result['latency_p50_ms']:.0f} ms, p95 {result['latency_p95_ms']:.0f} ms, "
            f"mean ttft {result['ttft_mean_ms']:.0f} ms, aggregate {result['tokens_per_second']:.1f} tok/s"
        )


def counter(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text[:2000]}"
    return float(match.group(1))


def test_openai_endpoint_answers_and_is_measured(llama_server):
    result = run_module(llm_probe, url=llama_server.url, prompts=PROMPTS, max_tokens=32)
    show("openai", result)
    assert result["changed"] is False
    assert len(result["results"]) == 3
    for entry in result["results"]:
        assert entry["answer"].strip()
        assert entry["tokens_source"] == "usage"
        assert 1 <= entry["tokens"] <= 32
        assert 0 < entry["ttft_ms"] < entry["latency_ms"]
        assert entry["server_tokens_per_second"] > 0
    assert result["tokens"] == sum(e["tokens"] for e in result["results"])
    assert (
        result["latency_p50_ms"]
        <= result["latency_p95_ms"]
        == max(e["latency_ms"] for e in result["results"])
    )


def test_llama_server_endpoint_answers_and_is_measured(llama_server):
    result = run_module(
        llm_probe,
        url=llama_server.url,
        api="llama-server",
        prompts=["The capital of France is"],
        max_tokens=32,
    )
    show("llama-server", result)
    [entry] = result["results"]
    assert entry["answer"].strip()
    assert entry["tokens_source"] == "timings"
    assert entry["tokens"] == 32 or entry["finish_reason"] != "limit"
    assert 0 < entry["ttft_ms"] < entry["latency_ms"]


def test_tokens_reported_match_the_servers_own_counter(llama_server):
    before = counter(llama_server.url, "llamacpp:tokens_predicted_total")
    result = run_module(llm_probe, url=llama_server.url, prompts=PROMPTS[:2], max_tokens=16)
    after = counter(llama_server.url, "llamacpp:tokens_predicted_total")
    assert after - before == result["tokens"]


def test_missed_thresholds_fail_with_the_real_figures(llama_server):
    result = fail_module(
        llm_probe,
        url=llama_server.url,
        prompts=PROMPTS[:1],
        max_tokens=16,
        max_latency_ms=1,
        min_tokens_per_second=100000,
    )
    assert f"p95 latency {result['latency_p95_ms']:.1f} ms is above max_latency_ms 1 " in result["msg"]
    assert f"{result['tokens_per_second']:.2f} tokens/s ({result['tokens']} tokens) is below" in result["msg"]
    assert result["results"][0]["answer"].strip()


@pytest.fixture(scope="module")
def keyed_server(llama_server_factory):
    """A second server that requires an API key."""
    return llama_server_factory("-np", "1", "--api-key", API_KEY)


def test_wrong_api_key_is_refused_and_never_shown(keyed_server):
    result = fail_module(llm_probe, url=keyed_server.url, prompts=PROMPTS[:1], api_key="not-the-key-9f3b")
    assert result["msg"] == (
        f"llm_probe POST {keyed_server.url}/v1/chat/completions: prompt 1 of 1: HTTP 401 Unauthorized: "
        '{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
    )
    assert "not-the-key-9f3b" not in json.dumps(result)


def test_through_ansible_in_check_mode_with_the_key_masked(keyed_server, ansible_env):
    env = {**ansible_env, "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "json"}
    args = {"url": keyed_server.url, "prompts": PROMPTS[:1], "max_tokens": 16, "api_key": API_KEY}
    run = subprocess.run(
        ["ansible", "localhost", "--check", "-m", "pifarm.inference.llm_probe", "-a", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    show("ansible --check", result)
    assert result["changed"] is False
    assert result["results"][0]["answer"].strip()
    assert API_KEY not in run.stdout + run.stderr
