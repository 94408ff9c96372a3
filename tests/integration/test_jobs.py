"""The job path end to end: a real nats-server (JetStream), real workers, the real llama-server.

The nats-server (Debian's 2.9.10) runs with the users the nats role will create and the
permission maps of pifarm_agent/nats_permissions.json. Every command runs as a process, as
Ansible and systemd will run it: ``pifarm-agent job declare|worker|submit|dead``. Each test
works on models of its own so a worker of one test never takes another test's jobs.
Run with ``-s`` or look at the ``[figures]`` lines for what was measured.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import nats
import pytest
from integration_helpers import figure
from nats.js.errors import NotFoundError
from nats_helpers import (
    PASSWORDS,
    BlackHole,
    NatsServer,
    SlowProxy,
    Watch,
    WorkerProcess,
    agent,
    closed_port_url,
    write_json,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pifarm_agent.exporter import ExporterConfig, registry_for
from pifarm_agent.jobs import DEAD_STREAM, JOBS_STREAM, RESULTS_STREAM, WORKER_INBOX_PREFIX, Job, names

ANSWERING = "qwen2.5-0.5b"  # dots: its subject token is qwen2_5-0_5b
REFUSED = "refused.model"  # a llama-server URL where nothing listens
KILLED = "sigkill-model"
STOPPED = "sigterm-model"
IDLE = "idle-model"  # declared, never served
POISON = "poison-model"  # served on a dead port: every job fails
LAST = "last-delivery-model"
DURABLE = "durable-model"
CHAT = "chat-model"
MODELS = [ANSWERING, REFUSED, KILLED, STOPPED, IDLE, POISON, LAST, DURABLE, CHAT]
ACK_WAIT = 3
MAX_DELIVER = 3
# Short on purpose: the tests wait for redeliveries and dead letters.
WORKER_BACKOFF = [0.2, 0.5]
DECLARED = {
    "models": MODELS,
    "ack_wait_seconds": ACK_WAIT,
    "max_deliver": MAX_DELIVER,
    "backoff_seconds": WORKER_BACKOFF,
    "duplicate_window_seconds": 60,
    "max_bytes": 64 * 1024 * 1024,
    "max_age_seconds": 3600,
    "dead_letter_max_age_seconds": 3600,
    "max_ack_pending": 32,
}
LONG_PROMPT = "hello world " * 1200  # about 2400 tokens: more than a slot's 1024 of context


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def watch(nats_server):
    watcher = Watch(nats_server)
    yield watcher
    watcher.close()


@pytest.fixture(scope="module")
def admin_settings(nats_server, tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("settings") / "admin.json", nats_server.settings("admin"))


@pytest.fixture(scope="module")
def producer_settings(nats_server, tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("settings") / "producer.json", nats_server.settings("producer"))


@pytest.fixture(scope="module")
def declared(nats_server):
    """The streams and consumers of MODELS, declared through the CLI with settings on stdin."""
    settings = json.dumps(nats_server.settings("admin", **DECLARED))
    code, payload, stderr = agent("declare", stdin=settings)
    assert code == 2, (payload, stderr)
    assert [s["action"] for s in payload["streams"]] == ["create", "create", "create"]
    assert {c["name"]: c["action"] for c in payload["consumers"]} == {
        names(model).consumer: "create" for model in MODELS
    }
    return settings


# node_a's farm_max_tokens: a job asking for more is refused, as the gateway refuses a request.
NODE_A_MAX_TOKENS = 64


@pytest.fixture(scope="module")
def node_a(declared, nats_server, llama_server, tmp_path_factory):
    """The long-lived worker: ANSWERING on the real llama-server (2 slots), REFUSED on a dead port."""
    worker = WorkerProcess(
        tmp_path_factory.mktemp("node-a"),
        nats_server,
        "itest-node-a",
        [
            {"name": ANSWERING, "url": llama_server.url, "slots": 2},
            {"name": REFUSED, "url": closed_port_url(), "slots": 1},
            {"name": POISON, "url": closed_port_url(), "slots": 1},
        ],
        backoff_seconds=WORKER_BACKOFF,
        request_timeout_seconds=60,
        max_tokens=NODE_A_MAX_TOKENS,
    )
    worker.wait_ready()
    yield worker
    worker.stop()


def test_declare_is_idempotent_and_check_changes_nothing(declared, nats_server, watch):
    code, payload, stderr = agent("declare", stdin=declared)
    assert code == 0, (payload, stderr)
    assert payload["changed"] is False
    assert {item["action"] for item in payload["streams"] + payload["consumers"]} == {"unchanged"}
    assert payload["diff"]["before"] == payload["diff"]["after"]

    # Ask for a longer ack_wait, a new dotted model, and no IDLE: --check reports and touches nothing.
    wanted = dict(DECLARED, ack_wait_seconds=5, models=[*(m for m in MODELS if m != IDLE), "new.model"])
    changed = json.dumps(nats_server.settings("admin", **wanted))
    code, payload, stderr = agent("declare", "--check", stdin=changed)
    assert code == 2, (payload, stderr)
    assert payload["check"] is True
    consumers = {item["name"]: item for item in payload["consumers"]}
    assert consumers["worker-new_model"]["action"] == "create"
    assert consumers["worker-new_model"]["model"] == "new.model"
    answering = consumers[names(ANSWERING).consumer]
    assert answering["action"] == "update"
    assert answering["changes"] == ["ack_wait_seconds"]
    assert (answering["before"]["ack_wait_seconds"], answering["after"]["ack_wait_seconds"]) == (3, 5)
    assert payload["unlisted_consumers"] == [
        {"name": "worker-idle-model", "model": IDLE, "filter_subject": "pifarm.jobs.idle-model"}
    ]
    assert "would be updated (ack_wait_seconds 3 -> 5)" in payload["message"]
    assert watch.consumer(ANSWERING).config.ack_wait == ACK_WAIT
    with pytest.raises(Exception, match="consumer not found"):
        watch.call(watch.nc.jetstream().consumer_info(JOBS_STREAM, "worker-new_model"))

    # A real change of a stream and a consumer limit, then back: exit 2 twice, then 0.
    tighter = json.dumps(
        nats_server.settings("admin", **dict(DECLARED, max_ack_pending=16, max_age_seconds=1800))
    )
    code, payload, _stderr = agent("declare", stdin=tighter)
    assert code == 2
    assert {item["name"]: item["changes"] for item in payload["streams"]} == {
        JOBS_STREAM: ["max_age_seconds"],
        DEAD_STREAM: [],
        RESULTS_STREAM: [],
    }
    assert watch.consumer(KILLED).config.max_ack_pending == 16
    assert watch.stream(JOBS_STREAM).config.max_age == 1800
    assert agent("declare", stdin=declared)[0] == 2
    assert agent("declare", stdin=declared)[0] == 0
    assert watch.consumer(KILLED).config.max_ack_pending == DECLARED["max_ack_pending"]


def test_submit_is_answered_by_a_worker_with_real_llama_text(node_a, producer_settings, capsys):
    code, answer, stderr = agent(
        "submit",
        "--model",
        ANSWERING,
        "--prompt",
        "The capital of France is",
        "--n-predict",
        "8",
        "--settings",
        str(producer_settings),
    )
    assert code == 0, (answer, stderr)
    assert answer["text"].strip()
    assert answer["node"] == "itest-node-a"
    assert answer["subject"] == "pifarm.jobs.qwen2_5-0_5b"
    assert answer["deliveries"] == 1
    assert 1 <= answer["tokens_predicted"] <= 8
    assert 0 < answer["latency_ms"] <= answer["round_trip_ms"]
    figure(
        capsys,
        f"submit: {answer['text']!r} in {answer['latency_ms']:.0f} ms at llama-server, "
        f"{answer['round_trip_ms']:.0f} ms round trip",
    )
    metrics = node_a.metrics()
    assert metrics[f'pifarm_worker_jobs_total{{model="{ANSWERING}",outcome="done"}}'] >= 1
    assert metrics[f'pifarm_worker_job_seconds_count{{model="{ANSWERING}"}}'] >= 1
    assert metrics[f'pifarm_worker_jobs_in_flight{{model="{ANSWERING}"}}'] == 0
    line = next(line for line in node_a.log_text().splitlines() if f"job {answer['id']} " in line)
    assert f"model={ANSWERING} outcome=done" in line
    assert PASSWORDS["worker"] not in node_a.log_text()


def test_a_chat_job_is_answered_through_the_chat_route(
    declared, nats_server, llama_server, producer_settings, tmp_path
):
    # The route, not the words: the test model is a base model, whose chat answers may echo the prompt.
    proxy = SlowProxy(llama_server.url, delay=0)
    worker = WorkerProcess(tmp_path, nats_server, "itest-chat", [{"name": CHAT, "url": proxy.url}])
    try:
        worker.wait_ready()
        argv = ["--model", CHAT, "--prompt", "Say hello.", "--chat", "--n-predict", "8"]
        code, answer, stderr = agent("submit", *argv, "--settings", str(producer_settings))
        assert code == 0, (answer, stderr)
        assert answer["text"].strip()
        assert 1 <= answer["tokens_predicted"] <= 8
        # messages go through the model's chat template; a prompt would have gone to /completion.
        assert proxy.paths == ["/v1/chat/completions"]
    finally:
        worker.stop()
        proxy.close()


def test_same_id_twice_is_one_job(node_a, nats_server, producer_settings, watch):
    job_id = "dedup-1"
    argv = ["submit", "--model", ANSWERING, "--prompt", "Count to three:", "--n-predict", "4", "--id", job_id]
    argv += ["--no-wait", "--settings", str(producer_settings)]
    first_code, first, _stderr = agent(*argv)
    second_code, second, _stderr = agent(*argv)
    assert (first_code, second_code) == (0, 0)
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert first["seq"] == second["seq"]
    watch.wait_for("the result of dedup-1", lambda: watch.results.get(job_id), timeout=30)
    time.sleep(1)  # a second job, had one been queued, would be answered within this
    assert watch.result_count(job_id) == 1


def test_a_job_with_reply_to_is_answered_there(node_a, watch):
    # As a batch producer or a device would send it: no CLI, no Nats-Msg-Id needed.
    body = {
        "id": "reply-1",
        "model": ANSWERING,
        "prompt": "Hello",
        "n_predict": 8,
        "reply_to": "pifarm.results.batch7.reply-1",
    }
    watch.publish_job(ANSWERING, json.dumps(body).encode())
    [result] = watch.wait_for("the result of reply-1", lambda: watch.results.get("reply-1"), timeout=30)
    assert result["_subject"] == "pifarm.results.batch7.reply-1"
    assert set(result) == {
        "_subject",
        "id",
        "model",
        "node",
        "text",
        "tokens_predicted",
        "latency_ms",
        "deliveries",
    }
    assert 1 <= result["tokens_predicted"] <= 8


def test_a_job_that_always_fails_ends_as_a_dead_letter(
    node_a, producer_settings, admin_settings, watch, capsys
):
    started = time.monotonic()
    refused = agent(
        "submit",
        "--model",
        REFUSED,
        "--prompt",
        "hi",
        "--id",
        "refused-1",
        "--no-wait",
        "--settings",
        str(producer_settings),
    )
    too_long = agent(
        "submit",
        "--model",
        ANSWERING,
        "--prompt",
        LONG_PROMPT,
        "--id",
        "too-long-1",
        "--no-wait",
        "--settings",
        str(producer_settings),
    )
    assert refused[0] == too_long[0] == 0
    [letter] = watch.wait_for("the dead letter of refused-1", lambda: watch.dead_for("refused-1"), timeout=30)
    [long_letter] = watch.wait_for(
        "the dead letter of too-long-1", lambda: watch.dead_for("too-long-1"), timeout=30
    )
    elapsed = time.monotonic() - started
    assert letter["_subject"] == "pifarm.dead.refused_model"
    assert letter["deliveries"] == MAX_DELIVER
    assert letter["node"] == "itest-node-a"
    # A reference to the job, not a copy: the sequence it had, its size, its prompt.
    assert letter["excerpt"] == "hi"
    assert letter["size"] == len(Job(id="refused-1", model=REFUSED, prompt="hi").payload())
    assert letter["stream"] == JOBS_STREAM
    assert letter["stream_sequence"] > 0
    assert "cannot connect" in letter["reason"]
    assert "Connection refused" in letter["reason"]
    assert long_letter["deliveries"] == MAX_DELIVER
    assert "HTTP 400" in long_letter["reason"]
    assert "exceeds the available context size" in long_letter["reason"]
    assert watch.result_count("refused-1") == watch.result_count("too-long-1") == 0
    # term removed them from the work queue: nothing is pending or waiting for an ack.
    info = watch.consumer(REFUSED)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    metrics = node_a.metrics()
    assert metrics[f'pifarm_worker_jobs_total{{model="{REFUSED}",outcome="retried"}}'] == MAX_DELIVER - 1
    assert metrics[f'pifarm_worker_jobs_total{{model="{REFUSED}",outcome="dead"}}'] == 1
    code, listing, _stderr = agent("dead", "--model", REFUSED, "--settings", str(admin_settings))
    assert code == 0
    assert listing["count"] == 1
    assert listing["dead_letters"][0]["id"] == "refused-1"
    figure(
        capsys,
        f"dead letters after {MAX_DELIVER} deliveries each, {elapsed:.1f} s; reasons: "
        f"{letter['reason']!r}, {long_letter['reason']!r}",
    )


def test_a_900_kb_job_that_always_fails_is_one_dead_letter_under_max_payload(node_a, watch, capsys):
    # CJK prompt: 3 bytes a character as sent, 6 once JSON re-escapes it (a copy would be 1.8 MB).
    body = {"id": "poison-1", "model": POISON, "prompt": "漢字" * 150_000}
    data = json.dumps(body, ensure_ascii=False).encode()
    assert 900_000 <= len(data) < 1024 * 1024
    watch.publish_job(POISON, data, msg_id="poison-1")
    [letter] = watch.wait_for("the poison job's dead letter", lambda: watch.dead_for("poison-1"), timeout=30)
    size = len(json.dumps({k: v for k, v in letter.items() if k != "_subject"}).encode())
    assert letter["deliveries"] == MAX_DELIVER
    assert letter["size"] == len(data)
    assert letter["excerpt"].startswith("漢字漢字")
    assert size < 2048
    # Terminated: nothing pending, nothing waiting for an ack, no longer in the work queue.
    info = watch.consumer(POISON)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    with pytest.raises(NotFoundError):
        watch.call(watch.nc.jetstream().get_msg(JOBS_STREAM, seq=letter["stream_sequence"]))
    figure(
        capsys,
        f"poison job: {len(data)} bytes, one dead letter of {size} bytes after {MAX_DELIVER} deliveries",
    )


def test_a_worker_killed_on_the_last_delivery_leaves_one_dead_letter(
    declared, nats_server, watch, tmp_path, capsys
):
    body = {"id": "last-1", "model": LAST, "prompt": "Say yes.", "n_predict": 4}
    watch.publish_job(LAST, json.dumps(body).encode(), msg_id="last-1")

    async def take_and_drop() -> int:
        """A delivery its worker never answers: pulled, then neither acked nor nak'ed."""
        js = watch.nc.jetstream()
        subscription = await js.pull_subscribe_bind(consumer=names(LAST).consumer, stream=JOBS_STREAM)
        try:
            [message] = await subscription.fetch(1, timeout=ACK_WAIT + 5)
        finally:
            await subscription.unsubscribe()
        return message.metadata.num_delivered

    # Deliveries 1 and 2 die quietly; the last goes to a real worker that is then SIGKILLed.
    dropped = [watch.call(take_and_drop()) for _delivery in range(MAX_DELIVER - 1)]
    assert dropped == list(range(1, MAX_DELIVER))
    hole = BlackHole()
    doomed = WorkerProcess(tmp_path, nats_server, "itest-last-doomed", [{"name": LAST, "url": hole.url}])
    rescuer = None
    try:
        doomed.wait_ready()
        watch.wait_for(
            "the doomed worker to hold the last delivery",
            lambda: (
                watch.consumer(LAST).delivered.consumer_seq == MAX_DELIVER
                and watch.consumer(LAST).num_ack_pending == 1
            ),
            timeout=ACK_WAIT + 10,
        )
        rescuer = WorkerProcess(
            tmp_path, nats_server, "itest-last-rescuer", [{"name": LAST, "url": closed_port_url()}]
        )
        rescuer.wait_ready()
        doomed.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.wait(timeout=10)
        [letter] = watch.wait_for("the dead letter of last-1", lambda: watch.dead_for("last-1"), timeout=30)
        took = time.monotonic() - killed_at
        time.sleep(1)  # room for a second letter to show
        assert len(watch.dead_for("last-1")) == 1
        assert letter["deliveries"] == MAX_DELIVER
        assert letter["node"] == "itest-last-rescuer"
        assert f"no answer after {MAX_DELIVER} deliveries" in letter["reason"]
        assert watch.result_count("last-1") == 0
        info = watch.consumer(LAST)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        with pytest.raises(NotFoundError):
            watch.call(watch.nc.jetstream().get_msg(JOBS_STREAM, seq=letter["stream_sequence"]))
        assert rescuer.metrics()[f'pifarm_worker_jobs_total{{model="{LAST}",outcome="dead"}}'] == 1
        figure(
            capsys,
            f"worker SIGKILLed on the last delivery: one dead letter {took:.1f} s after the kill "
            f"(ack_wait {ACK_WAIT} s)",
        )
    finally:
        doomed.stop()
        hole.close()
        if rescuer is not None:
            rescuer.stop()


