"""The inference worker: pulls jobs from JetStream and runs them on the node's llama-server.

Per model, at most ``slots`` jobs run at once: each slot pulls one job when it is idle (its
own pull subscription), so a pull never asks for more than the free slots. A job's life
(names and messages: see pifarm_agent.jobs):

* malformed (not JSON, a field missing or wrong) → dead letter, ``term`` (never retried);
* the llama-server answers → the result is published to ``reply_to`` or
  ``pifarm.results.<id>`` and stored by the ``PIFARM_RESULTS`` stream (its ack awaited, through
  a NATS outage of up to 30 s), *then* the job is acked with a double ack (``ack_sync``), so a
  job is only removed once its result is kept, and an ack the server never confirmed is logged;
* the llama-server fails (HTTP 4xx/5xx, refused, timed out) → on the consumer's last delivery
  (``max_deliver``) a dead letter and ``term``; before that ``nak`` with the delay
  ``backoff_seconds[deliveries - 1]`` (the last entry once the list runs out);
* the worker holding the last delivery dies (no ack, no term) → nats-server stops delivering
  the job and says so in a max-deliveries advisory; one of the model's workers (queue group)
  reads the job by its sequence, dead-letters it and deletes it from the work queue.

While a job runs the worker sends ``in_progress`` every ``ack_wait / 2`` so a long generation is
not handed to another worker. SIGTERM or SIGINT: stop pulling, let running jobs finish (each is
bounded by ``request_timeout_seconds``), release a job pulled but not started with ``nak``, drain
the connection and exit 0. NATS outages are waited out: the client reconnects forever.

One line per job on stderr: ``job <id> model=<M> outcome=<done|retried|dead|failed> ms=<n>
deliveries=<n>`` (and the reason). Metrics (prometheus-client, ``metrics_address:metrics_port``):
``pifarm_worker_jobs_total{model,outcome}``, ``pifarm_worker_job_seconds{model}`` (answered jobs,
pull to ack) and ``pifarm_worker_jobs_in_flight{model}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

import nats
import urllib3
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

from pifarm_agent.jobs import (
    API_TIMEOUT,
    CONNECT_TIMEOUT,
    DEAD_STREAM,
    JOBS_STREAM,
    MSG_ID_HEADER,
    RESULTS_STREAM,
    WORKER_INBOX_PREFIX,
    Job,
    JobResult,
    MalformedJobError,
    WorkerConfig,
    WorkerModel,
    dead_letter,
    parse_job,
)

OUTCOMES = ("done", "failed", "retried", "dead")
# How long one pull waits on the server: also the longest a stop (a rollout's drain, a restart)
# waits for a pull to return. An idle slot asks the server once a second: nothing for NATS.
FETCH_WAIT = 1.0
# How often the consumer's ack_wait and max_deliver are re-read (declare may change them).
REFRESH_SECONDS = 60.0
# How long to wait before looking again for a consumer that does not exist yet.
BIND_RETRY = 5.0
ACK_TIMEOUT = 5.0
# How long a finished job's result may wait for NATS (a restart, a lost connection) to be stored.
RESULT_STORE_PATIENCE = 30.0
LLAMA_CONNECT_TIMEOUT = 5.0
JOB_SECONDS_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
LOGGER = "pifarm_agent.worker"


class LlamaError(Exception):
    """The llama-server did not answer a completion (HTTP error, connection, timeout)."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens_predicted: int


