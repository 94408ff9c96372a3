"""llm_probe against a local HTTP server that replays real llama-server responses.

The recordings in tests/unit/fixtures/llama_server/ are the exact bytes llama-server wrote (status
line, headers, chunked framing); the replaying server sends them unchanged, one HTTP chunk at a
time, and can pause before any chunk, which is how the tests control TTFT, latency and stalls.
The module against the real server binary is in tests/integration/test_llm_probe.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ansible_collections.pifarm.inference.plugins.modules import llm_probe
from module_harness import ModuleExitError, fail_module, module_result, run_module

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "llama_server"
PLANET = "Name the largest planet of the solar system."
KEY = "wrong-key-0123456789"


@dataclass
class Recording:
    """A recorded HTTP response split into the head and the body's HTTP chunks, each with its framing."""

    head: bytes
    chunks: list[bytes]
    tail: bytes

    @classmethod
    def load(cls, name: str) -> Recording:
        return cls.parse((FIXTURES / f"{name}.http").read_bytes())

    @classmethod
    def parse(cls, raw: bytes) -> Recording:
        head, _, body = raw.partition(b"\r\n\r\n")
        head += b"\r\n\r\n"
        if b"transfer-encoding: chunked" not in head.lower():
            return cls(head, [body] if body else [], b"")
        chunks = []
        while True:
            size_line = body.partition(b"\r\n")[0]
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return cls(head, chunks, body)
            end = len(size_line) + 2 + size + 2
            chunks.append(body[:end])
            body = body[end:]

    def payloads(self) -> list[bytes]:
        """The chunks' data without the framing (for a chunked body)."""
        return [chunk.partition(b"\r\n")[2][:-2] for chunk in self.chunks]

    def events(self) -> list[dict]:
        """Every JSON event of the SSE body, in order."""
        text = b"".join(self.payloads()).decode()
        return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]

    def rewritten(self, edit) -> Recording:
        """The same stream with ``edit(event)`` applied to every JSON event, reframed."""
        chunks = []
        for payload in self.payloads():
            lines = []
            for line in payload.decode().split("\n"):
                if line.startswith("data: {"):
                    lines.append("data: " + json.dumps(edit(json.loads(line[6:])), separators=(",", ":")))
                else:
                    lines.append(line)
            data = "\n".join(lines).encode()
            chunks.append(b"%x\r\n%s\r\n" % (len(data), data))
        return Recording(self.head, chunks, self.tail)


def first_content_chunk(recording: Recording) -> int:
    """Index of the first HTTP chunk whose event carries generated text."""
    for index, payload in enumerate(recording.payloads()):
        for line in payload.decode().splitlines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("content") or any(
                (c.get("delta") or {}).get("content") for c in event.get("choices", [])
            ):
                return index
    raise AssertionError("the recording carries no generated text")


@dataclass
class Script:
    """What the replaying server answers: a recording, pauses (before chunks, before the head), a cut."""

    recording: Recording
    pause_before: dict[int, float] = field(default_factory=dict)
    every_chunk: float = 0.0
    before_head: float = 0.0
    cut_after: int | None = None
    reset: bool = False


