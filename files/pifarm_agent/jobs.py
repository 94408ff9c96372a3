"""The job path (docs/architecture.md, flow 2): NATS JetStream work queue → worker → llama-server → result.

Names, one place for all of them (:func:`names`, the constants below):

* stream ``PIFARM_JOBS``: work-queue retention, subjects ``pifarm.jobs.>``; a job for model M
  is published on ``pifarm.jobs.<token(M)>`` with the header ``Nats-Msg-Id: <job id>`` so the
  stream's duplicate window drops a second copy;
* one durable pull consumer per model, ``worker-<token(M)>``, filtered on that subject;
* results on ``pifarm.results.<job id>``, kept in the limits stream ``PIFARM_RESULTS`` for
  ``results_max_age_seconds`` (header ``Nats-Msg-Id: result-<job id>``, so a job answered twice
  is stored once): a producer that was away, or lost NATS while its job ran, still gets the
  answer, and a job id submitted again within the duplicate window is answered from there;
* dead letters on ``pifarm.dead.<token(M)>``, kept in the limits stream ``PIFARM_DEAD``; a job
  that ran out of deliveries without an answer (its worker died on the last one) is reported by
  nats-server's max-deliveries advisory, ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.PIFARM_JOBS.
  <consumer>``, which the model's workers take in turn (queue group) and dead-letter.

``token(M)`` maps every character outside ``[A-Za-z0-9_-]`` to ``_``: NATS splits subjects at
dots (``qwen2.5-0.5b`` would be two tokens) and MQTT forbids ``+ # /`` in a topic level. NATS's
MQTT listener maps the topic ``pifarm/jobs/<token>`` to the subject ``pifarm.jobs.<token>``
and ``pifarm.results.<id>`` to ``pifarm/results/<id>``; MQTT carries no headers, so the job
id travels in the payload too.

Messages (JSON):

* job: ``{"id", "model", "prompt" or "messages", "n_predict" (optional, default 64), "reply_to"
  (optional)}``; ``id`` is 1-128 of ``[A-Za-z0-9_-]`` (it becomes a subject token), ``reply_to`` a
  subject under ``pifarm.results.`` (workers may publish nowhere else). ``prompt`` is raw text for
  llama-server's ``/completion``; ``messages`` (``[{"role", "content"}]``, OpenAI's chat form) go
  through the model's chat template (``/v1/chat/completions``), which instruction-tuned models need;
* result: ``{"id", "model", "node", "text", "tokens_predicted", "latency_ms", "deliveries"}``;
* dead letter: a reference to the job, never a copy of it, so that it always fits
  ``max_payload`` (a 900 KB CJK prompt re-escaped is 1.8 MB): ``{"id", "model" (null when the
  job had none), "reason", "deliveries", "node", "stream", "stream_sequence", "size" (the job's
  bytes), "excerpt" (its prompt, last message or raw text, cut at 200 characters)}``.

The least-privilege NATS permissions of the ``producer`` and ``worker`` users live in
``nats_permissions.json`` next to this file (:func:`nats_permissions`); the worker connects
with the inbox prefix :data:`WORKER_INBOX_PREFIX`, so producers, who subscribe ``_INBOX.>``,
cannot read the jobs JetStream delivers to workers. MQTT devices log in as ``producer``: its
``$MQTT.sub.>`` is where nats-server delivers a device's QoS 1 subscription.

``backoff_seconds`` is never written into a consumer: a consumer ``backoff`` replaces
``ack_wait`` with its first entry and retimes delayed naks (nats-server consumer.go), so the
worker applies it itself with ``nak(delay)``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

JOBS_STREAM = "PIFARM_JOBS"
DEAD_STREAM = "PIFARM_DEAD"
RESULTS_STREAM = "PIFARM_RESULTS"
JOBS_PREFIX = "pifarm.jobs"
RESULTS_PREFIX = "pifarm.results"
DEAD_PREFIX = "pifarm.dead"
MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}"
# A dead letter's longest excerpt of the job and longest reason, in characters.
DEAD_EXCERPT_CHARS = 200
DEAD_REASON_CHARS = 1000
CONSUMER_PREFIX = "worker-"
MQTT_JOBS_PREFIX = "pifarm/jobs"
MQTT_RESULTS_PREFIX = "pifarm/results"
WORKER_INBOX_PREFIX = "_INBOX_pifarm_worker"
MSG_ID_HEADER = "Nats-Msg-Id"
CONSUMER_DESCRIPTION = "pifarm jobs of model "

DEFAULT_N_PREDICT = 64
MAX_N_PREDICT = 32768
MAX_MODEL_NAME = 128
CHAT_ROLES = ("system", "user", "assistant")
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
# A subject token: no separators, wildcards or whitespace.
_SUBJECT_TOKEN = re.compile(r"[^.*>\s]+")
API_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5


class JobError(Exception):
    """A job command failed; the text names what and why, never a credential."""


class SettingsError(JobError):
    """Settings or a worker config are incomplete or malformed."""


# -- names ------------------------------------------------------------------------------


def token(model: str) -> str:
    """The subject token of a model: every character outside [A-Za-z0-9_-] becomes ``_``."""
    return _NOT_TOKEN.sub("_", model)


@dataclass(frozen=True)
class Names:
    model: str
    token: str
    job_subject: str
    dead_subject: str
    consumer: str
    mqtt_jobs_topic: str
    max_deliveries_advisory: str
    dead_letter_queue: str


def names(model: str) -> Names:
    """Every NATS and MQTT name of a model's jobs."""
    if not model:
        raise SettingsError("a model name must not be empty")
    tok = token(model)
    return Names(
        model=model,
        token=tok,
        job_subject=f"{JOBS_PREFIX}.{tok}",
        dead_subject=f"{DEAD_PREFIX}.{tok}",
        consumer=f"{CONSUMER_PREFIX}{tok}",
        mqtt_jobs_topic=f"{MQTT_JOBS_PREFIX}/{tok}",
        max_deliveries_advisory=f"{MAX_DELIVERIES_ADVISORY}.{CONSUMER_PREFIX}{tok}",
        # One worker of the model takes each advisory.
        dead_letter_queue=f"pifarm-dead-{tok}",
    )