class LlamaClient:
    """A job on a local llama-server, one pool for all threads: a prompt through its native
    ``/completion``, chat messages through ``/v1/chat/completions`` (the model's chat template)."""

    def __init__(self, request_timeout: float, max_connections: int) -> None:
        self.request_timeout = request_timeout
        self.pool = urllib3.PoolManager(
            maxsize=max(1, max_connections),
            retries=False,
            timeout=urllib3.Timeout(connect=LLAMA_CONNECT_TIMEOUT, read=request_timeout),
        )

    def complete(self, model: WorkerModel, job: Job) -> Completion:
        headers = {"Content-Type": "application/json"}
        if model.api_key:
            headers["Authorization"] = f"Bearer {model.api_key}"
        if job.messages is not None:
            # The chat route applies the model's chat template, as instruction-tuned models need.
            path = "/v1/chat/completions"
            body = json.dumps({"messages": job.chat_messages(), "max_tokens": job.n_predict}).encode()
        else:
            path = "/completion"
            body = json.dumps({"prompt": job.prompt, "n_predict": job.n_predict}).encode()
        where = f"llama-server {model.url}"
        try:
            response = self.pool.request("POST", f"{model.url}{path}", body=body, headers=headers)
        # NewConnectionError is a ConnectTimeoutError to urllib3: the order matters.
        except NewConnectionError as exc:
            raise LlamaError(f"{where}: cannot connect ({_errno_text(exc)})") from None
        except ConnectTimeoutError:
            raise LlamaError(f"{where}: no connection within {LLAMA_CONNECT_TIMEOUT:g} s") from None
        except ReadTimeoutError:
            raise LlamaError(f"{where}: no answer within {self.request_timeout:g} s") from None
        except HTTPError as exc:
            raise LlamaError(f"{where}: {type(exc).__name__} ({_errno_text(exc)})") from None
        if response.status >= 400:
            raise LlamaError(f"{where}: HTTP {response.status}: {_error_text(response.data)}")
        try:
            answer = json.loads(response.data)
            if job.messages is not None:
                return Completion(
                    text=str(answer["choices"][0]["message"]["content"]),
                    tokens_predicted=int(answer.get("usage", {}).get("completion_tokens", 0)),
                )
            return Completion(
                text=str(answer["content"]), tokens_predicted=int(answer.get("tokens_predicted", 0))
            )
        except (ValueError, KeyError, TypeError, IndexError):
            raise LlamaError(f"{where}: HTTP {response.status} but no completion in the answer") from None


def _errno_text(exc: Exception) -> str:
    match = re.search(r"\[Errno -?\d+\] [^'\"()]*", str(exc))
    return match.group(0).strip() if match else str(exc)[:200]


def _error_text(data: bytes) -> str:
    """llama-server's own message ({"error": {"message": ...}}) or the start of the body."""
    try:
        error = json.loads(data).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return data.decode("utf-8", errors="replace").strip()[:300] or "(empty body)"