class ReplayServer:
    """A local HTTP server answering every POST with the next script (the last one repeats)."""

    def __init__(self):
        self.scripts: list[Script] = []
        self.requests: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                script = server.scripts[min(len(server.requests), len(server.scripts)) - 1]
                self.close_connection = True
                # The client may stop reading (a failure test, or the module after an error event).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.replay(script)

            def replay(self, script: Script) -> None:
                if script.before_head and server.release.wait(script.before_head):
                    return
                self.wfile.write(script.recording.head)
                self.wfile.flush()
                for index, chunk in enumerate(script.recording.chunks):
                    if index == script.cut_after:
                        if script.reset:
                            self.reset_connection()
                        return  # the connection closes in the middle of the chunked body
                    pause = script.pause_before.get(index, script.every_chunk)
                    if pause and server.release.wait(pause):
                        return
                    self.wfile.write(chunk)
                    self.wfile.flush()
                self.wfile.write(script.recording.tail)
                self.wfile.flush()

            def reset_connection(self) -> None:
                """Close with a zero linger time and no shutdown first: the kernel sends a TCP reset."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.wfile.close()
                self.rfile.close()
                self.connection.close()

            def log_message(self, format, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve(self, *scripts: Script | Recording) -> ReplayServer:
        self.scripts = [s if isinstance(s, Script) else Script(s) for s in scripts]
        return self

    def __enter__(self) -> ReplayServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with ReplayServer() as replay:
        yield replay


CHAT = Recording.load("openai-chat-stream")
COMPLETION = Recording.load("llama-server-completion-stream")
EMPTY = Recording.load("openai-chat-stream-empty")
NOT_STREAMED = Recording.load("openai-chat-json")
UNAUTHORIZED = Recording.load("openai-chat-401")
LOADING = Recording.load("openai-chat-503-loading")


def probe(server: ReplayServer, **args) -> dict:
    args.setdefault("url", server.url)
    return run_module(llm_probe, **args)


def probe_fails(server: ReplayServer, **args) -> dict:
    args.setdefault("url", server.url)
    return fail_module(llm_probe, **args)


CHAT_ANSWER = (
    "<|im_end|>\n<|im_start|>\nName the largest planet of the solar system\n<|im_start|>assistant\nName"
)
COMPLETION_ANSWER = (
    " known for its culture, art, and history. It is not only one of the most beautiful cities in the world,"
    " but also one of the most famous in"
)


def without(*keys: str):
    """An event editor dropping ``keys``: what a server that does not report them would send."""
    return lambda event: {k: v for k, v in event.items() if k not in keys}


# The OpenAI-compatible endpoint


def test_openai_stream_is_measured_and_counted_from_usage(server):
    result = probe(server.serve(CHAT), prompts=[PLANET], max_tokens=32, model="gemma-3-270m")
    assert result["changed"] is False
    assert result["endpoint"] == f"{server.url}/v1/chat/completions"
    [answer] = result["results"]
    assert answer["answer"] == CHAT_ANSWER
    assert answer["tokens"] == 32
    assert answer["tokens_source"] == "usage"
    assert answer["finish_reason"] == "length"
    assert answer["server_tokens_per_second"] == 17.46
    assert 0 < answer["ttft_ms"] <= answer["latency_ms"]
    assert answer["tokens_per_second"] == pytest.approx(32 / (answer["latency_ms"] / 1000), rel=0.01)
    assert result["tokens"] == 32
    assert result["latency_p50_ms"] == result["latency_p95_ms"] == answer["latency_ms"]
    assert result["ttft_mean_ms"] == answer["ttft_ms"]


def test_openai_request_streams_one_user_message_and_asks_for_usage(server):
    probe(server.serve(CHAT), prompts=[PLANET], max_tokens=32, model="gemma-3-270m")
    [request] = server.requests
    recorded = json.loads((FIXTURES / "openai-chat-stream.request.json").read_text())
    assert request["path"] == recorded.pop("path")
    assert request["body"] == recorded
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Accept"] == "text/event-stream"
    assert "Authorization" not in request["headers"]


def test_model_is_left_out_when_not_given(server):
    probe(server.serve(CHAT), prompts=[PLANET])
    assert "model" not in server.requests[0]["body"]
    assert server.requests[0]["body"]["max_tokens"] == 64


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/"])
def test_base_url_may_end_in_v1(server, suffix):
    result = probe(server.serve(CHAT), prompts=[PLANET], url=server.url + suffix)
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert result["endpoint"] == f"{server.url}/v1/chat/completions"


def test_ttft_is_the_first_generated_text_not_the_response_headers(server):
    # The headers go out at once; the first event with text comes 0.3 s later, the rest 10 ms apart.
    script = Script(CHAT, pause_before={first_content_chunk(CHAT): 0.3}, every_chunk=0.01)
    [answer] = probe(server.serve(script), prompts=[PLANET])["results"]
    assert answer["ttft_ms"] >= 300
    assert answer["latency_ms"] >= answer["ttft_ms"] + 10 * (len(CHAT.chunks) - 1)


def test_tokens_come_from_timings_when_usage_is_missing(server):
    recording = CHAT.rewritten(without("usage"))
    [answer] = probe(server.serve(recording), prompts=[PLANET])["results"]
    assert (answer["tokens"], answer["tokens_source"]) == (32, "timings")


def test_tokens_are_counted_chunks_when_the_server_reports_neither(server):
    # An OpenAI-compatible server without usage or timings: the real stream with both removed.
    recording = CHAT.rewritten(without("usage", "timings"))
    [answer] = probe(server.serve(recording), prompts=[PLANET])["results"]
    assert (answer["tokens"], answer["tokens_source"]) == (32, "chunks")
    assert answer["server_tokens_per_second"] is None
    assert answer["answer"] == CHAT_ANSWER


# llama-server's own endpoint


def test_llama_server_completion_stream(server):
    result = probe(
        server.serve(COMPLETION), api="llama-server", prompts=["The capital of France is"], max_tokens=32
    )
    assert result["endpoint"] == f"{server.url}/completion"
    [answer] = result["results"]
    assert answer["answer"] == COMPLETION_ANSWER
    assert (answer["tokens"], answer["tokens_source"]) == (32, "timings")
    assert answer["finish_reason"] == "limit"
    assert answer["server_tokens_per_second"] == 61.32
    [request] = server.requests
    recorded = json.loads((FIXTURES / "llama-server-completion-stream.request.json").read_text())
    assert request["path"] == recorded.pop("path")
    assert request["body"] == recorded


def test_llama_server_ttft(server):
    script = Script(COMPLETION, pause_before={first_content_chunk(COMPLETION): 0.25})
    [answer] = probe(server.serve(script), api="llama-server", prompts=["The capital of France is"])[
        "results"
    ]
    assert answer["ttft_ms"] >= 250


def test_llama_server_tokens_predicted_without_timings(server):
    recording = COMPLETION.rewritten(without("timings"))
    [answer] = probe(server.serve(recording), api="llama-server", prompts=["x"])["results"]
    assert (answer["tokens"], answer["tokens_source"]) == (32, "timings")
    assert answer["server_tokens_per_second"] is None


# Several prompts, percentiles, thresholds


def test_prompts_go_one_after_the_other_and_percentiles_use_nearest_rank(server):
    pauses = [0.0, 0.05, 0.1, 0.15, 0.4]
    server.serve(*(Script(CHAT, before_head=pause) for pause in pauses))
    result = probe(server, prompts=[f"prompt {i}" for i in range(5)])
    assert [r["body"]["messages"][0]["content"] for r in server.requests] == [f"prompt {i}" for i in range(5)]
    latencies = [r["latency_ms"] for r in result["results"]]
    assert result["latency_p50_ms"] == sorted(latencies)[2]
    assert result["latency_p95_ms"] == max(latencies) >= 400
    assert result["tokens"] == 5 * 32
    assert result["tokens_per_second"] == pytest.approx(160 / (sum(latencies) / 1000), rel=0.01)
    assert result["ttft_mean_ms"] == pytest.approx(sum(r["ttft_ms"] for r in result["results"]) / 5, abs=0.1)


def test_nearest_rank():
    values = [float(v) for v in range(20, 0, -1)]
    assert llm_probe.nearest_rank(values, 0.50) == 10
    assert llm_probe.nearest_rank(values, 0.95) == 19
    assert llm_probe.nearest_rank([3.0, 1.0, 2.0], 0.95) == 3
    assert llm_probe.nearest_rank([7.0], 0.5) == 7


def test_latency_threshold_missed_fails_with_the_figures(server):
    result = probe_fails(server.serve(Script(CHAT, every_chunk=0.01)), prompts=[PLANET], max_latency_ms=100)
    assert result["msg"].startswith(f"llm_probe {server.url}/v1/chat/completions: p95 latency ")
    assert f"{result['latency_p95_ms']:.1f} ms is above max_latency_ms 100 (p50 " in result["msg"]
    assert result["msg"].endswith("over 1 prompts")
    assert result["latency_p95_ms"] > 100
    assert len(result["results"]) == 1
    assert result["changed"] is False


def test_ttft_threshold_missed_fails_with_the_figures(server):
    result = probe_fails(
        server.serve(Script(CHAT, before_head=0.3)), prompts=[PLANET, PLANET], max_ttft_ms=100
    )
    assert result["ttft_p95_ms"] == max(r["ttft_ms"] for r in result["results"]) >= 300
    assert (
        f"p95 time to first token {result['ttft_p95_ms']:.1f} ms is above max_ttft_ms 100 (mean "
        in result["msg"]
    )
    assert "latency" not in result["msg"]


def test_rate_threshold_missed_fails_with_the_figures(server):
    result = probe_fails(server.serve(CHAT), prompts=[PLANET, PLANET], min_tokens_per_second=100000)
    assert (
        f"{result['tokens_per_second']:.2f} tokens/s (64 tokens) is below min_tokens_per_second 100000"
        in (result["msg"])
    )
    assert "p95" not in result["msg"]


def test_both_thresholds_missed_are_both_reported(server):
    result = probe_fails(
        server.serve(Script(CHAT, every_chunk=0.01)),
        prompts=[PLANET],
        max_latency_ms=1,
        min_tokens_per_second=1e5,
    )
    assert "above max_latency_ms 1 " in result["msg"]
    assert "; " in result["msg"]
    assert "below min_tokens_per_second 100000" in result["msg"]


def test_thresholds_met_pass(server):
    result = probe(
        server.serve(CHAT), prompts=[PLANET], max_latency_ms=60000, min_tokens_per_second=1, max_ttft_ms=60000
    )
    assert result["results"][0]["tokens"] == 32


# Failures


def test_empty_answer_fails(server):
    result = probe_fails(server.serve(EMPTY), prompts=[PLANET])
    assert result["msg"] == (
        f"llm_probe {server.url}/v1/chat/completions: prompt 1 ('{PLANET}') got an empty answer: "
        "1 tokens (usage), finish_reason 'stop'"
    )
    assert result["results"][0]["answer"] == ""


def as_reasoning(event: dict) -> dict:
    """A reasoning model's delta: llama-server streams its thinking as delta.reasoning_content."""
    for choice in event.get("choices", []):
        delta = choice.get("delta") or {}
        if delta.get("content"):
            delta["reasoning_content"] = delta.pop("content")
    return event