def test_the_gateway_exporter_reads_the_queue_of_the_real_server(declared, nats_server, producer_settings):
    """The farm exporter's job-router source on this nats-server: a job nobody serves is the queue depth."""
    code, payload, stderr = agent(
        "submit",
        "--model",
        IDLE,
        "--prompt",
        "hi",
        "--id",
        "idle-depth-1",
        "--no-wait",
        "--settings",
        str(producer_settings),
    )
    assert code == 0, (payload, stderr)
    gateway = ExporterConfig.parse(
        {"node": "gateway1", "port": 9110, "nats_monitoring_url": f"http://127.0.0.1:{nats_server.http_port}"}
    )
    text = generate_latest(registry_for(gateway)).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("pifarm_exporter_source_up", (("source", "nats"),))] == 1.0
    assert samples[("pifarm_nats_jetstream_available", ())] == 1.0
    consumers = {
        dict(labels)["consumer"]: v
        for (name, labels), v in samples.items()
        if name == "pifarm_nats_consumer_pending_messages"
    }
    assert set(consumers) == {names(model).consumer for model in MODELS}
    assert consumers[names(IDLE).consumer] == 1.0
    assert samples[("pifarm_nats_stream_messages", (("stream", JOBS_STREAM),))] >= 1.0
    assert ("pifarm_nats_stream_last_sequence", (("stream", DEAD_STREAM),)) in samples
    assert samples[("pifarm_nats_connections", ())] >= 1.0