def result_subject(job_id: str) -> str:
    return f"{RESULTS_PREFIX}.{job_id}"


def mqtt_result_topic(job_id: str) -> str:
    return f"{MQTT_RESULTS_PREFIX}/{job_id}"


def nats_permissions() -> dict[str, Any]:
    """The nats-server ``permissions`` maps of the ``producer`` and ``worker`` users."""
    text = resources.files("pifarm_agent").joinpath("nats_permissions.json").read_text(encoding="utf-8")
    return json.loads(text)


# -- settings ---------------------------------------------------------------------------

_MIB = 1024 * 1024
DECLARE_DEFAULTS: dict[str, Any] = {
    "ack_wait_seconds": 120,
    "max_deliver": 3,
    "backoff_seconds": [2, 10],
    "duplicate_window_seconds": 120,
    # Jobs are prompts of a few KB: 256 MiB holds 100 000s of them on a small gateway disk.
    "max_bytes": 256 * _MIB,
    # A job nobody took within a day is stale; dead letters stay a week for a post-mortem.
    "max_age_seconds": 86400,
    "dead_letter_max_age_seconds": 7 * 86400,
    # Long enough for a producer to come back after a NATS restart or a lost connection.
    "results_max_age_seconds": 3600,
    # Per model, across all workers: must stay above the farm's total slots for that model.
    "max_ack_pending": 256,
}
WORKER_DEFAULTS: dict[str, Any] = {
    "backoff_seconds": [2, 10],
    "request_timeout_seconds": 300,
    "metrics_address": "0.0.0.0",
    "metrics_port": 9108,
    # The farm's ceiling on tokens per job (farm_max_tokens): the gateway holds HTTP requests
    # to it, the worker holds jobs to it.
    "max_tokens": MAX_N_PREDICT,
}
NATS_KEYS = ("servers", "user", "password")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a JSON object, got {_type(value)}")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _known(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SettingsError(f"{where}: unknown key {key!r:.60} (allowed: {', '.join(allowed)})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: Any, where: str, *, zero: bool = False) -> float | int:
    bound = ">= 0" if zero else "> 0"
    if not _is_number(value) or value < 0 or (value == 0 and not zero):
        raise SettingsError(f"{where} must be a number of seconds {bound}, got {value!r:.40}")
    return value