def test_an_answer_of_only_reasoning_fails_and_says_to_raise_max_tokens(server):
    script = Script(CHAT.rewritten(as_reasoning), pause_before={first_content_chunk(CHAT): 0.2})
    result = probe_fails(server.serve(script), prompts=[PLANET])
    assert result["msg"].endswith(
        f"got an empty answer: 32 tokens (usage), finish_reason 'length', only {len(CHAT_ANSWER)} characters "
        "of reasoning_content; raise max_tokens so the model gets to the answer"
    )
    [answer] = result["results"]
    assert answer["reasoning_chars"] == len(CHAT_ANSWER)
    assert answer["ttft_ms"] >= 200  # thinking is generated output: the first token came with it


def test_unauthorized_names_status_and_body_never_the_key(server):
    result = probe_fails(server.serve(UNAUTHORIZED), prompts=[PLANET], api_key=KEY)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert result["msg"] == (
        f"llm_probe POST {server.url}/v1/chat/completions: prompt 1 of 1: HTTP 401 Unauthorized: "
        '{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
    )
    assert KEY not in json.dumps(result)


def test_loading_server_answers_503(server):
    result = probe_fails(server.serve(LOADING), prompts=[PLANET])
    assert "prompt 1 of 1: HTTP 503 Service Unavailable: " in result["msg"]
    assert '"message":"Loading model"' in result["msg"]