def test_a_malformed_job_is_a_dead_letter_at_once(node_a, watch):
    subject_model = ANSWERING
    watch.publish_job(subject_model, b"{not json")
    watch.publish_job(subject_model, json.dumps({"id": "no-prompt-1", "model": ANSWERING}).encode())
    watch.publish_job(
        subject_model,
        json.dumps(
            {"id": "bad-reply-1", "model": ANSWERING, "prompt": "x", "reply_to": "pifarm.jobs.other"}
        ).encode(),
    )
    watch.publish_job(
        subject_model, json.dumps({"id": "wrong-model-1", "model": "other", "prompt": "x"}).encode()
    )
    watch.publish_job(
        subject_model,
        json.dumps(
            {"id": "greedy-1", "model": ANSWERING, "prompt": "x", "n_predict": NODE_A_MAX_TOKENS + 1}
        ).encode(),
    )

    ids = {"no-prompt-1", "bad-reply-1", "wrong-model-1", "greedy-1"}

    def letters():
        found = [
            letter
            for letter in watch.dead
            if letter["_subject"] == "pifarm.dead.qwen2_5-0_5b"
            and (letter["id"] is None or letter["id"] in ids)
        ]
        return found if len(found) == 5 else None

    found = watch.wait_for("five malformed jobs as dead letters", letters, timeout=15)
    by_id = {letter.get("id"): letter for letter in found}
    raw = by_id[None]
    assert raw["excerpt"] == "{not json"
    assert "not JSON" in raw["reason"]
    assert "prompt is missing" in by_id["no-prompt-1"]["reason"]
    assert "reply_to must be a subject under pifarm.results." in by_id["bad-reply-1"]["reason"]
    assert "does not belong on the subject" in by_id["wrong-model-1"]["reason"]
    assert f"n_predict must be an integer from 1 to {NODE_A_MAX_TOKENS}" in by_id["greedy-1"]["reason"]
    for letter in found:
        assert letter["deliveries"] == 1
    assert watch.result_count("bad-reply-1") == 0
    assert watch.result_count("greedy-1") == 0