def _integer(value: Any, where: str, *, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SettingsError(f"{where} must be an integer >= {minimum}, got {value!r:.40}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{where} must be an integer <= {maximum}, got {value}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{where} must be a non-empty string, got {value!r:.40}")
    return value


def _backoff(value: Any, where: str) -> tuple[float | int, ...]:
    if not isinstance(value, list) or not value:
        raise SettingsError(f"{where} must be a non-empty list of seconds, got {value!r:.60}")
    return tuple(_seconds(item, f"{where}[{index}]", zero=True) for index, item in enumerate(value))


def _model_name(value: Any, where: str) -> str:
    name = _string(value, where)
    if len(name) > MAX_MODEL_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise SettingsError(
            f"{where}: {name!r:.80} is not a model name (1-{MAX_MODEL_NAME} printable, no spaces)"
        )
    return name


def _unique_tokens(models: list[str], where: str) -> None:
    seen: dict[str, str] = {}
    for index, model in enumerate(models):
        tok = token(model)
        if tok in seen:
            raise SettingsError(
                f"{where}[{index}]: model {model!r} and model {seen[tok]!r} share the subject token "
                f"{tok!r} (characters outside [A-Za-z0-9_-] become _): rename one"
            )
        seen[tok] = model


@dataclass(frozen=True)
class NatsSettings:
    """How to reach NATS: server URLs and, optionally, a user and password."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, value: Any, where: str = "nats") -> NatsSettings:
        data = _object(value, where)
        _known(data, NATS_KEYS, where)
        servers = data.get("servers")
        if not isinstance(servers, list) or not servers:
            raise SettingsError(f"{where}.servers must be a non-empty list of URLs, got {servers!r:.80}")
        urls = tuple(_server_url(item, f"{where}.servers[{i}]") for i, item in enumerate(servers))
        user, password = data.get("user"), data.get("password")
        if user is not None:
            _string(user, f"{where}.user")
        if password is not None and not isinstance(password, str):
            raise SettingsError(f"{where}.password must be a string, got {_type(password)}")
        if (user is None) != (password is None):
            raise SettingsError(f"{where}: user and password go together (give both or neither)")
        return cls(servers=urls, user=user, password=password)

    def secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()


def _server_url(value: Any, where: str) -> str:
    url = _string(value, where)
    if "://" not in url:
        url = f"nats://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise SettingsError(f"{where}: scheme {parts.scheme!r} is not nats:// or tls://")
    if parts.username or parts.password:
        # A URL ends up in logs and error messages; credentials have their own keys.
        raise SettingsError(f"{where}: put credentials in user and password, not in the URL")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise SettingsError(f"{where}: {url!r:.80} has an invalid port") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SettingsError(f"{where}: {url!r:.80} is not nats://host:port")
    return f"{parts.scheme}://{parts.netloc}"


def connection_settings(value: Any, where: str = "settings") -> NatsSettings:
    """The ``nats`` object of a settings document; other keys are left to their commands."""
    data = _object(value, where)
    if "nats" not in data:
        raise SettingsError(f"{where}: the key nats (servers, user, password) is missing")
    return NatsSettings.parse(data["nats"], f"{where}.nats")


DECLARE_KEYS = ("nats", "models", *DECLARE_DEFAULTS)


@dataclass(frozen=True)
class DeclareSettings:
    nats: NatsSettings
    models: tuple[str, ...]
    ack_wait_seconds: float | int
    max_deliver: int
    backoff_seconds: tuple[float | int, ...]
    duplicate_window_seconds: float | int
    max_bytes: int
    max_age_seconds: float | int
    dead_letter_max_age_seconds: float | int
    results_max_age_seconds: float | int
    max_ack_pending: int

    @classmethod
    def parse(cls, value: Any, where: str = "settings") -> DeclareSettings:
        data = _object(value, where)
        _known(data, DECLARE_KEYS, where)
        nats_settings = connection_settings(data, where)
        models = data.get("models")
        if not isinstance(models, list):
            raise SettingsError(f"{where}.models must be a list of model names, got {_type(models)}")
        models = [_model_name(item, f"{where}.models[{i}]") for i, item in enumerate(models)]
        _unique_tokens(models, f"{where}.models")
        merged = {**DECLARE_DEFAULTS, **{k: v for k, v in data.items() if k in DECLARE_DEFAULTS}}
        max_bytes = merged["max_bytes"]
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or (max_bytes < 1 and max_bytes != -1)
        ):
            raise SettingsError(
                f"{where}.max_bytes must be an integer > 0, or -1 for no limit, got {max_bytes!r:.40}"
            )
        settings = cls(
            nats=nats_settings,
            models=tuple(models),
            ack_wait_seconds=_seconds(merged["ack_wait_seconds"], f"{where}.ack_wait_seconds"),
            max_deliver=_integer(merged["max_deliver"], f"{where}.max_deliver", minimum=1),
            backoff_seconds=_backoff(merged["backoff_seconds"], f"{where}.backoff_seconds"),
            duplicate_window_seconds=_seconds(
                merged["duplicate_window_seconds"], f"{where}.duplicate_window_seconds"
            ),
            max_bytes=max_bytes,
            max_age_seconds=_seconds(merged["max_age_seconds"], f"{where}.max_age_seconds", zero=True),
            dead_letter_max_age_seconds=_seconds(
                merged["dead_letter_max_age_seconds"], f"{where}.dead_letter_max_age_seconds", zero=True
            ),
            results_max_age_seconds=_seconds(
                merged["results_max_age_seconds"], f"{where}.results_max_age_seconds"
            ),
            max_ack_pending=_integer(merged["max_ack_pending"], f"{where}.max_ack_pending", minimum=1),
        )
        if 0 < settings.max_age_seconds < settings.duplicate_window_seconds:
            # JetStream refuses a duplicate window longer than the stream keeps messages.
            raise SettingsError(
                f"{where}: duplicate_window_seconds ({settings.duplicate_window_seconds}) must not exceed "
                f"max_age_seconds ({settings.max_age_seconds})"
            )
        window = settings.duplicate_window_seconds
        for key in ("dead_letter_max_age_seconds", "results_max_age_seconds"):
            if 0 < (age := getattr(settings, key)) < window:
                raise SettingsError(
                    f"{where}: duplicate_window_seconds ({window}) must not exceed {key} ({age})"
                )
        return settings


WORKER_KEYS = ("node", "nats", "models", *WORKER_DEFAULTS)
WORKER_MODEL_KEYS = ("name", "url", "slots", "api_key")


@dataclass(frozen=True)
class WorkerModel:
    name: str
    url: str
    slots: int = 1
    api_key: str | None = field(default=None, repr=False)

    @property
    def names(self) -> Names:
        return names(self.name)


@dataclass(frozen=True)
class WorkerConfig:
    node: str
    nats: NatsSettings
    models: tuple[WorkerModel, ...]
    backoff_seconds: tuple[float | int, ...]
    request_timeout_seconds: float | int
    metrics_address: str
    metrics_port: int | None
    max_tokens: int = MAX_N_PREDICT

    @classmethod
    def parse(cls, value: Any, where: str = "config") -> WorkerConfig:
        data = _object(value, where)
        _known(data, WORKER_KEYS, where)
        if "node" not in data:
            raise SettingsError(
                f"{where}: the key node (this node's name, sent with every result) is missing"
            )
        node = _string(data["node"], f"{where}.node")
        nats_settings = connection_settings(data, where)
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise SettingsError(f"{where}.models must be a non-empty list of {{name, url, slots}}")
        parsed = tuple(_worker_model(item, f"{where}.models[{i}]") for i, item in enumerate(models))
        _unique_tokens([m.name for m in parsed], f"{where}.models")
        merged = {**WORKER_DEFAULTS, **{k: v for k, v in data.items() if k in WORKER_DEFAULTS}}
        port = merged["metrics_port"]
        if port is not None:
            _integer(port, f"{where}.metrics_port", minimum=1, maximum=65535)
        return cls(
            node=node,
            nats=nats_settings,
            models=parsed,
            backoff_seconds=_backoff(merged["backoff_seconds"], f"{where}.backoff_seconds"),
            request_timeout_seconds=_seconds(
                merged["request_timeout_seconds"], f"{where}.request_timeout_seconds"
            ),
            metrics_address=_string(merged["metrics_address"], f"{where}.metrics_address"),
            metrics_port=port,
            max_tokens=_integer(
                merged["max_tokens"], f"{where}.max_tokens", minimum=1, maximum=MAX_N_PREDICT
            ),
        )

    def secrets(self) -> tuple[str, ...]:
        return self.nats.secrets() + tuple(m.api_key for m in self.models if m.api_key)


def _worker_model(value: Any, where: str) -> WorkerModel:
    data = _object(value, where)
    _known(data, WORKER_MODEL_KEYS, where)
    name = _model_name(data.get("name"), f"{where}.name")
    url = _string(data.get("url"), f"{where}.url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{where}.url: {url!r:.80} is not http(s)://host:port of a llama-server")
    slots = _integer(data.get("slots", 1), f"{where}.slots", minimum=1)
    api_key = data.get("api_key")
    if api_key is not None:
        _string(api_key, f"{where}.api_key")
    return WorkerModel(name=name, url=url.rstrip("/"), slots=slots, api_key=api_key)


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A completion of ``prompt``, or, with ``messages`` set, a chat turn (``prompt`` is then empty)."""

    id: str
    model: str
    prompt: str
    n_predict: int = DEFAULT_N_PREDICT
    reply_to: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def payload(self) -> bytes:
        body: dict[str, Any] = {"id": self.id, "model": self.model}
        if self.messages is not None:
            body["messages"] = self.chat_messages()
        else:
            body["prompt"] = self.prompt
        body["n_predict"] = self.n_predict
        if self.reply_to:
            body["reply_to"] = self.reply_to
        return json.dumps(body).encode()

    @property
    def result_subject(self) -> str:
        return self.reply_to or result_subject(self.id)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]