def test_a_later_failure_keeps_the_answers_before_it(server):
    result = probe_fails(server.serve(CHAT, LOADING), prompts=[PLANET, PLANET])
    assert "prompt 2 of 2: HTTP 503" in result["msg"]
    assert len(result["results"]) == 1
    assert result["results"][0]["tokens"] == 32


def test_no_response_within_the_timeout(server):
    result = probe_fails(server.serve(Script(CHAT, before_head=5)), prompts=[PLANET], timeout=0.3)
    assert result["msg"].endswith("prompt 1 of 1: no response within the timeout of 0.3 s")


def test_stalled_stream_fails(server):
    result = probe_fails(server.serve(Script(CHAT, pause_before={5: 5})), prompts=[PLANET], timeout=0.3)
    assert result["msg"].endswith("the answer stalled: nothing streamed for 0.3 s after 5 events with text")


def test_connection_closed_in_the_middle_of_the_stream(server):
    result = probe_fails(server.serve(Script(CHAT, cut_after=5)), prompts=[PLANET])
    assert result["msg"].endswith(
        "prompt 1 of 1: the stream ended after 5 events with text without saying the answer was complete "
        "(no finish_reason, [DONE] or stop event): the server or a proxy cut it short"
    )


def test_llama_server_stream_closed_before_the_stop_event(server):
    script = Script(COMPLETION, cut_after=len(COMPLETION.chunks) - 1)
    result = probe_fails(server.serve(script), api="llama-server", prompts=["x"])
    assert (
        "the stream ended after 32 events with text without saying the answer was complete" in result["msg"]
    )