def test_a_worker_killed_mid_job_gets_its_jobs_redelivered_once(
    declared, nats_server, llama_server, watch, tmp_path, capsys
):
    hole = BlackHole()
    doomed = WorkerProcess(
        tmp_path, nats_server, "itest-doomed", [{"name": KILLED, "url": hole.url, "slots": 4}]
    )
    rescuer = None
    try:
        doomed.wait_ready()
        ids = [f"kill-{n}" for n in range(3)]
        for job_id in ids:
            body = {"id": job_id, "model": KILLED, "prompt": "Say yes.", "n_predict": 4}
            watch.publish_job(KILLED, json.dumps(body).encode(), msg_id=job_id)
        watch.wait_for(
            "the doomed worker to hold three jobs",
            lambda: watch.consumer(KILLED).num_ack_pending == 3,
            timeout=15,
        )
        held_at = time.monotonic()
        # The rescuer's pulls are open from now on: a job the doomed worker let go would reach it.
        rescuer = WorkerProcess(
            tmp_path, nats_server, "itest-rescuer", [{"name": KILLED, "url": llama_server.url, "slots": 3}]
        )
        rescuer.wait_ready()
        # Past one ack_wait: only in_progress keeps the jobs with the doomed worker.
        time.sleep(max(0.0, ACK_WAIT + 1 - (time.monotonic() - held_at)))
        assert watch.consumer(KILLED).num_redelivered == 0
        assert all(watch.result_count(job_id) == 0 for job_id in ids)
        doomed.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.wait(timeout=10)

        watch.wait_for("three results", lambda: all(watch.results.get(i) for i in ids), timeout=30)
        redelivered_after = time.monotonic() - killed_at
        time.sleep(1)  # room for a duplicate to show
        counts = {job_id: watch.result_count(job_id) for job_id in ids}
        lost = sum(1 for count in counts.values() if count == 0)
        duplicates = sum(count - 1 for count in counts.values() if count > 1)
        figure(
            capsys,
            f"SIGKILL mid-job: 3 jobs, lost {lost}, duplicates {duplicates}, all answered "
            f"{redelivered_after:.1f} s after the kill (ack_wait {ACK_WAIT} s)",
        )
        assert (lost, duplicates) == (0, 0)
        for job_id in ids:
            [result] = watch.results[job_id]
            assert result["node"] == "itest-rescuer"
            assert result["deliveries"] == 2
        info = watch.consumer(KILLED)
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
    finally:
        doomed.stop()
        hole.close()
        if rescuer is not None:
            rescuer.stop()


