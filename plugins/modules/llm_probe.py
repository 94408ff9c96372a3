#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llm_probe
short_description: Send prompts to an LLM server and measure time to first token, latency and tokens/s
version_added: 0.1.0
description:
  - Sends each prompt in O(prompts) to an LLM server, one after the other, as a streaming request,
    and measures for each the time to the first generated token (TTFT), the total latency and the
    tokens generated per second. The smoke test of a rollout - a served model answers, fast enough.
  - O(api=openai) posts to the OpenAI-compatible C(/v1/chat/completions) endpoint (llama-server's,
    or any other server's) with each prompt as one user message and C(stream=true), asking for the
    token usage in the last event. O(api=llama-server) posts to llama-server's own C(/completion)
    endpoint with the prompt as raw text and C(stream=true).
  - Because the answer is streamed, the time to first token is measured when the first event that
    carries generated text arrives, not derived from the total.
  - The number of tokens generated comes from the server when it reports it (C(usage) in the
    OpenAI stream, C(timings) in llama-server's); otherwise it is the number of streamed events
    that carried text. RV(results[].tokens_source) says which.
  - Fails when an answer is empty, when the server answers with an HTTP error, a connection error
    or not within O(timeout), when a stream ends before the server said the answer was complete,
    and when a threshold is missed; the message gives the figures.
options:
  url:
    description:
      - Base URL of the server, for example V(http://node1.farm:8080).
      - For O(api=openai) a URL ending in C(/v1) is accepted too; C(/chat/completions) is then appended.
    type: str
    required: true
  api:
    description:
      - Which endpoint to call. V(openai) is C(/v1/chat/completions), V(llama-server) is
        llama-server's C(/completion).
    type: str
    choices: [openai, llama-server]
    default: openai
  model:
    description:
      - The C(model) of the OpenAI request. llama-server answers with the model it serves whatever
        this is; most other OpenAI-compatible servers require it. Not sent when omitted.
      - Ignored with O(api=llama-server).
    type: str
  prompts:
    description:
      - The prompts to send, in this order, one request each. At least one.
    type: list
    elements: str
    required: true
  max_tokens:
    description:
      - The most tokens the server may generate per prompt (C(max_tokens), or C(n_predict) for
        O(api=llama-server)).
    type: int
    default: 64
  api_key:
    description:
      - Sent in an C(Authorization) header as a bearer token, for a server started with an API key.
        Never logged and never part of an error message.
    type: str
  timeout:
    description:
      - Seconds to wait for the connection and then for each part of the streamed answer.
    type: float
    default: 60
  max_latency_ms:
    description:
      - Fail when the p95 latency of the prompts is above this many milliseconds. With fewer than
        20 prompts the p95 is the slowest prompt.
    type: float
  min_tokens_per_second:
    description:
      - Fail when the aggregate rate, all tokens generated divided by the sum of the prompts'
        latencies, is below this.
    type: float
  max_ttft_ms:
    description:
      - Fail when the p95 time to first token of the prompts is above this many milliseconds. With
        fewer than 20 prompts the p95 is the slowest prompt's.
    type: float
    version_added: 0.2.0
  validate_certs:
    description:
      - Verify the server's TLS certificate for an C(https) URL.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates to verify the server's certificate with, for a farm CA.
    type: path
author:
  - pifarm.inference maintainers (@pifarm)
attributes:
  check_mode:
    description: >-
      A probe only reads: it sends the prompts and measures in check mode exactly as in a normal run,
      and never changes anything, so it always reports C(changed=false).
    support: full
  diff_mode:
    description: Nothing is changed, so there is nothing to show.
    support: none
  platform:
    description: Any host that can reach the server over HTTP(S); the Python standard library is enough.
    support: full
    platforms: posix
seealso:
  - name: llama-server HTTP API
    description: The C(/completion) and C(/v1/chat/completions) endpoints and their streamed events.
    link: https://github.com/ggml-org/llama.cpp/blob/master/tools/server/README.md
"""

EXAMPLES = r"""
- name: Probe the node's model through the OpenAI-compatible endpoint
  pifarm.inference.llm_probe:
    url: "http://{{ inventory_hostname }}:8080"
    prompts:
      - Name the largest planet of the solar system.
      - Write one sentence about Raspberry Pi computers.
    max_tokens: 32
    max_latency_ms: 5000
    min_tokens_per_second: 5
  delegate_to: localhost
  register: probe

- name: Show the figures
  ansible.builtin.debug:
    msg: >-
      TTFT {{ probe.ttft_mean_ms | round(0) }} ms, p95 {{ probe.latency_p95_ms | round(0) }} ms,
      {{ probe.tokens_per_second | round(1) }} tokens/s

- name: Probe llama-server's own endpoint on a server that requires an API key
  pifarm.inference.llm_probe:
    url: https://gateway.farm:8443
    api: llama-server
    api_key: "{{ vault_llama_api_key }}"
    ca_path: /etc/pifarm/farm-ca.pem
    prompts: ["The capital of France is"]
"""

RETURN = r"""
endpoint:
  description: The URL the prompts were posted to.
  returned: always
  type: str
  sample: http://node1.farm:8080/v1/chat/completions
results:
  description: One entry per prompt answered, in the order sent.
  returned: always
  type: list
  elements: dict
  contains:
    prompt:
      description: The prompt.
      type: str
      sample: Name the largest planet of the solar system.
    answer:
      description: The generated text.
      type: str
      sample: The largest planet in our solar system is Jupiter.
    ttft_ms:
      description: Milliseconds from sending the request to the first event carrying generated text.
      type: float
      sample: 61.4
    latency_ms:
      description: Milliseconds from sending the request to the end of the answer.
      type: float
      sample: 402.9
    tokens:
      description: Tokens generated.
      type: int
      sample: 13
    tokens_source:
      description: >-
        Where RV(results[].tokens) comes from: V(usage) (the OpenAI usage object), V(timings)
        (llama-server's timings) or V(chunks) (streamed events that carried text).
      type: str
      sample: usage
    tokens_per_second:
      description: RV(results[].tokens) divided by RV(results[].latency_ms), as a client sees it.
      type: float
      sample: 32.3
    server_tokens_per_second:
      description: >-
        The generation rate the server reports (llama-server's C(timings.predicted_per_second)),
        or null when it reports none.
      type: float
      sample: 41.2
    reasoning_chars:
      description: >-
        Characters of C(reasoning_content) the server streamed apart from the answer (reasoning
        models); they count towards the tokens and the time to first token, not towards the answer.
      type: int
      sample: 0
    finish_reason:
      description: >-
        Why generation stopped, as the server said (C(finish_reason), or llama-server's C(stop_type)).
      type: str
      sample: stop
latency_p50_ms:
  description: Median latency over the prompts (nearest rank).
  returned: when every prompt was answered
  type: float
  sample: 398.0
latency_p95_ms:
  description: 95th percentile latency over the prompts (nearest rank).
  returned: when every prompt was answered
  type: float
  sample: 412.7
ttft_mean_ms:
  description: Mean time to first token over the prompts.
  returned: when every prompt was answered
  type: float
  sample: 58.9
ttft_p95_ms:
  description: 95th percentile time to first token over the prompts (nearest rank).
  returned: when every prompt was answered
  type: float
  sample: 61.2
tokens:
  description: Tokens generated over all prompts.
  returned: when every prompt was answered
  type: int
  sample: 41
tokens_per_second:
  description: Aggregate rate, RV(tokens) divided by the sum of the latencies.
  returned: when every prompt was answered
  type: float
  sample: 33.9
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
import json
import math
import time
from http.client import HTTPException
from urllib.error import HTTPError, URLError

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.urls import ConnectionError as UrlsConnectionError
from ansible.module_utils.urls import SSLValidationError, open_url

BODY_EXCERPT_CHARS = 300
PROMPT_EXCERPT_CHARS = 60


class ProbeError(Exception):
    """A prompt could not be answered; the message is for the operator, the partial results go along."""


def endpoint_url(base: str, api: str) -> str:
    base = base.rstrip("/")
    if api == "llama-server":
        return f"{base}/completion"
    if base.endswith("/v1"):
        return f"{base}/chat/completions"
    return f"{base}/v1/chat/completions"


def request_body(params: dict, prompt: str) -> dict:
    if params["api"] == "llama-server":
        return {"prompt": prompt, "n_predict": params["max_tokens"], "stream": True}
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": params["max_tokens"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params["model"]:
        body["model"] = params["model"]
    return body


def excerpt(text: str, limit: int, secret: str | None = None) -> str:
    """``text`` on one line, at most ``limit`` characters, with ``secret`` replaced."""
    if secret:
        text = text.replace(secret, "********")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sse_events(response):
    """Yield the data of each server-sent event; comments (``:`` pings) and other fields are skipped."""
    data: list[str] = []
    for raw in iter(response.readline, b""):
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class Answer:
    """What the stream of one prompt said, and when."""

    def __init__(self, started: float):
        self.started = started
        self.first_token_at: float | None = None
        self.text: list[str] = []
        self.reasoning_chars = 0
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.timings_tokens: int | None = None
        self.server_rate: float | None = None
        self.finish_reason: str | None = None
        self.complete = False

    def generated(self, text: str, now: float, reasoning: bool = False) -> None:
        if not text:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        self.chunks += 1
        if reasoning:
            self.reasoning_chars += len(text)
        else:
            self.text.append(text)

    def timings(self, timings: dict | None) -> None:
        if isinstance(timings, dict):
            if timings.get("predicted_n") is not None:
                self.timings_tokens = int(timings["predicted_n"])
            if timings.get("predicted_per_second") is not None:
                self.server_rate = float(timings["predicted_per_second"])


def read_openai_event(event: dict, answer: Answer, now: float) -> None:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        answer.generated(delta.get("reasoning_content") or "", now, reasoning=True)
        answer.generated(delta.get("content") or "", now)
        if choice.get("finish_reason"):
            answer.finish_reason = choice["finish_reason"]
            answer.complete = True
    usage = event.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        answer.usage_tokens = int(usage["completion_tokens"])
    answer.timings(event.get("timings"))


def read_llama_server_event(event: dict, answer: Answer, now: float) -> None:
    answer.generated(event.get("content") or "", now)
    if event.get("stop"):
        answer.complete = True
        answer.finish_reason = event.get("stop_type") or "stop"
        answer.timings(event.get("timings"))
        if answer.timings_tokens is None and event.get("tokens_predicted") is not None:
            answer.timings_tokens = int(event["tokens_predicted"])


def post(module: AnsibleModule, url: str, body: dict):
    params = module.params
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if params["api_key"]:
        headers["Authorization"] = f"Bearer {params['api_key']}"
    try:
        return open_url(
            url,
            data=json.dumps(body),
            headers=headers,
            method="POST",
            timeout=params["timeout"],
            validate_certs=params["validate_certs"],
            ca_path=params["ca_path"],
            follow_redirects="none",
            decompress=False,
            use_netrc=False,
        )
    except HTTPError as error:
        try:
            text = to_text(error.read(), errors="replace")
        except OSError:
            text = ""
        body_text = excerpt(text, BODY_EXCERPT_CHARS, params["api_key"]) or "(empty body)"
        raise ProbeError(f"HTTP {error.code} {error.reason}: {body_text}") from None
    except TimeoutError:
        raise ProbeError(f"no response within the timeout of {params['timeout']:g} s") from None
    except SSLValidationError as error:
        raise ProbeError(f"TLS certificate not accepted: {error} (validate_certs, ca_path)") from None
    except (URLError, UrlsConnectionError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ProbeError(f"cannot connect: {reason}") from None


def probe_prompt(module: AnsibleModule, url: str, prompt: str) -> dict:
    params = module.params
    read_event = read_llama_server_event if params["api"] == "llama-server" else read_openai_event
    started = time.monotonic()
    response = post(module, url, request_body(params, prompt))
    answer = Answer(started)
    try:
        content_type = response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type:
            text = excerpt(to_text(response.read(), errors="replace"), BODY_EXCERPT_CHARS, params["api_key"])
            raise ProbeError(f"the server did not stream its answer (Content-Type {content_type!r}): {text}")
        for data in sse_events(response):
            now = time.monotonic()
            if data.strip() == "[DONE]":
                answer.complete = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise ProbeError(
                    f"the stream carried an event that is not JSON: {excerpt(data, 120)}"
                ) from None
            if not isinstance(event, dict):
                raise ProbeError(f"the stream carried an event that is not an object: {excerpt(data, 120)}")
            if event.get("error"):
                error = excerpt(json.dumps(event["error"]), BODY_EXCERPT_CHARS, params["api_key"])
                raise ProbeError(f"the server reported an error in the stream: {error}")
            read_event(event, answer, now)
    except TimeoutError:
        raise ProbeError(
            f"the answer stalled: nothing streamed for {params['timeout']:g} s "
            f"after {answer.chunks} events with text"
        ) from None
    except (OSError, HTTPException) as error:
        raise ProbeError(f"the connection broke after {answer.chunks} events with text: {error!r}") from None
    except UnicodeDecodeError as error:
        raise ProbeError(f"the stream is not UTF-8: {error}") from None
    finally:
        response.close()
    finished = time.monotonic()
    if not answer.complete:
        raise ProbeError(
            f"the stream ended after {answer.chunks} events with text without saying the answer was "
            "complete (no finish_reason, [DONE] or stop event): the server or a proxy cut it short"
        )
    return summarise(prompt, answer, finished)


def summarise(prompt: str, answer: Answer, finished: float) -> dict:
    if answer.usage_tokens is not None:
        tokens, source = answer.usage_tokens, "usage"
    elif answer.timings_tokens is not None:
        tokens, source = answer.timings_tokens, "timings"
    else:
        tokens, source = answer.chunks, "chunks"
    latency = finished - answer.started
    first = answer.first_token_at if answer.first_token_at is not None else finished
    return {
        "prompt": prompt,
        "answer": "".join(answer.text),
        "reasoning_chars": answer.reasoning_chars,
        "ttft_ms": round((first - answer.started) * 1000, 1),
        "latency_ms": round(latency * 1000, 1),
        "tokens": tokens,
        "tokens_source": source,
        "tokens_per_second": round(tokens / latency, 2) if latency > 0 else 0.0,
        "server_tokens_per_second": round(answer.server_rate, 2) if answer.server_rate is not None else None,
        "finish_reason": answer.finish_reason,
    }


def nearest_rank(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def aggregate(results: list[dict]) -> dict:
    latencies = [r["latency_ms"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    total_seconds = sum(latencies) / 1000
    return {
        "latency_p50_ms": nearest_rank(latencies, 0.50),
        "latency_p95_ms": nearest_rank(latencies, 0.95),
        "ttft_mean_ms": round(sum(r["ttft_ms"] for r in results) / len(results), 1),
        "ttft_p95_ms": nearest_rank([r["ttft_ms"] for r in results], 0.95),
        "tokens": tokens,
        "tokens_per_second": round(tokens / total_seconds, 2) if total_seconds > 0 else 0.0,
    }


def missed_thresholds(params: dict, figures: dict) -> list[str]:
    missed = []
    if params["max_latency_ms"] is not None and figures["latency_p95_ms"] > params["max_latency_ms"]:
        missed.append(
            f"p95 latency {figures['latency_p95_ms']:.1f} ms is above max_latency_ms "
            f"{params['max_latency_ms']:g} (p50 {figures['latency_p50_ms']:.1f} ms)"
        )
    if params["max_ttft_ms"] is not None and figures["ttft_p95_ms"] > params["max_ttft_ms"]:
        missed.append(
            f"p95 time to first token {figures['ttft_p95_ms']:.1f} ms is above max_ttft_ms "
            f"{params['max_ttft_ms']:g} (mean {figures['ttft_mean_ms']:.1f} ms)"
        )
    if (
        params["min_tokens_per_second"] is not None
        and figures["tokens_per_second"] < params["min_tokens_per_second"]
    ):
        missed.append(
            f"{figures['tokens_per_second']:.2f} tokens/s ({figures['tokens']} tokens) is below "
            f"min_tokens_per_second {params['min_tokens_per_second']:g}"
        )
    return missed


def empty_answer_message(index: int, result: dict) -> str:
    what = f"prompt {index} ({excerpt(result['prompt'], PROMPT_EXCERPT_CHARS)!r}) got an empty answer"
    detail = (
        f"{result['tokens']} tokens ({result['tokens_source']}), finish_reason {result['finish_reason']!r}"
    )
    if result["reasoning_chars"]:
        return (
            f"{what}: {detail}, only {result['reasoning_chars']} characters of reasoning_content; "
            "raise max_tokens so the model gets to the answer"
        )
    return f"{what}: {detail}"


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "api": {"type": "str", "choices": ["openai", "llama-server"], "default": "openai"},
            "model": {"type": "str"},
            "prompts": {"type": "list", "elements": "str", "required": True},
            "max_tokens": {"type": "int", "default": 64, "no_log": False},
            "api_key": {"type": "str", "no_log": True},
            "timeout": {"type": "float", "default": 60},
            "max_latency_ms": {"type": "float"},
            "min_tokens_per_second": {"type": "float", "no_log": False},
            "max_ttft_ms": {"type": "float"},
            "validate_certs": {"type": "bool", "default": True},
            "ca_path": {"type": "path"},
        },
        supports_check_mode=True,
    )
    params = module.params
    url = endpoint_url(params["url"], params["api"])
    if not params["prompts"]:
        module.fail_json(msg=f"llm_probe {url}: prompts is empty; give at least one prompt", endpoint=url)
    if params["max_tokens"] < 1:
        module.fail_json(
            msg=f"llm_probe {url}: max_tokens {params['max_tokens']} must be at least 1", endpoint=url
        )
    if params["timeout"] <= 0:
        module.fail_json(msg=f"llm_probe {url}: timeout {params['timeout']:g} must be above 0", endpoint=url)

    results: list[dict] = []
    for index, prompt in enumerate(params["prompts"], start=1):
        try:
            result = probe_prompt(module, url, prompt)
        except ProbeError as error:
            module.fail_json(
                msg=f"llm_probe POST {url}: prompt {index} of {len(params['prompts'])}: {error}",
                endpoint=url,
                results=results,
                changed=False,
            )
        results.append(result)
        if not result["answer"].strip():
            module.fail_json(
                msg=f"llm_probe {url}: {empty_answer_message(index, result)}",
                endpoint=url,
                results=results,
                changed=False,
            )

    figures = aggregate(results)
    missed = missed_thresholds(params, figures)
    if missed:
        module.fail_json(
            msg=f"llm_probe {url}: {'; '.join(missed)} over {len(results)} prompts",
            endpoint=url,
            results=results,
            changed=False,
            **figures,
        )
    module.exit_json(changed=False, endpoint=url, results=results, **figures)


if __name__ == "__main__":
    main()