def _chat_messages(value: Any) -> tuple[tuple[str, str], ...] | str:
    """The messages as (role, content) pairs, or what is wrong with them."""
    if not isinstance(value, list) or not value:
        return "messages must be a non-empty list of {role, content}"
    pairs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            return f"messages[{i}] must be an object with exactly role and content"
        role, content = item["role"], item["content"]
        if role not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.40}"
        if not isinstance(content, str) or not content:
            return f"messages[{i}].content must be a non-empty string"
        pairs.append((role, content))
    return tuple(pairs)


class MalformedJobError(ValueError):
    """A job message no worker can run: it goes to the dead letters, never retried."""

    def __init__(self, reason: str, job_id: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id):
        raise SettingsError(f"job id {job_id!r:.80} must be 1-128 characters of [A-Za-z0-9_-]")
    return job_id


def _reply_to_ok(subject: str) -> bool:
    parts = subject.split(".")
    return (
        subject.startswith(RESULTS_PREFIX + ".")
        and len(parts) > len(RESULTS_PREFIX.split("."))
        and all(_SUBJECT_TOKEN.fullmatch(part) for part in parts)
    )


def parse_job(data: bytes, subject_token: str | None = None, max_n_predict: int = MAX_N_PREDICT) -> Job:
    """The job in a message; MalformedJobError says what is wrong with it. A worker passes its
    farm's token ceiling as max_n_predict."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedJobError(f"malformed job: not JSON ({exc})", None) from None
    if not isinstance(body, dict):
        raise MalformedJobError(f"malformed job: a JSON {_type(body)}, not an object", None)
    job_id = body.get("id")
    shown_id = job_id if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) else None

    def bad(reason: str) -> MalformedJobError:
        return MalformedJobError(f"malformed job: {reason}", shown_id)

    if shown_id is None:
        raise bad(f"id must be 1-128 characters of [A-Za-z0-9_-], got {job_id!r:.60}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"model must be a non-empty string, got {model!r:.60}")
    if subject_token is not None and token(model) != subject_token:
        raise bad(f"model {model!r:.60} does not belong on the subject of {subject_token!r}")
    messages = None
    if "messages" in body:
        if "prompt" in body:
            raise bad("a job has a prompt or messages, not both")
        messages = _chat_messages(body["messages"])
        if isinstance(messages, str):
            raise bad(messages)
        prompt = ""
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise bad("prompt must be a non-empty string" if "prompt" in body else "prompt is missing")
    n_predict = body.get("n_predict", DEFAULT_N_PREDICT)
    if not isinstance(n_predict, int) or isinstance(n_predict, bool) or not 1 <= n_predict <= max_n_predict:
        raise bad(f"n_predict must be an integer from 1 to {max_n_predict}, got {n_predict!r:.40}")
    reply_to = body.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not _reply_to_ok(reply_to)):
        raise bad(f"reply_to must be a subject under {RESULTS_PREFIX}., got {reply_to!r:.80}")
    return Job(
        id=job_id, model=model, prompt=prompt, n_predict=n_predict, reply_to=reply_to, messages=messages
    )


@dataclass(frozen=True)
class JobResult:
    """What a worker answers on the job's result subject."""

    job: Job
    node: str
    text: str
    tokens_predicted: int
    latency_ms: float
    deliveries: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.job.id,
            "model": self.job.model,
            "node": self.node,
            "text": self.text,
            "tokens_predicted": self.tokens_predicted,
            "latency_ms": round(self.latency_ms, 1),
            "deliveries": self.deliveries,
        }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _excerpt_of(body: Any, text: str) -> str:
    """What a person reading the dead letter recognises the job by: its prompt, else its last message."""
    if isinstance(body, dict):
        if isinstance(body.get("prompt"), str):
            return body["prompt"]
        messages = body.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            content = messages[-1].get("content")
            if isinstance(content, str):
                return content
    return text