def test_connection_reset_in_the_middle_of_the_stream(server):
    result = probe_fails(
        server.serve(Script(CHAT, pause_before={5: 0.2}, cut_after=5, reset=True)), prompts=[PLANET]
    )
    assert re.search(
        r"prompt 1 of 1: the connection broke after \d events with text: ConnectionResetError\(104, ",
        result["msg"],
    )


def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fail_module(llm_probe, url=f"http://127.0.0.1:{port}", prompts=[PLANET])
    assert result["msg"].startswith(
        f"llm_probe POST http://127.0.0.1:{port}/v1/chat/completions: prompt 1 of 1:"
    )
    assert "cannot connect: [Errno 111] Connection refused" in result["msg"]


def test_an_answer_that_is_not_streamed_fails(server):
    result = probe_fails(server.serve(NOT_STREAMED), prompts=[PLANET])
    assert (
        "the server did not stream its answer (Content-Type 'application/json; charset=utf-8'): "
        in result["msg"]
    )
    assert '{"choices":[{"finish_reason":"length"' in result["msg"]


def test_an_error_event_in_the_stream_fails(server):
    # llama-server reports an error after the headers as one event {"error": {...}} (format_oai_sse);
    # here that event replaces the recording's third event.
    error = {"code": 500, "message": "Context size has been exceeded.", "type": "exceed_context_size_error"}
    events = iter(range(100))
    recording = CHAT.rewritten(lambda event: {"error": error} if next(events) == 2 else event)
    result = probe_fails(server.serve(recording), prompts=[PLANET])
    assert result["msg"].endswith(f"the server reported an error in the stream: {json.dumps(error)}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"prompts": []}, "prompts is empty; give at least one prompt"),
        ({"prompts": ["x"], "max_tokens": 0}, "max_tokens 0 must be at least 1"),
        ({"prompts": ["x"], "timeout": 0}, "timeout 0 must be above 0"),
    ],
)
def test_bad_arguments_fail_before_any_request(server, args, message):
    result = probe_fails(server.serve(CHAT), **args)
    assert result["msg"] == f"llm_probe {server.url}/v1/chat/completions: {message}"
    assert server.requests == []


def test_unknown_api_is_refused(server):
    result = probe_fails(server.serve(CHAT), prompts=["x"], api="ollama")
    assert "api" in result["msg"]
    assert "openai, llama-server" in result["msg"]


def test_check_mode_probes_all_the_same(server):
    result = module_result(
        llm_probe,
        ModuleExitError,
        {"url": server.serve(CHAT).url, "prompts": [PLANET], "_ansible_check_mode": True},
    )
    assert result["changed"] is False
    assert result["results"][0]["tokens"] == 32
    assert len(server.requests) == 1


# Helpers


def test_sse_events_skip_comments_and_join_multiline_data():
    stream = io.BytesIO(b': ping\r\n\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: x\ndata:[DONE]\n\ndata: tail')
    assert list(llm_probe.sse_events(stream)) == ['{"a":\n1}', "[DONE]", "tail"]


def test_excerpt_is_one_line_short_and_without_the_secret():
    assert llm_probe.excerpt("a\n  b\tc", 50) == "a b c"
    assert llm_probe.excerpt("x" * 20, 10) == "xxxxxxx..."
    assert llm_probe.excerpt("key sk-123 was wrong", 50, "sk-123") == "key ******** was wrong"