def test_sigterm_lets_the_running_job_finish_and_exits_0(
    declared, nats_server, llama_server, producer_settings, watch, tmp_path, capsys
):
    # 4 s at the llama-server, longer than ack_wait: only in_progress keeps the job here.
    proxy = SlowProxy(llama_server.url, delay=ACK_WAIT + 1)
    worker = WorkerProcess(
        tmp_path, nats_server, "itest-stopping", [{"name": STOPPED, "url": proxy.url, "slots": 1}]
    )
    try:
        worker.wait_ready()
        argv = ["--model", STOPPED, "--prompt", "Say yes.", "--n-predict", "4", "--no-wait"]
        assert agent("submit", *argv, "--id", "term-1", "--settings", str(producer_settings))[0] == 0
        watch.wait_for(
            "the job to be taken", lambda: watch.consumer(STOPPED).num_ack_pending == 1, timeout=15
        )
        worker.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert agent("submit", *argv, "--id", "term-2", "--settings", str(producer_settings))[0] == 0
        code, summary = worker.wait(timeout=30)
        stopped_after = time.monotonic() - signalled
    finally:
        worker.stop()
        proxy.close()
    assert code == 0, worker.log_text()
    assert summary["jobs"] == {"done": 1, "failed": 0, "retried": 0, "dead": 0}
    [result] = watch.results["term-1"]
    assert result["deliveries"] == 1
    assert result["node"] == "itest-stopping"
    # The job sent after the signal was never pulled: it waits for the next worker.
    info = watch.consumer(STOPPED)
    assert (info.num_pending, info.num_ack_pending) == (1, 0)
    assert watch.result_count("term-2") == 0
    assert "got SIGTERM" in worker.log_text()
    figure(
        capsys,
        f"SIGTERM in a {ACK_WAIT + 1} s job: it finished (1 delivery), exit 0 {stopped_after:.1f} s later",
    )