def dead_letter(data: bytes, *, reason: str, deliveries: int, node: str, sequence: int) -> dict[str, Any]:
    """The dead letter of the job message ``data`` (stream sequence ``sequence``): a reference, not a copy."""
    text = data.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    fields = body if isinstance(body, dict) else {}
    job_id, model = fields.get("id"), fields.get("model")
    return {
        "id": job_id if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) else None,
        "model": _clip(model, 128) if isinstance(model, str) else None,
        "reason": _clip(reason, DEAD_REASON_CHARS),
        "deliveries": deliveries,
        "node": node,
        "stream": JOBS_STREAM,
        "stream_sequence": sequence,
        "size": len(data),
        "excerpt": _clip(_excerpt_of(body, text), DEAD_EXCERPT_CHARS),
    }


# -- connecting -------------------------------------------------------------------------

ErrorHook = Callable[[Exception], Awaitable[None]]


class ErrorLog:
    """Collects what the NATS client reports asynchronously (auth failures, permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if text not in self.errors:
            self.errors.append(text)

    def hint(self) -> str:
        return f" (server said: {'; '.join(self.errors[-3:])})" if self.errors else ""


async def connect_once(settings: NatsSettings, *, name: str, errors: ErrorLog) -> Client:
    """A connection for a command: each server is tried twice, then the command fails."""
    try:
        return await nats.connect(
            list(settings.servers),
            name=name,
            user=settings.user,
            password=settings.password,
            connect_timeout=CONNECT_TIMEOUT,
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            error_cb=errors.record,
        )
    except Exception as exc:
        raise JobError(
            f"connect to NATS {', '.join(settings.servers)}: {exc or type(exc).__name__}{errors.hint()}"
        ) from None


def _api_error(action: str, exc: Exception, errors: ErrorLog | None = None) -> JobError:
    hint = errors.hint() if errors else ""
    if isinstance(exc, ServiceUnavailableError):
        return JobError(f"{action}: JetStream does not answer (is it enabled for this account?){hint}")
    if isinstance(exc, APIError):
        return JobError(f"{action}: {exc.description} (JetStream error {exc.err_code}){hint}")
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return JobError(f"{action}: no answer within {API_TIMEOUT:g} s{hint}")
    return JobError(f"{action}: {exc or type(exc).__name__}{hint}")


# -- declare ----------------------------------------------------------------------------


def _secs(value: float | int | None) -> float | int | None:
    """Seconds as JSON shows them: 120, not 120.0 (the server answers in nanoseconds)."""
    if value is None:
        return None
    rounded = round(float(value), 9)
    return int(rounded) if rounded.is_integer() else rounded


def _enum(value: Any) -> Any:
    return getattr(value, "value", value)


def _limits_stream(
    name: str, prefix: str, max_age: float | int, settings: DeclareSettings
) -> api.StreamConfig:
    """A stream that keeps what it gets for ``max_age``, the oldest going first when it is full."""
    return api.StreamConfig(
        name=name,
        subjects=[f"{prefix}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_bytes=settings.max_bytes,
        max_age=max_age,
        duplicate_window=settings.duplicate_window_seconds,
    )


def stream_configs(settings: DeclareSettings) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=JOBS_STREAM,
            subjects=[f"{JOBS_PREFIX}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            # A full queue refuses new jobs (the producer sees it) rather than dropping old ones.
            discard=api.DiscardPolicy.NEW,
            max_bytes=settings.max_bytes,
            max_age=settings.max_age_seconds,
            duplicate_window=settings.duplicate_window_seconds,
        ),
        _limits_stream(DEAD_STREAM, DEAD_PREFIX, settings.dead_letter_max_age_seconds, settings),
        _limits_stream(RESULTS_STREAM, RESULTS_PREFIX, settings.results_max_age_seconds, settings),
    ]


def consumer_config(model: str, settings: DeclareSettings) -> api.ConsumerConfig:
    model_names = names(model)
    return api.ConsumerConfig(
        name=model_names.consumer,
        durable_name=model_names.consumer,
        # The token is lossy (qwen2.5 → qwen2_5): the description keeps the model's real name.
        description=f"{CONSUMER_DESCRIPTION}{model}",
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_seconds,
        max_deliver=settings.max_deliver,
        filter_subject=model_names.job_subject,
        max_ack_pending=settings.max_ack_pending,
    )


def stream_view(config: api.StreamConfig) -> dict[str, Any]:
    """The fields declare sets, as compared and shown; JetStream's own defaults are left out."""
    return {
        "subjects": sorted(config.subjects or []),
        "retention": _enum(config.retention),
        "storage": _enum(config.storage),
        "discard": _enum(config.discard),
        "max_bytes": config.max_bytes,
        "max_age_seconds": _secs(config.max_age),
        "duplicate_window_seconds": _secs(config.duplicate_window),
    }