class Redactor(logging.Filter):
    """Replaces secrets in every log record (a NATS error could quote one)."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for secret in self.secrets:
            text = text.replace(secret, "***")
        record.msg, record.args = text, None
        return True


def setup_logging(secrets: tuple[str, ...]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s pifarm-worker %(levelname)s %(message)s"))
    handler.addFilter(Redactor(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class Metrics:
    def __init__(self, models: tuple[WorkerModel, ...]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.jobs = Counter(
            "pifarm_worker_jobs_total",
            "Jobs handled, by outcome",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "pifarm_worker_job_seconds",
            "Seconds from pull to ack of answered jobs",
            ["model"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pifarm_worker_jobs_in_flight", "Jobs running now", ["model"], registry=self.registry
        )
        for model in models:
            # Every series exists from the start, so rate() and alerts see a 0, not a gap.
            for outcome in OUTCOMES:
                self.jobs.labels(model.name, outcome)
            self.seconds.labels(model.name)
            self.in_flight.labels(model.name)


@dataclass
class ConsumerState:
    ack_wait: float
    max_deliver: int
    refreshed: float


@dataclass(frozen=True)
class Attempt:
    """One delivery of a job message to this worker."""

    model: WorkerModel
    state: ConsumerState
    message: Msg
    deliveries: int
    started: float


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.log = logging.getLogger(LOGGER)
        self.metrics = Metrics(config.models)
        self.llama = LlamaClient(config.request_timeout_seconds, max(m.slots for m in config.models))
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._stop = asyncio.Event()
        self._nc: Client | None = None
        self._js: Any = None
        self._metrics_server: Any = None

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self, reason: str = "asked to stop") -> None:
        if self._stop.is_set():
            self.log.info("already stopping; waiting for running jobs")
            return
        self.log.info("%s: no new jobs; running jobs finish first", reason)
        self._stop.set()

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, f"got {signal.Signals(signum).name}")
        self._start_metrics()
        try:
            self._nc = await self._connect()
            if self._nc is None:
                return self._summary()
            self._js = self._nc.jetstream(timeout=API_TIMEOUT)
            self.log.info(
                "node %s serving %s",
                self.config.node,
                ", ".join(f"{m.name} ({m.slots} slots, {m.url})" for m in self.config.models),
            )
            await asyncio.gather(*(self._serve(model) for model in self.config.models))
            try:
                await self._nc.drain()
            except Exception:
                # Draining needs the server; in an outage closing is all there is to do.
                with contextlib.suppress(Exception):
                    await self._nc.close()
        finally:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        counts = ", ".join(f"{count} {outcome}" for outcome, count in self.counts.items())
        return {
            "status": "stopped",
            "changed": False,
            "message": f"worker {self.config.node} stopped: {counts}",
            "node": self.config.node,
            "jobs": dict(self.counts),
        }

    def _start_metrics(self) -> None:
        if self.config.metrics_port is None:
            return
        address, port = self.config.metrics_address, self.config.metrics_port
        try:
            self._metrics_server, _thread = start_http_server(
                port, addr=address, registry=self.metrics.registry
            )
        except OSError as exc:
            raise RuntimeError(f"metrics on {address}:{port}: {exc.strerror or exc}") from None
        self.log.info("metrics on http://%s:%d/metrics", address, port)

    async def _connect(self) -> Client | None:
        """Connects, retrying forever (NATS may come up after the node); None when stopped first."""
        servers = ", ".join(self.config.nats.servers)

        last_error: list[str] = []

        async def on_error(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            text = text if text.startswith("nats:") else f"nats: {text}"
            # A long outage fails a reconnect every 2 s: say so once, not every time.
            if last_error != [text]:
                self.log.warning("%s", text)
                last_error[:] = [text]

        async def on_disconnect() -> None:
            if not self._stop.is_set():
                self.log.warning("nats: disconnected from %s; reconnecting", servers)

        async def on_reconnect() -> None:
            last_error.clear()
            self.log.info("nats: reconnected")

        connecting = asyncio.ensure_future(
            nats.connect(
                list(self.config.nats.servers),
                name=f"pifarm-worker {self.config.node}",
                user=self.config.nats.user,
                password=self.config.nats.password,
                inbox_prefix=WORKER_INBOX_PREFIX,
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=2,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        )
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            return None
        return connecting.result()

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- one model ----------------------------------------------------------------------

    async def _consumer_state(self, model: WorkerModel) -> ConsumerState:
        info = await self._js.consumer_info(JOBS_STREAM, model.names.consumer, timeout=API_TIMEOUT)
        return ConsumerState(
            ack_wait=float(info.config.ack_wait or 30),
            max_deliver=int(info.config.max_deliver or -1),
            refreshed=time.monotonic(),
        )

    async def _bind(self, model: WorkerModel) -> ConsumerState | None:
        """The model consumer's settings, once it exists (declare makes it); None when stopped first."""
        consumer = f"{JOBS_STREAM}/{model.names.consumer}"
        told = None
        while not self._stop.is_set():
            try:
                state = await self._consumer_state(model)
                self.log.info(
                    "model %s: pulling from %s (%d slots, ack_wait %g s, max_deliver %d)",
                    model.name,
                    consumer,
                    model.slots,
                    state.ack_wait,
                    state.max_deliver,
                )
                return state
            except NotFoundError:
                problem = f"consumer {consumer} does not exist (pifarm-agent job declare makes it)"
            except Exception as exc:
                problem = f"cannot read consumer {consumer}: {exc or type(exc).__name__}"
            if problem != told:
                self.log.warning("model %s: %s; retrying every %g s", model.name, problem, BIND_RETRY)
                told = problem
            await self._sleep_unless_stopped(BIND_RETRY)
        return None

    async def _serve(self, model: WorkerModel) -> None:
        state = await self._bind(model)
        if state is not None:
            await self._nc.subscribe(
                model.names.max_deliveries_advisory,
                queue=model.names.dead_letter_queue,
                cb=functools.partial(self._on_max_deliveries, model),
            )
            await asyncio.gather(*(self._slot(model, state) for _slot in range(model.slots)))

    async def _slot(self, model: WorkerModel, state: ConsumerState) -> None:
        """One slot: pull one job when idle, run it, again. A pull of one returns as soon as a job
        is there; nats-py's pull of several waits out its timeout for the rest of the batch."""
        subscription = await self._js.pull_subscribe_bind(consumer=model.names.consumer, stream=JOBS_STREAM)
        failing = None
        try:
            while not self._stop.is_set():
                if time.monotonic() - state.refreshed > REFRESH_SECONDS:
                    await self._refresh(model, state)
                try:
                    [message] = await subscription.fetch(1, timeout=FETCH_WAIT)
                except (TimeoutError, nats.errors.TimeoutError):
                    failing = None
                    continue
                except Exception as exc:
                    # An outage: the client reconnects by itself; pulling resumes after it.
                    problem = f"{type(exc).__name__}: {exc}"
                    if problem != failing:
                        self.log.warning("model %s: pull failed (%s); retrying", model.name, problem)
                        failing = problem
                    await self._sleep_unless_stopped(1.0)
                    continue
                failing = None
                if self._stop.is_set():
                    await self._release(model, message)
                    break
                await self._run_job(model, state, message)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _refresh(self, model: WorkerModel, state: ConsumerState) -> None:
        """Takes up a declare's new ack_wait or max_deliver; the slots of a model share ``state``."""
        state.refreshed = time.monotonic()
        try:
            fresh = await self._consumer_state(model)
        except Exception:
            return  # Keep the last known values through an outage; try again later.
        state.ack_wait, state.max_deliver = fresh.ack_wait, fresh.max_deliver

    async def _release(self, model: WorkerModel, message: Msg) -> None:
        with contextlib.suppress(Exception):
            await message.nak()
        job_id = _peek_id(message.data) or "?"
        self.log.info(
            "job %s model=%s outcome=released (stopping: nak, for another worker)", job_id, model.name
        )

    # -- one job ------------------------------------------------------------------------

    async def _run_job(self, model: WorkerModel, state: ConsumerState, message: Msg) -> None:
        attempt = Attempt(model, state, message, message.metadata.num_delivered, time.monotonic())
        in_flight = self.metrics.in_flight.labels(model.name)
        in_flight.inc()
        try:
            outcome, job_id, detail = await self._handle(attempt)
        except Exception as exc:
            outcome, job_id, detail = "failed", _peek_id(message.data), f"{type(exc).__name__}: {exc}"
        finally:
            in_flight.dec()
        seconds = time.monotonic() - attempt.started
        self.counts[outcome] += 1
        self.metrics.jobs.labels(model.name, outcome).inc()
        if outcome == "done":
            self.metrics.seconds.labels(model.name).observe(seconds)
        log = self.log.info if outcome == "done" else self.log.warning
        log(
            "job %s model=%s outcome=%s ms=%.0f deliveries=%d%s",
            job_id or "?",
            model.name,
            outcome,
            seconds * 1000,
            attempt.deliveries,
            f" reason={detail}" if detail else "",
        )

    async def _handle(self, attempt: Attempt) -> tuple[str, str | None, str | None]:
        try:
            job = parse_job(attempt.message.data, attempt.model.names.token, self.config.max_tokens)
        except MalformedJobError as exc:
            await self._dead_letter(attempt, exc.reason)
            return "dead", exc.job_id, exc.reason
        keep_alive = asyncio.create_task(self._keep_in_progress(attempt.message, attempt.state.ack_wait / 2))
        try:
            llama_started = time.monotonic()
            try:
                completion = await asyncio.to_thread(self.llama.complete, attempt.model, job)
            except LlamaError as exc:
                return await self._failed(attempt, job, str(exc))
            result = JobResult(
                job=job,
                node=self.config.node,
                text=completion.text,
                tokens_predicted=completion.tokens_predicted,
                latency_ms=(time.monotonic() - llama_started) * 1000,
                deliveries=attempt.deliveries,
            )
            stored = await self._store_result(job, json.dumps(result.to_dict()).encode())
            if stored is not None:
                return "failed", job.id, stored
            try:
                await attempt.message.ack_sync(timeout=ACK_TIMEOUT)
            except Exception as exc:
                return (
                    "failed",
                    job.id,
                    (
                        f"result sent to {job.result_subject} but the ack was not confirmed "
                        f"({type(exc).__name__}): the job may run again after ack_wait"
                    ),
                )
            return "done", job.id, None
        finally:
            keep_alive.cancel()

    async def _store_result(self, job: Job, payload: bytes) -> str | None:
        """Publishes the result into PIFARM_RESULTS and waits for the stream's ack, retrying through a
        NATS outage; None once stored, else why not (the job is then not acked and runs again)."""
        deadline = time.monotonic() + RESULT_STORE_PATIENCE
        while True:
            try:
                await self._js.publish(
                    job.result_subject,
                    payload,
                    stream=RESULTS_STREAM,
                    # A job answered twice (a redelivery after a lost ack) is stored once.
                    headers={MSG_ID_HEADER: f"result-{job.id}"},
                    timeout=API_TIMEOUT,
                )
                return None
            except Exception as exc:
                if time.monotonic() >= deadline:
                    return (
                        f"result not stored in {RESULTS_STREAM} within {RESULT_STORE_PATIENCE:g} s "
                        f"({type(exc).__name__}: {exc}); the job runs again after ack_wait"
                    )
                await asyncio.sleep(1.0)

    async def _failed(self, attempt: Attempt, job: Job, reason: str) -> tuple[str, str, str]:
        max_deliver, deliveries = attempt.state.max_deliver, attempt.deliveries
        if 0 < max_deliver <= deliveries:
            await self._dead_letter(attempt, reason)
            return "dead", job.id, f"{reason} (delivery {deliveries} of {max_deliver})"
        backoff = self.config.backoff_seconds
        delay = backoff[min(deliveries, len(backoff)) - 1]
        await attempt.message.nak(delay=delay)
        return "retried", job.id, f"{reason}; again in {delay:g} s"

    async def _dead_letter(self, attempt: Attempt, reason: str) -> None:
        message = attempt.message
        await self._publish_dead_letter(
            attempt.model, message.data, message.metadata.sequence.stream, attempt.deliveries, reason
        )
        await message.term()

    async def _publish_dead_letter(
        self, model: WorkerModel, data: bytes, sequence: int, deliveries: int, reason: str
    ) -> None:
        letter = dead_letter(
            data, reason=reason, deliveries=deliveries, node=self.config.node, sequence=sequence
        )
        # The job's stream sequence: a dead letter sent twice (crash before term) is stored once.
        await self._js.publish(
            model.names.dead_subject,
            json.dumps(letter).encode(),
            stream=DEAD_STREAM,
            headers={MSG_ID_HEADER: f"dead-{sequence}"},
            timeout=API_TIMEOUT,
        )

    async def _on_max_deliveries(self, model: WorkerModel, advisory: Msg) -> None:
        """A job whose last delivery went unanswered (its worker died): dead-letter it, then delete it."""
        started = time.monotonic()
        job_id: str | None = None
        try:
            event = json.loads(advisory.data)
            sequence, deliveries = int(event["stream_seq"]), int(event["deliveries"])
            try:
                stored = await self._js.get_msg(JOBS_STREAM, seq=sequence)
            except NotFoundError:
                return  # Already dead-lettered and gone (another worker, or a term that raced it).
            job_id = _peek_id(stored.data)
            reason = (
                f"no answer after {deliveries} deliveries: the worker holding the last one "
                "stopped or lost NATS before it answered"
            )
            await self._publish_dead_letter(model, stored.data, sequence, deliveries, reason)
            await self._js.delete_msg(JOBS_STREAM, sequence)
        except Exception as exc:
            # The job stays in the work queue until max_age; the log says which and why.
            self.log.warning(
                "job %s model=%s: max-deliveries advisory not handled (%s: %s)",
                job_id or "?",
                model.name,
                type(exc).__name__,
                exc,
            )
            return
        self.counts["dead"] += 1
        self.metrics.jobs.labels(model.name, "dead").inc()
        self.log.warning(
            "job %s model=%s outcome=dead ms=%.0f deliveries=%d reason=%s",
            job_id or "?",
            model.name,
            (time.monotonic() - started) * 1000,
            deliveries,
            reason,
        )

    async def _keep_in_progress(self, message: Msg, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            # During an outage this fails; the ack timer then decides, as it should.
            with contextlib.suppress(Exception):
                await message.in_progress()


def _peek_id(data: bytes) -> str | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def run_worker(config: WorkerConfig) -> dict[str, Any]:
    setup_logging(config.secrets())
    return asyncio.run(Worker(config).run())
