"""The job path's pure parts: names, settings, job messages, the declare comparison, the CLI's flags."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js import api

from pifarm_agent.cli import main
from pifarm_agent.jobs import (
    CONSUMER_PREFIX,
    DEAD_STREAM,
    DECLARE_DEFAULTS,
    JOBS_STREAM,
    RESULTS_STREAM,
    WORKER_INBOX_PREFIX,
    DeclareSettings,
    MalformedJobError,
    SettingsError,
    WorkerConfig,
    compare,
    consumer_config,
    consumer_view,
    dead_letter,
    names,
    nats_permissions,
    parse_job,
    stream_configs,
    stream_view,
    token,
)
from pifarm_agent.worker import _errno_text, _error_text

PASSWORD = "nats-Pa55word-kept-secret"
NATS = {"servers": ["nats://gw.farm:4222"], "user": "admin", "password": PASSWORD}


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gemma3-270m", "gemma3-270m"),
        ("qwen2.5-0.5b", "qwen2_5-0_5b"),
        ("Qwen/Qwen2.5:7B", "Qwen_Qwen2_5_7B"),
        ("a b*c>d+e#f", "a_b_c_d_e_f"),
        ("modèle", "mod_le"),
        ("under_score", "under_score"),
    ],
)
def test_token_maps_everything_outside_the_safe_set_to_underscore(model, expected):
    assert token(model) == expected


@given(st.text(min_size=1, max_size=64))
def test_a_token_is_always_one_safe_subject_token(model):
    tok = token(model)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", tok)
    assert len(tok) == len(model)
    assert token(tok) == tok
    assert names(model).job_subject.split(".") == ["pifarm", "jobs", tok]


def test_names_of_a_dotted_model():
    model = names("qwen2.5-0.5b")
    assert model.job_subject == "pifarm.jobs.qwen2_5-0_5b"
    assert model.dead_subject == "pifarm.dead.qwen2_5-0_5b"
    assert model.consumer == "worker-qwen2_5-0_5b"
    assert model.mqtt_jobs_topic == "pifarm/jobs/qwen2_5-0_5b"


def test_the_permission_file_matches_the_names():
    permissions = nats_permissions()
    assert set(permissions) == {"producer", "worker"}
    worker, producer = permissions["worker"], permissions["producer"]
    assert worker["subscribe"]["allow"] == [
        f"{WORKER_INBOX_PREFIX}.>",
        names("m").max_deliveries_advisory.rsplit(".", 1)[0] + ".*",
    ]
    assert set(worker["publish"]["allow"]) == {
        f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.*",
        f"$JS.ACK.{JOBS_STREAM}.>",
        # The max-deliveries advisory's job: read by its sequence, then deleted once dead-lettered.
        f"$JS.API.STREAM.MSG.GET.{JOBS_STREAM}",
        f"$JS.API.STREAM.MSG.DELETE.{JOBS_STREAM}",
        "pifarm.results.>",
        "pifarm.dead.>",
    }
    assert "pifarm.jobs.>" in producer["publish"]["allow"]
    # submit --wait reads a result it missed (a reconnect, a NATS restart) from the results stream.
    assert f"$JS.API.STREAM.MSG.GET.{RESULTS_STREAM}" in producer["publish"]["allow"]
    assert not any("MSG.NEXT" in subject or "$JS.ACK" in subject for subject in producer["publish"]["allow"])
    # $MQTT.sub.>: the delivery subjects of an MQTT device's QoS 1 subscription (devices log in
    # as the producer); without it the server refuses the subscription.
    assert producer["subscribe"]["allow"] == ["pifarm.results.>", "_INBOX.>", "$MQTT.sub.>"]


# -- settings ---------------------------------------------------------------------------


def test_declare_settings_take_the_defaults():
    settings = DeclareSettings.parse({"nats": NATS, "models": ["qwen2.5-0.5b"]})
    assert settings.models == ("qwen2.5-0.5b",)
    assert settings.ack_wait_seconds == DECLARE_DEFAULTS["ack_wait_seconds"] == 120
    assert settings.max_deliver == 3
    assert settings.backoff_seconds == (2, 10)
    assert settings.nats.servers == ("nats://gw.farm:4222",)
    assert PASSWORD not in repr(settings)
    assert settings.nats.secrets() == (PASSWORD,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_deliver": "3"}, "settings.max_deliver must be an integer >= 1, got '3'"),
        ({"max_deliver": True}, "settings.max_deliver must be an integer >= 1, got True"),
        ({"max_deliver": 0}, "settings.max_deliver must be an integer >= 1, got 0"),
        ({"ack_wait_seconds": 0}, "settings.ack_wait_seconds must be a number of seconds > 0, got 0"),
        ({"backoff_seconds": []}, "settings.backoff_seconds must be a non-empty list of seconds, got []"),
        (
            {"backoff_seconds": [2, -1]},
            "settings.backoff_seconds[1] must be a number of seconds >= 0, got -1",
        ),
        ({"max_bytes": 0}, "settings.max_bytes must be an integer > 0, or -1 for no limit, got 0"),
        ({"models": "m"}, "settings.models must be a list of model names, got str"),
        ({"models": ["a b"]}, "settings.models[0]: 'a b' is not a model name"),
        ({"modles": []}, "settings: unknown key 'modles'"),
        ({"models": ["qwen2.5", "qwen2_5"]}, "settings.models[1]: model 'qwen2_5' and model 'qwen2.5' share"),
        (
            {"max_age_seconds": 60},
            "settings: duplicate_window_seconds (120) must not exceed max_age_seconds (60)",
        ),
    ],
)
def test_declare_settings_errors_name_the_key(change, message):
    with pytest.raises(SettingsError) as raised:
        DeclareSettings.parse({"nats": NATS, "models": [], **change})
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("nats", "message"),
    [
        (None, "settings.nats must be a JSON object, got null"),
        ({"servers": []}, "settings.nats.servers must be a non-empty list of URLs"),
        ({"servers": ["http://gw:4222"]}, "settings.nats.servers[0]: scheme 'http' is not nats:// or tls://"),
        (
            {"servers": [f"nats://admin:{PASSWORD}@gw:4222"]},
            "settings.nats.servers[0]: put credentials in user and password, not in the URL",
        ),
        ({"servers": ["gw:port"]}, "settings.nats.servers[0]: 'nats://gw:port' has an invalid port"),
        ({"servers": ["gw"], "user": "admin"}, "settings.nats: user and password go together"),
        ({"servers": ["gw"], "token": "x"}, "settings.nats: unknown key 'token'"),
    ],
)
def test_nats_settings_errors(nats, message):
    with pytest.raises(SettingsError) as raised:
        DeclareSettings.parse({"nats": nats, "models": []})
    assert str(raised.value).startswith(message)
    assert PASSWORD not in str(raised.value)


def test_a_server_without_a_scheme_is_nats():
    settings = DeclareSettings.parse({"nats": {"servers": ["gw.farm:4222"]}, "models": []})
    assert settings.nats.servers == ("nats://gw.farm:4222",)


WORKER = {
    "node": "pi5-01",
    "nats": NATS,
    "models": [
        {"name": "qwen2.5-0.5b", "url": "http://127.0.0.1:8080/", "slots": 2, "api_key": "llama-key-1"}
    ],
}


def test_worker_config_defaults_and_secrets():
    config = WorkerConfig.parse(WORKER)
    [model] = config.models
    assert (model.url, model.slots) == ("http://127.0.0.1:8080", 2)
    assert (config.metrics_address, config.metrics_port) == ("0.0.0.0", 9108)
    assert config.request_timeout_seconds == 300
    assert set(config.secrets()) == {PASSWORD, "llama-key-1"}
    assert "llama-key-1" not in repr(config)
    assert PASSWORD not in repr(config)
    assert WorkerConfig.parse({**WORKER, "metrics_port": None}).metrics_port is None
    assert config.max_tokens == 32768
    assert WorkerConfig.parse({**WORKER, "max_tokens": 1024}).max_tokens == 1024


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": ""}, "config.node must be a non-empty string"),
        ({"models": []}, "config.models must be a non-empty list"),
        ({"models": [{"name": "m", "url": "ftp://x"}]}, "config.models[0].url: 'ftp://x' is not http(s)://"),
        (
            {"models": [{"name": "m", "url": "http://x", "slots": 0}]},
            "config.models[0].slots must be an integer >= 1",
        ),
        ({"models": [{"name": "m", "url": "http://x", "port": 1}]}, "config.models[0]: unknown key 'port'"),
        ({"metrics_port": 70000}, "config.metrics_port must be an integer <= 65535, got 70000"),
        ({"request_timeout_seconds": -1}, "config.request_timeout_seconds must be a number of seconds > 0"),
        ({"max_tokens": 0}, "config.max_tokens must be an integer >= 1"),
        ({"max_tokens": 40000}, "config.max_tokens must be an integer <= 32768, got 40000"),
    ],
)
def test_worker_config_errors_name_the_key(change, message):
    with pytest.raises(SettingsError) as raised:
        WorkerConfig.parse({**WORKER, **change})
    assert str(raised.value).startswith(message)


def test_worker_config_needs_the_node():
    data = dict(WORKER)
    del data["node"]
    with pytest.raises(SettingsError, match="the key node"):
        WorkerConfig.parse(data)


# -- job messages -----------------------------------------------------------------------


def job(**fields) -> bytes:
    return json.dumps({"id": "j-1", "model": "qwen2.5-0.5b", "prompt": "Hi", **fields}).encode()


def test_a_job_parses_with_defaults():
    parsed = parse_job(job(), "qwen2_5-0_5b")
    assert (parsed.id, parsed.n_predict, parsed.reply_to) == ("j-1", 64, None)
    assert parsed.result_subject == "pifarm.results.j-1"
    assert parse_job(job(reply_to="pifarm.results.batch7.j-1")).result_subject == "pifarm.results.batch7.j-1"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "malformed job: not JSON"),
        (b"\xff\xfe", "malformed job: not JSON"),
        (b"[1, 2]", "malformed job: a JSON list, not an object"),
        (job(id="a.b"), "malformed job: id must be 1-128 characters"),
        (job(model=""), "malformed job: model must be a non-empty string"),
        (job(model="other"), "malformed job: model 'other' does not belong on the subject"),
        (job(prompt=""), "malformed job: prompt must be a non-empty string"),
        (json.dumps({"id": "j-1", "model": "qwen2.5-0.5b"}).encode(), "malformed job: prompt is missing"),
        (job(n_predict=0), "malformed job: n_predict must be an integer from 1 to 32768"),
        (job(n_predict=True), "malformed job: n_predict must be an integer"),
        (job(reply_to="pifarm.jobs.x"), "malformed job: reply_to must be a subject under pifarm.results."),
        (job(reply_to="pifarm.results.>"), "malformed job: reply_to must be a subject under pifarm.results."),
        (job(reply_to="pifarm.results."), "malformed job: reply_to must be a subject under pifarm.results."),
    ],
)
def test_malformed_jobs_say_why(data, reason):
    with pytest.raises(MalformedJobError) as raised:
        parse_job(data, "qwen2_5-0_5b")
    assert raised.value.reason.startswith(reason)


def test_a_chat_job_keeps_its_messages_and_sends_them_back_alike():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    data = json.dumps({"id": "j-1", "model": "qwen2.5-0.5b", "messages": messages}).encode()
    parsed = parse_job(data, "qwen2_5-0_5b")
    assert parsed.messages == (("system", "Be brief."), ("user", "Hi"))
    assert parsed.chat_messages() == messages
    assert json.loads(parsed.payload()) == {
        "id": "j-1",
        "model": "qwen2.5-0.5b",
        "messages": messages,
        "n_predict": 64,
    }
    assert parse_job(parsed.payload()) == parsed


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "messages must be a non-empty list of {role, content}"),
        ("Hi", "messages must be a non-empty list of {role, content}"),
        ([{"role": "user"}], "messages[0] must be an object with exactly role and content"),
        (
            [{"role": "user", "content": "Hi", "name": "x"}],
            "messages[0] must be an object with exactly role and content",
        ),
        (
            [{"role": "tool", "content": "Hi"}],
            "messages[0].role must be one of system, user, assistant, got 'tool'",
        ),
        ([{"role": "user", "content": ""}], "messages[0].content must be a non-empty string"),
    ],
)
def test_malformed_chat_messages_say_why(messages, reason):
    data = json.dumps({"id": "j-1", "model": "qwen2.5-0.5b", "messages": messages}).encode()
    with pytest.raises(MalformedJobError) as raised:
        parse_job(data)
    assert raised.value.reason == f"malformed job: {reason}"


def test_a_job_above_the_farms_token_ceiling_is_refused():
    assert parse_job(job(n_predict=64), "qwen2_5-0_5b", max_n_predict=64).n_predict == 64
    with pytest.raises(MalformedJobError) as raised:
        parse_job(job(n_predict=65), "qwen2_5-0_5b", max_n_predict=64)
    assert raised.value.reason == "malformed job: n_predict must be an integer from 1 to 64, got 65"


def test_a_job_with_a_prompt_and_messages_is_refused():
    with pytest.raises(MalformedJobError, match="a prompt or messages, not both"):
        parse_job(job(messages=[{"role": "user", "content": "Hi"}]))


def test_a_malformed_job_keeps_its_id_when_it_has_a_good_one():
    with pytest.raises(MalformedJobError) as raised:
        parse_job(job(prompt=None), "qwen2_5-0_5b")
    assert raised.value.job_id == "j-1"


def test_a_dead_letter_of_a_900_kb_job_is_a_small_reference():
    # CJK re-escaped as JSON (\uXXXX) doubles its size: a copy would pass max_payload (1 MiB).
    prompt = "漢" * 300_000
    data = json.dumps({"id": "big-1", "model": "qwen2.5-0.5b", "prompt": prompt}, ensure_ascii=False).encode()
    assert len(data) > 900_000
    reason = "HTTP 500: " + "x" * 5000
    letter = dead_letter(data, reason=reason, deliveries=3, node="node1", sequence=41)
    encoded = json.dumps(letter).encode()
    assert len(encoded) < 4096
    assert letter["id"] == "big-1"
    assert letter["model"] == "qwen2.5-0.5b"
    assert (letter["stream"], letter["stream_sequence"], letter["size"]) == (JOBS_STREAM, 41, len(data))
    assert letter["excerpt"] == "漢" * 199 + "…"
    assert len(letter["reason"]) == 1000
    assert letter["reason"].startswith("HTTP 500: xxx")


@pytest.mark.parametrize(
    ("data", "job_id", "excerpt"),
    [
        (b"{not json", None, "{not json"),
        (b"\xff\xfe", None, "\ufffd\ufffd"),
        (b"[1, 2]", None, "[1, 2]"),
        (json.dumps({"id": "bad id", "prompt": "hi"}).encode(), None, "hi"),
        (
            json.dumps(
                {
                    "id": "c-1",
                    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                }
            ).encode(),
            "c-1",
            "U",
        ),
    ],
)
def test_a_dead_letter_names_what_it_can_of_a_malformed_job(data, job_id, excerpt):
    letter = dead_letter(data, reason="malformed job", deliveries=1, node="n", sequence=7)
    assert (letter["id"], letter["excerpt"], letter["size"]) == (job_id, excerpt, len(data))
    assert letter["model"] is None


# -- declare ----------------------------------------------------------------------------


def server_side(config):
    """What JetStream answers: every default filled in, durations back from nanoseconds."""
    if isinstance(config, api.StreamConfig):
        answer = {
            **config.as_dict(),
            "max_consumers": -1,
            "max_msgs": -1,
            "num_replicas": 1,
            "allow_direct": False,
            "max_msg_size": -1,
        }
        return api.StreamConfig.from_response(answer)
    answer = {**config.as_dict(), "deliver_policy": "all", "replay_policy": "instant", "max_waiting": 512}
    return api.ConsumerConfig.from_response(answer)


def test_what_the_server_fills_in_is_not_a_change():
    settings = DeclareSettings.parse({"nats": NATS, "models": ["qwen2.5-0.5b"], "ack_wait_seconds": 2.5})
    for desired in stream_configs(settings):
        change = compare("stream", desired.name, stream_view(server_side(desired)), stream_view(desired))
        assert change.action == "unchanged", change
    desired = consumer_config("qwen2.5-0.5b", settings)
    assert desired.name == f"{CONSUMER_PREFIX}qwen2_5-0_5b"
    change = compare("consumer", desired.name, consumer_view(server_side(desired)), consumer_view(desired))
    assert change.action == "unchanged", change
    assert consumer_view(desired)["ack_wait_seconds"] == 2.5


def test_a_changed_field_is_named_with_before_and_after():
    old = DeclareSettings.parse({"nats": NATS, "models": ["m"], "max_deliver": 3})
    new = DeclareSettings.parse({"nats": NATS, "models": ["m"], "max_deliver": 5, "ack_wait_seconds": 60})
    change = compare(
        "consumer",
        "worker-m",
        consumer_view(consumer_config("m", old)),
        consumer_view(consumer_config("m", new)),
    )
    assert change.action == "update"
    assert change.fields == ["ack_wait_seconds", "max_deliver"]
    assert (change.before["max_deliver"], change.after["max_deliver"]) == (3, 5)
    assert compare("stream", DEAD_STREAM, None, stream_view(stream_configs(new)[1])).action == "create"


def test_the_streams_are_a_work_queue_and_two_limits_streams():
    configs = stream_configs(DeclareSettings.parse({"nats": NATS, "models": []}))
    assert [c.name for c in configs] == [JOBS_STREAM, DEAD_STREAM, RESULTS_STREAM]
    jobs, dead, results = (stream_view(c) for c in configs)
    assert (jobs["subjects"], jobs["retention"], jobs["discard"]) == (["pifarm.jobs.>"], "workqueue", "new")
    assert (dead["subjects"], dead["retention"], dead["max_age_seconds"]) == (
        ["pifarm.dead.>"],
        "limits",
        604800,
    )
    assert (results["subjects"], results["retention"], results["max_age_seconds"]) == (
        ["pifarm.results.>"],
        "limits",
        3600,
    )


@pytest.mark.parametrize("key", ["dead_letter_max_age_seconds", "results_max_age_seconds"])
def test_a_stream_may_not_keep_messages_shorter_than_the_duplicate_window(key):
    with pytest.raises(
        SettingsError, match=f"duplicate_window_seconds \\(120\\) must not exceed {key} \\(60\\)"
    ):
        DeclareSettings.parse({"nats": NATS, "models": [], key: 60})


def test_results_are_kept_for_a_while_never_forever():
    with pytest.raises(SettingsError, match="results_max_age_seconds must be a number of seconds > 0"):
        DeclareSettings.parse({"nats": NATS, "models": [], "results_max_age_seconds": 0})


# -- worker helpers ---------------------------------------------------------------------


def test_llama_errors_are_short():
    assert _error_text(b'{"error": {"code": 400, "message": "request exceeds the context"}}') == (
        "request exceeds the context"
    )
    assert _error_text(b"<html>bad gateway</html>") == "<html>bad gateway</html>"
    assert _error_text(b"") == "(empty body)"
    text = (
        "HTTPConnection(host='127.0.0.1', port=1): Failed to establish a new connection: "
        "[Errno 111] Connection refused"
    )
    assert _errno_text(Exception(text)) == "[Errno 111] Connection refused"


# -- CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["job", "submit", "--model", "m", "--prompt", "p", "--id", "a.b"],
        ["job", "submit", "--model", "m", "--prompt", "p", "--n-predict", "0"],
        ["job", "submit", "--model", "m", "--prompt", "p", "--timeout", "0"],
        ["job", "submit", "--model", "m m", "--prompt", "p"],
        ["job", "dead", "--model", "m", "--limit", "0"],
        ["job", "worker"],
        ["job"],
    ],
)
def test_job_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64


def test_bad_settings_fail_with_the_key_and_never_the_password(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"nats": NATS, "models": ["m"], "max_deliver": -1}))
    assert main(["job", "declare", "--settings", str(settings), "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["message"] == "settings.max_deliver must be an integer >= 1, got -1"
    settings.write_text("{")
    assert main(["job", "declare", "--settings", str(settings)]) == 1
    assert f"settings file {settings}: not JSON" in capsys.readouterr().err


def test_an_unreachable_server_is_an_error_without_the_password(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    # Port 1 on loopback: refused at once.
    nats = {"servers": ["nats://127.0.0.1:1"], "user": "producer", "password": PASSWORD}
    settings.write_text(json.dumps({"nats": nats}))
    code = main(["job", "submit", "--model", "m", "--prompt", "p", "--settings", str(settings), "--json"])
    output = capsys.readouterr()
    assert code == 1
    answer = json.loads(output.out)
    assert answer["message"].startswith("connect to NATS nats://127.0.0.1:1: ")
    assert PASSWORD not in output.out + output.err


def test_worker_config_errors_exit_1(tmp_path, capsys):
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({**WORKER, "models": [{"name": "m", "url": "http://x", "slots": "2"}]}))
    assert main(["job", "worker", "--config", str(config), "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["message"] == f"worker config {config}.models[0].slots must be an integer >= 1, got '2'"