def consumer_view(config: api.ConsumerConfig) -> dict[str, Any]:
    return {
        "description": config.description,
        "filter_subject": config.filter_subject,
        "ack_policy": _enum(config.ack_policy),
        "ack_wait_seconds": _secs(config.ack_wait),
        "max_deliver": config.max_deliver,
        "max_ack_pending": config.max_ack_pending,
    }


STREAM_FIXED = ("retention", "storage")


@dataclass
class Change:
    kind: str
    name: str
    action: str
    fields: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any]
    model: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" if self.kind == "stream" else f"consumer {JOBS_STREAM}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        shown = {"kind": self.kind, "name": self.name, "action": self.action, "changes": self.fields}
        if self.model is not None:
            shown["model"] = self.model
        return {**shown, "before": self.before, "after": self.after}


def compare(kind: str, name: str, before: dict[str, Any] | None, after: dict[str, Any]) -> Change:
    if before is None:
        return Change(kind, name, "create", sorted(after), None, after)
    fields_changed = [key for key in after if before.get(key) != after[key]]
    return Change(kind, name, "update" if fields_changed else "unchanged", fields_changed, before, after)


def _describe(change: Change, check: bool) -> str:
    would = "would be " if check else ""
    what = change.label + (f" (model {change.model})" if change.model else "")
    if change.action == "unchanged":
        return f"{what}: unchanged"
    if change.action == "create":
        return f"{what}: {would}created"
    deltas = ", ".join(f"{key} {change.before.get(key)!r} -> {change.after[key]!r}" for key in change.fields)
    return f"{what}: {would}updated ({deltas})"


async def _stream_config(js: Any, name: str) -> api.StreamConfig | None:
    try:
        return (await js.stream_info(name)).config
    except NotFoundError:
        return None


async def _consumers(js: Any) -> dict[str, api.ConsumerInfo]:
    found: dict[str, api.ConsumerInfo] = {}
    while True:
        page = await js.consumers_info(JOBS_STREAM, offset=len(found))
        new = {info.name: info for info in page if info.name not in found}
        if not new:
            return found
        found.update(new)


async def declare(settings: DeclareSettings, *, check: bool) -> dict[str, Any]:
    """Create or update the two streams and one consumer per model; with ``check`` only report."""
    errors = ErrorLog()
    nc = await connect_once(settings.nats, name="pifarm-agent job declare", errors=errors)
    try:
        return await _declare(nc.jetstream(timeout=API_TIMEOUT), settings, check, errors)
    finally:
        await nc.close()


async def _declare(js: Any, settings: DeclareSettings, check: bool, errors: ErrorLog) -> dict[str, Any]:
    changes, jobs_stream_existed = await _declare_streams(js, settings, check, errors)
    try:
        existing = await _consumers(js) if jobs_stream_existed else {}
    except Exception as exc:
        raise _api_error(f"list the consumers of stream {JOBS_STREAM}", exc, errors) from None
    changes += await _declare_consumers(js, settings, existing, check, errors)
    wanted = {names(model).consumer for model in settings.models}
    unlisted = [
        {
            "name": name,
            "model": _described_model(info.config.description),
            "filter_subject": info.config.filter_subject,
        }
        for name, info in sorted(existing.items())
        if name not in wanted
    ]
    changed = any(change.action != "unchanged" for change in changes)
    lines = [_describe(change, check) for change in changes]
    lines += [
        f"consumer {JOBS_STREAM}/{item['name']}"
        + (f" (model {item['model']})" if item["model"] else "")
        + ": not in models, left as it is"
        for item in unlisted
    ]
    return {
        "status": "changed" if changed else "unchanged",
        "changed": changed,
        "check": check,
        "message": "\n".join(lines),
        "streams": [change.to_dict() for change in changes if change.kind == "stream"],
        "consumers": [change.to_dict() for change in changes if change.kind == "consumer"],
        "unlisted_consumers": unlisted,
        "diff": {
            "before": {change.label: change.before for change in changes},
            "after": {change.label: change.after for change in changes},
        },
    }