async def _as_user(server: NatsServer, user: str, action: str) -> list[str]:
    """Tries ``action`` as ``user``; returns what the server refused (its -ERR lines)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    inbox = WORKER_INBOX_PREFIX if user == "worker" else "_INBOX"
    nc = await nats.connect(
        server.url, user=user, password=PASSWORDS[user], error_cb=on_error, inbox_prefix=inbox
    )
    js = nc.jetstream(timeout=1)
    try:
        if action == "pull":
            subscription = await js.pull_subscribe_bind(consumer=names(IDLE).consumer, stream=JOBS_STREAM)
            with pytest.raises(TimeoutError):
                await subscription.fetch(1, timeout=1)
        elif action == "publish-job":
            with pytest.raises(TimeoutError):
                await js.publish(names(IDLE).job_subject, b'{"id": "evil"}')
        elif action == "read-worker-inbox":
            await nc.subscribe(f"{WORKER_INBOX_PREFIX}.>")
        elif action == "read-jobs":
            await nc.subscribe("pifarm.jobs.>")
        elif action == "create-stream":
            with pytest.raises(TimeoutError):
                await js.add_stream(name="EVIL", subjects=["evil.>"])
        await nc.flush()
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return errors


@pytest.mark.parametrize(
    ("user", "action", "refused"),
    [
        ("producer", "pull", 'publish to "$js.api.consumer.msg.next.pifarm_jobs.worker-idle-model"'),
        ("producer", "read-worker-inbox", 'subscription to "_inbox_pifarm_worker.>"'),
        ("worker", "publish-job", 'publish to "pifarm.jobs.idle-model"'),
        ("worker", "read-jobs", 'subscription to "pifarm.jobs.>"'),
        ("worker", "create-stream", 'publish to "$js.api.stream.create.evil"'),
    ],
)
def test_least_privilege(nats_server, declared, watch, user, action, refused):
    pending = watch.consumer(IDLE).num_pending
    errors = watch.call(_as_user(nats_server, user, action))
    assert errors == [f"nats: permissions violation for {refused}"]
    assert watch.consumer(IDLE).num_pending == pending
    assert watch.consumer(IDLE).num_ack_pending == 0


def test_a_job_for_an_undeclared_model_is_refused(declared, producer_settings):
    code, payload, _stderr = agent(
        "submit", "--model", "nobody-serves-this", "--prompt", "x", "--settings", str(producer_settings)
    )
    assert code == 1
    assert payload["message"] == (
        "model nobody-serves-this: no consumer PIFARM_JOBS/worker-nobody-serves-this; "
        "declare the model (pifarm-agent job declare) before sending it jobs"
    )


def test_no_result_in_time_is_a_clear_error(declared, producer_settings, watch):
    code, payload, _stderr = agent(
        "submit",
        "--model",
        IDLE,
        "--prompt",
        "x",
        "--id",
        "idle-1",
        "--timeout",
        "1",
        "--settings",
        str(producer_settings),
    )
    assert code == 1
    assert payload["message"] == (
        "job idle-1: no result on pifarm.results.idle-1 within 1 s; "
        "the job stays queued, and a worker's answer is kept in PIFARM_RESULTS"
    )
    assert watch.consumer(IDLE).num_pending >= 1


def test_submit_takes_no_answer_that_is_not_its_jobs(declared, producer_settings, watch):
    """Anyone who may publish results could answer on a job's subject: only the job's own id counts."""
    answers: list[tuple[int, dict, str]] = []
    argv = ["--model", IDLE, "--prompt", "x", "--id", "forged-1", "--timeout", "4"]
    pending = watch.consumer(IDLE).num_pending
    producer = threading.Thread(
        target=lambda: answers.append(agent("submit", *argv, "--settings", str(producer_settings)))
    )
    producer.start()
    watch.wait_for("the job in the queue", lambda: watch.consumer(IDLE).num_pending > pending, 15)
    forged = json.dumps({"id": "someone-else", "model": IDLE, "node": "evil", "text": "forged"}).encode()
    watch.call(watch.nc.publish("pifarm.results.forged-1", forged))
    producer.join(timeout=30)
    [(code, payload, _stderr)] = answers
    assert code == 1, payload
    assert payload["message"].startswith("job forged-1: no result on pifarm.results.forged-1 within 4 s")


def test_a_wrong_password_fails_without_showing_it(nats_server, declared):
    wrong = "not-the-password-Zz81"
    settings = {"nats": {"servers": [nats_server.url], "user": "producer", "password": wrong}}
    code, payload, stderr = agent("submit", "--model", IDLE, "--prompt", "x", stdin=json.dumps(settings))
    assert code == 1
    assert payload["message"].startswith(f"connect to NATS {nats_server.url}: ")
    assert "authorization violation" in payload["message"].lower()
    assert wrong not in json.dumps(payload) + stderr


def test_an_answer_survives_a_nats_restart_between_the_run_and_the_read(
    declared, nats_server, llama_server, producer_settings, watch, tmp_path, capsys
):
    # The generation takes 4 s: NATS goes down while it runs and comes back after it finished.
    proxy = SlowProxy(llama_server.url, delay=4)
    worker = WorkerProcess(tmp_path, nats_server, "itest-durable", [{"name": DURABLE, "url": proxy.url}])
    argv = ["--model", DURABLE, "--prompt", "Say yes.", "--n-predict", "4", "--id", "durable-1"]
    answers: list[tuple[int, dict, str]] = []
    try:
        worker.wait_ready()
        producer = threading.Thread(
            target=lambda: answers.append(
                agent("submit", *argv, "--timeout", "60", "--settings", str(producer_settings))
            )
        )
        producer.start()
        watch.wait_for("the worker to hold the job", lambda: watch.consumer(DURABLE).num_ack_pending == 1, 15)
        nats_server.stop()
        stopped = time.monotonic()
        time.sleep(6)  # the generation ends during the outage; its result waits for NATS
        nats_server.start()
        back = time.monotonic()
        producer.join(timeout=90)
        answered = time.monotonic() - back
        [(code, answer, stderr)] = answers
        assert code == 0, (answer, stderr)
        assert (answer["id"], answer["node"], answer["deliveries"]) == ("durable-1", "itest-durable", 1)
        assert answer["text"]
        # The same id again: no second run, the answer comes from PIFARM_RESULTS.
        code, again, stderr = agent("submit", *argv, "--timeout", "10", "--settings", str(producer_settings))
        assert code == 0, (again, stderr)
        assert (again["duplicate"], again["stream"]) == (True, RESULTS_STREAM)
        assert (again["text"], again["node"]) == (answer["text"], answer["node"])
        assert worker.metrics()[f'pifarm_worker_jobs_total{{model="{DURABLE}",outcome="done"}}'] == 1
        stored = watch.stream(RESULTS_STREAM).state
        assert stored.messages >= 1
        figure(
            capsys,
            f"NATS down {back - stopped:.1f} s while a job ran: the waiting producer got the answer "
            f"{answered:.1f} s after NATS came back; the same id again was answered from {RESULTS_STREAM}, "
            "run once",
        )
    finally:
        worker.stop()
        proxy.close()


def test_the_worker_rides_out_a_nats_restart(node_a, nats_server, producer_settings, capsys):
    nats_server.stop()
    time.sleep(1)
    restarted = time.monotonic()
    nats_server.start()
    code, answer, stderr = agent(
        "submit",
        "--model",
        ANSWERING,
        "--prompt",
        "Two plus two is",
        "--n-predict",
        "4",
        "--timeout",
        "30",
        "--settings",
        str(producer_settings),
    )
    assert code == 0, (answer, stderr)
    assert answer["node"] == "itest-node-a"
    assert "nats: reconnected" in node_a.log_text()
    figure(capsys, f"NATS restart: answered {time.monotonic() - restarted:.1f} s after the server came back")