async def _declare_streams(
    js: Any, settings: DeclareSettings, check: bool, errors: ErrorLog
) -> tuple[list[Change], bool]:
    changes: list[Change] = []
    jobs_stream_existed = True
    for desired in stream_configs(settings):
        try:
            existing = await _stream_config(js, desired.name)
        except Exception as exc:
            raise _api_error(f"read stream {desired.name}", exc, errors) from None
        change = compare(
            "stream", desired.name, stream_view(existing) if existing else None, stream_view(desired)
        )
        fixed = [key for key in STREAM_FIXED if key in change.fields and change.before is not None]
        if fixed:
            raise JobError(
                f"stream {desired.name} exists with {', '.join(f'{k} {change.before[k]}' for k in fixed)}; "
                f"JetStream cannot change that in place: remove the stream (and its messages) first"
            )
        if desired.name == JOBS_STREAM:
            jobs_stream_existed = existing is not None
        if change.action != "unchanged" and not check:
            try:
                if existing is None:
                    await js.add_stream(desired)
                else:
                    # Fields declare does not manage (an operator's max_msgs, say) stay as they are.
                    managed = {key: getattr(desired, key) for key in _STREAM_MANAGED}
                    await js.update_stream(existing.evolve(**managed))
            except Exception as exc:
                raise _api_error(f"{change.action} stream {desired.name}", exc, errors) from None
        changes.append(change)
    return changes, jobs_stream_existed


async def _declare_consumers(
    js: Any, settings: DeclareSettings, existing: dict[str, Any], check: bool, errors: ErrorLog
) -> list[Change]:
    changes: list[Change] = []
    for model in settings.models:
        desired = consumer_config(model, settings)
        info = existing.get(desired.name)
        change = compare(
            "consumer", desired.name, consumer_view(info.config) if info else None, consumer_view(desired)
        )
        change.model = model
        if change.action != "unchanged" and not check:
            try:
                if info is None:
                    await js.add_consumer(JOBS_STREAM, desired)
                else:
                    managed = {key: getattr(desired, key) for key in _CONSUMER_MANAGED}
                    await js.add_consumer(JOBS_STREAM, info.config.evolve(**managed))
            except Exception as exc:
                raise _api_error(
                    f"{change.action} consumer {JOBS_STREAM}/{desired.name}", exc, errors
                ) from None
        changes.append(change)
    return changes


_STREAM_MANAGED = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "max_bytes",
    "max_age",
    "duplicate_window",
)
_CONSUMER_MANAGED = (
    "description",
    "filter_subject",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
)


def _described_model(description: str | None) -> str | None:
    if description and description.startswith(CONSUMER_DESCRIPTION):
        return description[len(CONSUMER_DESCRIPTION) :]
    return None


# -- submit and dead letters ------------------------------------------------------------


async def _require_consumer(js: Any, model_names: Names, errors: ErrorLog) -> None:
    """Refuse a job no worker could ever take: it would sit in the work queue until max_age."""
    try:
        await js.consumer_info(JOBS_STREAM, model_names.consumer, timeout=API_TIMEOUT)
    except NotFoundError as exc:
        if exc.err_code == 10059:  # stream not found
            raise JobError(
                f"stream {JOBS_STREAM} does not exist: run pifarm-agent job declare first"
            ) from None
        raise JobError(
            f"model {model_names.model}: no consumer {JOBS_STREAM}/{model_names.consumer}; "
            "declare the model (pifarm-agent job declare) before sending it jobs"
        ) from None
    except Exception as exc:
        raise _api_error(f"read consumer {JOBS_STREAM}/{model_names.consumer}", exc, errors) from None


# How long submit listens on its subscription before it looks in PIFARM_RESULTS as well.
RESULT_POLL_SECONDS = 1.0


def _result_of(data: bytes, job: Job) -> dict[str, Any] | None:
    """The result in ``data`` when it answers ``job`` (a shared reply_to carries other jobs' results too)."""
    try:
        result = json.loads(data)
    except ValueError:
        return None
    return result if isinstance(result, dict) and result.get("id") == job.id else None


async def _stored_result(nc: Client, job: Job) -> dict[str, Any] | None:
    """The job's result as PIFARM_RESULTS keeps it; None when it is not there (yet) or NATS is away."""
    try:
        stored = await nc.jetstream(timeout=API_TIMEOUT).get_last_msg(RESULTS_STREAM, job.result_subject)
    except Exception:
        return None
    return _result_of(stored.data, job)


@dataclass
class _ResultWait:
    """A producer's wait for one job's result, over connections that may close and be opened again."""

    settings: NatsSettings
    errors: ErrorLog
    nc: Client
    subscription: Any

    async def _reconnect(self, job: Job) -> bool:
        try:
            self.nc = await connect_once(self.settings, name="pifarm-agent job submit", errors=self.errors)
            self.subscription = await self.nc.subscribe(job.result_subject)
            await self.nc.flush(timeout=API_TIMEOUT)
        except Exception:
            return False
        return True

    async def result(self, job: Job, timeout: float) -> dict[str, Any] | None:
        """The job's result within ``timeout``: from the subscription, else from PIFARM_RESULTS, which
        keeps it through a NATS restart or a reconnect that the subscription missed."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if self.nc.is_closed:
                if not await self._reconnect(job):
                    await asyncio.sleep(min(RESULT_POLL_SECONDS, remaining))
                    continue
            else:
                try:
                    message = await self.subscription.next_msg(timeout=min(RESULT_POLL_SECONDS, remaining))
                except Exception:
                    message = None  # nothing in this slice, or the connection went away under it
                result = _result_of(message.data, job) if message is not None else None
                if result is not None:
                    return result
            if not self.nc.is_closed and (result := await _stored_result(self.nc, job)) is not None:
                return result
        return None


async def submit(settings: NatsSettings, job: Job, *, wait: bool, timeout: float) -> dict[str, Any]:
    """Enqueue ``job``; with ``wait``, return its result (subscribed before publishing)."""
    errors = ErrorLog()
    nc = await connect_once(settings, name="pifarm-agent job submit", errors=errors)
    try:
        js = nc.jetstream(timeout=API_TIMEOUT)
        model_names = names(job.model)
        await _require_consumer(js, model_names, errors)
        subscription = None
        if wait:
            # Answered already (the same id sent again, within the results' max age, even across a NATS
            # restart, which forgets the work queue's duplicate ids): that answer, and no second run.
            stored = await _stored_result(nc, job)
            if stored is not None:
                return _answer(_queued(job, model_names, RESULTS_STREAM, None, True), stored)
            subscription = await nc.subscribe(job.result_subject)
            # The server knows of the subscription before the job exists: no result can be missed.
            await nc.flush(timeout=API_TIMEOUT)
        started = time.monotonic()
        try:
            ack = await js.publish(
                model_names.job_subject, job.payload(), headers={MSG_ID_HEADER: job.id}, timeout=API_TIMEOUT
            )
        except Exception as exc:
            raise _api_error(f"publish job {job.id} to {model_names.job_subject}", exc, errors) from None
        queued = _queued(job, model_names, ack.stream, ack.seq, bool(ack.duplicate))
        if subscription is None:
            state = "already queued (duplicate id within the window)" if ack.duplicate else "queued"
            return {**queued, "message": f"job {job.id} {state} as {ack.stream} #{ack.seq}"}
        # A duplicate id: the earlier job's answer may be stored already.
        result = await _stored_result(nc, job) if ack.duplicate else None
        if result is None:
            waiting = _ResultWait(settings, errors, nc, subscription)
            try:
                result = await waiting.result(job, timeout)
            finally:
                if waiting.nc is not nc:
                    await waiting.nc.close()
        if result is None:
            duplicate = (
                "; its id was a duplicate within the stream's window, so no new job was queued and the "
                f"earlier job has no result in {RESULTS_STREAM}"
                if ack.duplicate
                else f"; the job stays queued, and a worker's answer is kept in {RESULTS_STREAM}"
            )
            raise JobError(
                f"job {job.id}: no result on {job.result_subject} within {timeout:g} s{duplicate}"
            ) from None
        return {**_answer(queued, result), "round_trip_ms": round((time.monotonic() - started) * 1000, 1)}
    finally:
        await nc.close()


def _queued(job: Job, model_names: Names, stream: str, seq: int | None, duplicate: bool) -> dict[str, Any]:
    return {
        "id": job.id,
        "model": job.model,
        "subject": model_names.job_subject,
        "result_subject": job.result_subject,
        "stream": stream,
        "seq": seq,
        "duplicate": duplicate,
    }


def _answer(queued: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {
        **queued,
        "text": result.get("text"),
        "node": result.get("node"),
        "latency_ms": result.get("latency_ms"),
        "tokens_predicted": result.get("tokens_predicted"),
        "deliveries": result.get("deliveries"),
        "message": result.get("text") or "",
    }


async def dead_letters(settings: NatsSettings, model: str, *, limit: int) -> dict[str, Any]:
    """The dead letters of a model, oldest first, at most ``limit``."""
    errors = ErrorLog()
    model_names = names(model)
    nc = await connect_once(settings, name="pifarm-agent job dead", errors=errors)
    try:
        js = nc.jetstream(timeout=API_TIMEOUT)
        try:
            info = await js.stream_info(DEAD_STREAM, subjects_filter=model_names.dead_subject)
        except Exception as exc:
            raise _api_error(f"read stream {DEAD_STREAM}", exc, errors) from None
        total = (info.state.subjects or {}).get(model_names.dead_subject, 0)
        letters: list[dict[str, Any]] = []
        seq = info.state.first_seq or 1
        while total and len(letters) < limit:
            try:
                raw = await js.get_msg(DEAD_STREAM, seq=seq, subject=model_names.dead_subject, next=True)
            except NotFoundError:
                break
            except Exception as exc:
                raise _api_error(f"read dead letter {DEAD_STREAM} #{seq}", exc, errors) from None
            letters.append(_letter(raw))
            seq = raw.seq + 1
        return {
            "model": model,
            "subject": model_names.dead_subject,
            "count": total,
            "dead_letters": letters,
            "message": f"{total} dead letter(s) of model {model} on {model_names.dead_subject}"
            + "".join(
                f"\n  #{item['seq']} {item.get('id', '?')}: {item.get('reason', '?')}" for item in letters
            ),
        }
    finally:
        await nc.close()


def _letter(raw: api.RawStreamMsg) -> dict[str, Any]:
    try:
        body = json.loads(raw.data or b"")
    except ValueError:
        body = {"raw": (raw.data or b"").decode("utf-8", errors="replace")}
    if not isinstance(body, dict):
        body = {"raw": body}
    return {"seq": raw.seq, "time": raw.time.isoformat() if raw.time else None, **body}
