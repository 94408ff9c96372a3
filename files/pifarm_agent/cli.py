"""Command line entry point ``pifarm-agent``.

``pifarm-agent model publish|sync|verify|activate|rollback|list|gc|remove`` manages
the model store and this node's model cache. Output is for people by default and one
JSON object on stdout with ``--json``. Exit codes:

* 0  nothing to do / done without change (also: store unreachable, cached model served)
* 1  failed (the active model is unchanged)
* 2  changed (something was published, fetched, activated, rolled back or removed)
* 64 usage error (bad flags or arguments)

``model sync NAME`` fetches, verifies and activates; ``--no-activate`` only fetches
and verifies (prefetch); ``--plan`` changes nothing and reports what the sync would
fetch and switch, with the exit code the sync would have. ``model sync --all`` does
this for every model the config declares (``models``), carries on past a model
that fails, and exits 1 if any failed, else 2 if any changed, else 0.
``model remove NAME [--version V] [--plan]`` removes one cached version or a whole model.

``pifarm-agent artifact publish|resolve|exists|sign-download|fetch --bucket B --prefix llama.cpp|agent``
handles the runtime artifacts in the store's artifacts bucket (see pifarm_agent.artifacts):
``publish FILE [--arch A] [--info JSON] [--check]`` uploads an artifact, its sha256 and the
index of an architecture (exit 2 when something was or, with ``--check``, would be written);
``resolve --name N | --arch A`` and ``exists --name N`` only read (exit 0); ``fetch --name N
--dest PATH --sha256 S`` downloads and verifies (exit 2). ``sign-download --name N``
signs, without asking the store, one GET each for an artifact and its sha256 (URL and
headers) that a host without this agent can make: the controller hands them to nodes that
install the agent itself. The
builder, the nodes and the controller run these from Ansible with ``--config /dev/stdin --json``.

``pifarm-agent job declare|worker|submit|dead`` is the job queue on NATS JetStream (see
pifarm_agent.jobs for the names and messages, pifarm_agent.worker for the worker). Its
connection settings never come from flags: ``--settings FILE`` (default: stdin) holds
``{"nats": {"servers": [...], "user": ..., "password": ...}}``, the worker's ``--config FILE``
the same ``nats`` object:

* ``declare [--check]``: the settings also hold ``models`` and the stream and consumer
  limits; creates or updates the streams and one consumer per model (exit 2 when something
  changed or, with ``--check``, would change; 0 when all is as declared);
* ``worker --config FILE``: runs until SIGTERM/SIGINT, then exits 0;
* ``submit --model M --prompt P [--chat] [--n-predict N] [--id ID] [--timeout S] [--no-wait]``:
  exit 0 with the result (or, with ``--no-wait``, the stream's ack); 1 when no result came
  within the timeout;
* ``dead --model M [--limit N]``: lists the model's dead letters (exit 0).

Configuration comes from ``/etc/pifarm/agent.json`` (or ``--config``; a missing
default file is fine, a missing explicit one is not), then flags override it. The
store credentials come only from the file or the environment variables
PIFARM_S3_ACCESS_KEY / PIFARM_S3_SECRET_KEY, never from flags (a process list
shows flags), and are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from pifarm_agent import __version__
from pifarm_agent.artifacts import PREFIXES, Artifacts
from pifarm_agent.cache import DEFAULT_KEEP, Entry, ModelCache, PlanResult, RemoveResult, SyncResult
from pifarm_agent.exporter import load_config as load_exporter_config
from pifarm_agent.exporter import serve as serve_metrics
from pifarm_agent.jobs import (
    JOB_ID_RE,
    MAX_MODEL_NAME,
    MAX_N_PREDICT,
    DeclareSettings,
    Job,
    WorkerConfig,
    connection_settings,
    dead_letters,
    declare,
    new_job_id,
    submit,
)
from pifarm_agent.manifest import FORMATS, NAME_RE, Manifest, ManifestError, parse_version, utc_now
from pifarm_agent.progress import MB
from pifarm_agent.signing import load_public_key, load_secret_key, sign_manifest, verify_manifest
from pifarm_agent.store import DEFAULT_PART_SIZE, ModelStore, StoreConfig, file_sha256, parse_endpoint
from pifarm_agent.worker import run_worker

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CHANGED = 2
EXIT_USAGE = 64
DEFAULT_CONFIG = "/etc/pifarm/agent.json"
DEFAULT_CACHE_ROOT = "/var/lib/pifarm"
ACCESS_KEY_ENV = "PIFARM_S3_ACCESS_KEY"
SECRET_KEY_ENV = "PIFARM_S3_SECRET_KEY"
PASSWORD_ENV = "PIFARM_MINISIGN_PASSWORD"


class ConfigError(Exception):
    """The configuration file or flags are incomplete or malformed."""


@dataclass
class AgentConfig:
    endpoint: str | None = None
    bucket: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = True
    ca_bundle: str | None = None
    region: str | None = None
    public_key: str | None = None
    cache_root: str = DEFAULT_CACHE_ROOT
    keep: int = DEFAULT_KEEP
    reserve_mb: int = 100
    # The models this node holds: [{"name": ..., "version": "latest" or MAJOR.MINOR.PATCH}].
    models: list[dict[str, str]] = field(default_factory=list)

    def __repr__(self) -> str:
        shown = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("access_key", "secret_key")
        }
        return f"AgentConfig({shown})"

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.access_key, self.secret_key) if s)

    def store_config(self) -> StoreConfig:
        missing = [
            name for name in ("endpoint", "bucket", "access_key", "secret_key") if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(
                f"store settings missing: {', '.join(missing)} (set them in {DEFAULT_CONFIG}; "
                f"credentials may also come from {ACCESS_KEY_ENV} and {SECRET_KEY_ENV})"
            )
        endpoint, scheme_secure = parse_endpoint(self.endpoint)
        return StoreConfig(
            endpoint=endpoint,
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure if scheme_secure is None else scheme_secure,
            ca_bundle=self.ca_bundle,
            region=self.region,
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "secure": (bool,),
    "keep": (int,),
    "reserve_mb": (int,),
    "models": (list,),
}
LATEST = "latest"
MODEL_KEYS = ("name", "version")


def parse_models(value: list[Any], where: str) -> list[dict[str, str]]:
    """The ``models`` key: a list of {"name", "version"}; errors name the index and the key."""
    models: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        label = f"{where}: models[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(
                f"{label} must be an object with keys name and version, got {type(item).__name__}"
            )
        for key in item:
            if key not in MODEL_KEYS:
                raise ConfigError(f"{label}: unknown key {key!r:.40} (allowed: name, version)")
        name = item.get("name")
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise ConfigError(f"{label}.name: {name!r:.80} is not a model name ([a-z0-9][a-z0-9._-]{{0,63}})")
        version = item.get("version", LATEST)
        if not isinstance(version, str):
            raise ConfigError(f"{label}.version: must be a string, got {type(version).__name__}")
        if version != LATEST:
            try:
                parse_version(version)
            except ManifestError as exc:
                raise ConfigError(f'{label}.version: {exc.problem}, or "latest"') from None
        if name in seen:
            raise ConfigError(f"{label}.name: model {name} is already declared at models[{seen[name]}]")
        seen[name] = index
        models.append({"name": name, "version": version})
    return models


def load_config(path: str | None) -> AgentConfig:
    """Read the JSON config; unknown keys and wrong types are errors naming the key."""
    explicit = path is not None
    path = path or os.environ.get("PIFARM_AGENT_CONFIG") or DEFAULT_CONFIG
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path}: not found") from None
        raw = "{}"
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"config file {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a JSON object")
    known = {f.name for f in fields(AgentConfig)}
    config = AgentConfig()
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        types = _TYPES.get(key, (str,))
        if value is not None and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            raise ConfigError(f"config file {path}: key {key!r} must be {types[0].__name__}")
        if key == "models":
            setattr(config, key, parse_models(value or [], f"config file {path}"))
        else:
            setattr(config, key, value)
    config.access_key = os.environ.get(ACCESS_KEY_ENV) or config.access_key
    config.secret_key = os.environ.get(SECRET_KEY_ENV) or config.secret_key
    return config


def apply_flags(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    for name in ("endpoint", "bucket", "secure", "ca_bundle", "region", "public_key", "cache_root", "keep"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if getattr(args, "reserve_mb", None) is not None:
        config.reserve_mb = args.reserve_mb
    if config.keep < 1:
        raise ConfigError(f"keep must be at least 1, got {config.keep}")
    return config


# -- parser ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(*, artifacts: bool = False) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("configuration (flags override the config file)")
    group.add_argument(
        "--config",
        help=f"JSON config file (default {DEFAULT_CONFIG}, or $PIFARM_AGENT_CONFIG; /dev/stdin works)",
    )
    group.add_argument("--endpoint", help="store endpoint, host:port or http(s)://host:port")
    if not artifacts:
        group.add_argument("--bucket", help="store bucket")
    group.add_argument("--secure", action=argparse.BooleanOptionalAction, default=None, help="use HTTPS")
    group.add_argument("--ca-bundle", help="CA bundle that signs the store's certificate")
    group.add_argument("--region", help="store region (S3)")
    if not artifacts:
        group.add_argument("--public-key", help="minisign public key trusted for model manifests")
        group.add_argument(
            "--cache-root", help=f"cache root; models live in <root>/models (default {DEFAULT_CACHE_ROOT})"
        )
        group.add_argument(
            "--reserve-mb", type=int, help="free space (MB) a download must leave (default 100)"
        )
    group.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if artifacts:
        where = common.add_argument_group("artifacts")
        # The config file's bucket is the models bucket: the artifacts bucket is always named.
        where.add_argument("--bucket", required=True, help="the store's artifacts bucket")
        where.add_argument("--prefix", required=True, choices=PREFIXES, help="the kind of artifact")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pifarm-agent", description="pifarm node agent")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Also accepted before the area (``pifarm-agent --json model sync ...``).
    parser.add_argument("--json", dest="json_first", action="store_true", help=argparse.SUPPRESS)
    top = parser.add_subparsers(dest="area", metavar="AREA", parser_class=_Parser)
    model = top.add_parser("model", help="model store and cache")
    commands = model.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    common = _common()

    publish = commands.add_parser("publish", parents=[common], help="sign and upload a model to the store")
    publish.add_argument("file", help="the model file")
    publish.add_argument("--name", required=True)
    publish.add_argument("--version", dest="model_version", required=True, help="MAJOR.MINOR.PATCH")
    publish.add_argument("--format", choices=FORMATS, default="gguf")
    publish.add_argument("--quantization", required=True, help="e.g. Q4_K_M")
    publish.add_argument("--context-length", type=int, required=True)
    publish.add_argument("--memory-required-mb", type=int, required=True)
    publish.add_argument("--npu-required", action="store_true")
    publish.add_argument("--created", help="RFC 3339 UTC time (default: now)")
    publish.add_argument(
        "--secret-key", required=True, help=f"minisign secret key (password in ${PASSWORD_ENV})"
    )
    publish.add_argument("--part-size-mb", type=int, default=DEFAULT_PART_SIZE // (1024 * 1024))

    sync = commands.add_parser("sync", parents=[common], help="fetch, verify and activate a model")
    which = sync.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="the model")
    which.add_argument("--all", action="store_true", help="every model the config declares (models)")
    sync.add_argument("--version", dest="model_version", help="a version (default: the newest in the store)")
    sync.add_argument("--allow-downgrade", action="store_true", help="accept a version older than the active")
    sync.add_argument(
        "--no-activate",
        dest="activate",
        action="store_false",
        help="fetch and verify into the cache, leave current as it is",
    )
    sync.add_argument(
        "--plan", action="store_true", help="change nothing; report what would be fetched and switched"
    )

    verify = commands.add_parser("verify", parents=[common], help="re-check cached models fully")
    verify.add_argument("name")
    verify.add_argument("--all", action="store_true", help="every cached version, not only current")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="fetch a corrupt version again from the store (current stays what it is); exit 2 when repaired",
    )

    activate = commands.add_parser("activate", parents=[common], help="make a cached version current")
    activate.add_argument("name")
    activate.add_argument("ref", help="version or sha256 (prefix of 8+)")
    activate.add_argument("--allow-downgrade", action="store_true")

    rollback = commands.add_parser("rollback", parents=[common], help="swap current and previous")
    rollback.add_argument("name")

    listing = commands.add_parser(
        "list", parents=[common], help="cached (or, with --remote, published) models"
    )
    listing.add_argument("name", nargs="?")
    listing.add_argument("--remote", action="store_true", help="list the store instead of the cache")

    remove = commands.add_parser("remove", parents=[common], help="remove a cached version or a whole model")
    remove.add_argument("name")
    remove.add_argument(
        "--version", dest="model_version", help="one version (default: the whole model, links and all)"
    )
    remove.add_argument("--plan", action="store_true", help="change nothing; report what would be removed")

    gc = commands.add_parser("gc", parents=[common], help="remove old cached versions")
    gc.add_argument("name", nargs="?", help="one model (default: all)")
    gc.add_argument(
        "--keep", type=int, help=f"versions kept, current and previous always (default {DEFAULT_KEEP})"
    )
    _artifact_parsers(top)
    _job_parsers(top)
    return parser


def _artifact_parsers(top: argparse._SubParsersAction) -> None:
    artifact = top.add_parser("artifact", help="runtime artifacts (llama.cpp, the agent's wheelhouse)")
    commands = artifact.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    common = _common(artifacts=True)

    publish = commands.add_parser(
        "publish", parents=[common], help="upload an artifact, its sha256 and the index"
    )
    publish.add_argument("file", type=Path, help="the artifact, <name>.tar.gz")
    publish.add_argument("--arch", help="also point <prefix>/<arch>.json at this artifact")
    publish.add_argument("--info", default="{}", help="JSON object of extra index fields (BUILDINFO)")
    publish.add_argument("--check", action="store_true", help="change nothing; report what would change")

    resolve = commands.add_parser(
        "resolve", parents=[common], help="name and sha256 of the artifact to install"
    )
    which = resolve.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", help="a published artifact")
    which.add_argument("--arch", help="the artifact the index of this architecture names")

    exists = commands.add_parser(
        "exists", parents=[common], help="whether a name is published, and its sha256"
    )
    exists.add_argument("--name", required=True)

    sign = commands.add_parser(
        "sign-download", parents=[common], help="signed GETs of an artifact and its sha256, made offline"
    )
    sign.add_argument("--name", required=True)

    fetch = commands.add_parser("fetch", parents=[common], help="download and verify an artifact")
    fetch.add_argument("--name", required=True)
    fetch.add_argument("--dest", required=True, type=Path, help="where the verified artifact goes")
    fetch.add_argument("--sha256", required=True, help="the expected sha256; a mismatch fails")


def _job_parsers(top: argparse._SubParsersAction) -> None:
    job = top.add_parser("job", help="the job queue (NATS JetStream): declare, worker, submit, dead")
    commands = job.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    settings = _Parser(add_help=False)
    settings.add_argument(
        "--settings",
        default="-",
        help='JSON settings file with {"nats": {"servers", "user", "password"}, ...}; - (default) is stdin',
    )

    declare = commands.add_parser(
        "declare", parents=[output, settings], help="create or update the streams and one consumer per model"
    )
    declare.add_argument("--check", action="store_true", help="change nothing; report what would change")

    worker = commands.add_parser("worker", parents=[output], help="run jobs on the local llama-server")
    worker.add_argument("--config", required=True, help="the worker's JSON config file")

    submit = commands.add_parser(
        "submit", parents=[output, settings], help="enqueue a job, wait for its result"
    )
    submit.add_argument("--model", required=True)
    submit.add_argument("--prompt", required=True)
    submit.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message, through the chat template"
    )
    submit.add_argument("--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    submit.add_argument("--id", dest="job_id", help="the job id, also its dedup key (default: a new UUID)")
    submit.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the result (default 120)"
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="only enqueue; print the id and the stream's ack"
    )

    dead = commands.add_parser("dead", parents=[output, settings], help="list the dead letters of a model")
    dead.add_argument("--model", required=True)
    dead.add_argument("--limit", type=int, default=100, help="at most this many, oldest first (default 100)")

    exporter = top.add_parser("exporter", help="the farm exporter: Pi health, services, models (Prometheus)")
    commands = exporter.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    serve_parser = commands.add_parser("serve", parents=[output], help="serve /metrics until stopped")
    serve_parser.add_argument("--config", required=True, help="the exporter's JSON config file")


# -- commands ----------------------------------------------------------------------------


def _cache(config: AgentConfig, *, need_key: bool = True) -> ModelCache:
    if need_key and not config.public_key:
        raise ConfigError("public_key is not set (config file or --public-key)")
    public_key = load_public_key(config.public_key) if need_key else None
    return ModelCache(config.cache_root, public_key, reserve_bytes=config.reserve_mb * MB)


def cmd_publish(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"model file {path}: not a file")
    manifest = Manifest(
        name=args.name,
        version=args.model_version,
        format=args.format,
        quantization=args.quantization,
        size=path.stat().st_size,
        sha256=file_sha256(path),
        context_length=args.context_length,
        memory_required_mb=args.memory_required_mb,
        npu_required=args.npu_required or args.format == "hef",
        created=args.created or utc_now(),
    )
    manifest_bytes = manifest.to_json()
    secret_key = load_secret_key(args.secret_key, os.environ.get(PASSWORD_ENV))
    try:
        signature_bytes = sign_manifest(manifest_bytes, secret_key)
    finally:
        secret_key.wipe()
    if config.public_key:
        # Catch a key mismatch here rather than on every node.
        verify_manifest(manifest_bytes, signature_bytes, load_public_key(config.public_key))
    store = ModelStore(config.store_config())
    result = store.publish(path, manifest_bytes, signature_bytes, part_size=args.part_size_mb * 1024 * 1024)
    verb = "published" if result.changed else "already published"
    payload = {
        "status": result.status,
        "changed": result.changed,
        "message": f"model {manifest.name} {manifest.version} ({manifest.sha256[:12]}) {verb}",
        "manifest": result.manifest.to_dict(),
        "keys": list(result.keys),
    }
    return (EXIT_CHANGED if result.changed else EXIT_OK), payload


def _version_sha(item: Entry | Manifest | None) -> dict[str, str] | None:
    return {"version": item.version, "sha256": item.sha256} if item is not None else None


def sync_payload(result: SyncResult) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "status": result.status,
        "changed": result.changed,
        "message": result.message,
        "plan": False,
        "name": result.name,
        "version": result.version,
        "sha256": result.sha256,
        "activate": result.activate,
        "switched": result.switched,
        "current": _dict(result.current),
        "previous": _dict(result.previous),
        "from": _version_sha(result.before),
        "to": {"version": result.version, "sha256": result.sha256} if result.sha256 else None,
        "bytes_fetched": result.bytes_fetched,
        "resumed_from": result.resumed_from,
        "verify_seconds": round(result.verify_seconds, 3),
        "seconds": round(result.seconds, 3),
    }
    payload.update(result.extra)
    return payload


def plan_payload(result: PlanResult) -> dict[str, Any]:
    """What a sync would do; ``changed`` and ``status`` are the ones the sync would report."""
    payload: dict[str, Any] = {
        "status": result.status,
        "changed": result.changed,
        "message": result.message,
        "plan": True,
        "name": result.name,
        "version": result.target.version if result.target else None,
        "sha256": result.target.sha256 if result.target else None,
        "activate": result.activate,
        "current": _dict(result.current),
        "previous": _dict(result.previous),
        "from": _version_sha(result.current),
        "to": _version_sha(result.target),
        "would_fetch_bytes": result.would_fetch_bytes,
        "resumed_from": result.resumed_from,
        "would_switch": result.would_switch,
        "bytes_fetched": 0,
        "verify_seconds": round(result.verify_seconds, 3),
        "seconds": round(result.seconds, 3),
    }
    payload.update(result.extra)
    return payload


def _sync_one(
    cache: ModelCache, store: ModelStore, name: str, version: str | None, args: argparse.Namespace
) -> tuple[int, dict[str, Any]]:
    options = {"activate": args.activate, "allow_downgrade": args.allow_downgrade}
    if args.plan:
        plan = cache.plan(store, name, version, **options)
        return (EXIT_CHANGED if plan.changed else EXIT_OK), plan_payload(plan)
    result = cache.sync(store, name, version, **options)
    return (EXIT_CHANGED if result.changed else EXIT_OK), sync_payload(result)


def cmd_sync(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    if args.all:
        return sync_all(config, args)
    cache = _cache(config)
    store = ModelStore(config.store_config())
    return _sync_one(cache, store, args.name, args.model_version, args)


def sync_all(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Sync every declared model; one model's failure does not stop the others."""
    if not config.models:
        return EXIT_OK, {
            "status": "unchanged",
            "changed": False,
            "message": "no models declared (the config file's models key is empty or absent)",
            "plan": args.plan,
            "models": [],
            "failed": [],
        }
    cache = _cache(config)
    store = ModelStore(config.store_config())
    results = []
    for declared in config.models:
        version = None if declared["version"] == LATEST else declared["version"]
        try:
            code, payload = _sync_one(cache, store, declared["name"], version, args)
        except Exception as exc:
            code, payload = EXIT_FAILED, {"name": declared["name"], **_failure(exc)}
        results.append({**payload, "requested_version": declared["version"], "exit_code": code})
    failed = [r["name"] for r in results if r["status"] == "failed"]
    changed = any(r["changed"] for r in results)
    code = EXIT_FAILED if failed else EXIT_CHANGED if changed else EXIT_OK
    lines = [f"{r['name']}: {r['message']}" for r in results]
    if failed:
        lines.append(f"{len(failed)} of {len(results)} models failed: {', '.join(failed)}")
    return code, {
        "status": "failed" if failed else "changed" if changed else "unchanged",
        "changed": changed,
        "message": "\n".join(lines),
        "plan": args.plan,
        "models": results,
        "failed": failed,
    }


def cmd_remove(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cache = _cache(config, need_key=False)
    result: RemoveResult = cache.remove(args.name, args.model_version, plan=args.plan)
    payload = {
        "status": "changed" if result.changed else "unchanged",
        "changed": result.changed,
        "message": result.message,
        "plan": result.plan,
        "name": result.name,
        "version": result.version,
        "removed": [entry.to_dict() for entry in result.removed],
        "removed_partials": [{"path": str(path), "bytes": size} for path, size in result.partials],
        "removed_links": result.links,
        "from": _version_sha(result.before),
        "current": _dict(cache.current(args.name)),
        "previous": _dict(cache.previous(args.name)),
    }
    return (EXIT_CHANGED if result.changed else EXIT_OK), payload


def cmd_verify(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cache = _cache(config)
    current = cache.current(args.name)
    targets = cache.entries(args.name) if args.all else [current] if current else []
    if not targets:
        raise ConfigError(f"model {args.name}: nothing cached to verify in {cache.model_dir(args.name)}")
    verified, failures, repaired = [], [], []
    for entry in targets:
        try:
            cache.verify_entry(entry)
            verified.append(entry.to_dict())
        except Exception as exc:
            failure = {"sha256": entry.sha256, "version": entry.version, "error": str(exc)}
            if args.repair and _repair(config, cache, args.name, entry, failure):
                repaired.append(failure)
                verified.append(entry.to_dict())
            else:
                failures.append(failure)
    ok = not failures
    message = f"model {args.name}: {len(verified)} verified" + (
        f", {len(failures)} FAILED" if failures else ""
    )
    for failure in failures:
        message += f"\n  {failure['version']} {failure['sha256'][:12]}: {failure['error']}"
        if "repair" in failure:
            message += f"; no good copy from the store: {failure['repair']}"
    for failure in repaired:
        message += (
            f"\n  {failure['version']} {failure['sha256'][:12]}: repaired from the store ({failure['error']})"
        )
    payload = {
        "status": "failed" if not ok else "repaired" if repaired else "verified",
        "changed": bool(repaired),
        "message": message,
        "verified": verified,
        "failures": failures,
        "repaired": repaired,
    }
    return (EXIT_FAILED if not ok else EXIT_CHANGED if repaired else EXIT_OK), payload


def _repair(config: AgentConfig, cache: ModelCache, name: str, entry: Entry, failure: dict[str, Any]) -> bool:
    """Fetch a corrupt cached version again (the sync's own repair); False, with the reason added to
    ``failure``, when the store cannot give a good copy."""
    try:
        result = cache.sync(ModelStore(config.store_config()), name, entry.version, activate=False)
        cache.verify_entry(cache.entry(name, entry.sha256))
    except Exception as exc:
        failure["repair"] = str(exc)
        return False
    return result.changed


def cmd_activate(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cache = _cache(config)
    before = cache.current(args.name)
    changed, entry = cache.activate(args.name, args.ref, allow_downgrade=args.allow_downgrade)
    verb = "activated" if changed else "already active"
    return (EXIT_CHANGED if changed else EXIT_OK), {
        "status": "changed" if changed else "unchanged",
        "changed": changed,
        "message": f"model {args.name} {entry.version} ({entry.sha256[:12]}) {verb}",
        "version": entry.version,
        "sha256": entry.sha256,
        "from": _version_sha(before),
        "current": entry.to_dict(),
        "previous": _dict(cache.previous(args.name)),
    }


def cmd_rollback(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cache = _cache(config)
    entry = cache.rollback(args.name)
    return EXIT_CHANGED, {
        "status": "changed",
        "changed": True,
        "message": f"model {args.name} rolled back to {entry.version} ({entry.sha256[:12]})",
        "current": entry.to_dict(),
        "previous": _dict(cache.previous(args.name)),
    }


def _dict(entry: Any) -> dict[str, Any] | None:
    return entry.to_dict() if entry is not None else None


def cmd_list(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    if args.remote:
        store = ModelStore(config.store_config())
        names = [args.name] if args.name else store.list_names()
        models = {name: store.list_versions(name) for name in names}
        lines = [f"{name}: {', '.join(versions) or '(none)'}" for name, versions in models.items()]
        return EXIT_OK, {"status": "ok", "changed": False, "message": "\n".join(lines), "store": models}
    cache = _cache(config, need_key=False)
    names = [args.name] if args.name else cache.names()
    models: dict[str, Any] = {}
    lines = []
    for name in names:
        current, previous = cache.current(name), cache.previous(name)
        rows = []
        lines.append(name)
        for entry in cache.entries(name):
            role = "current" if current and entry.sha256 == current.sha256 else None
            role = role or ("previous" if previous and entry.sha256 == previous.sha256 else None)
            rows.append({**entry.to_dict(), "role": role})
            marker = "*" if role == "current" else " "
            size = f"{entry.manifest.size / MB:8.1f} MB"
            lines.append(f"  {marker} {entry.version:<10} {entry.sha256[:12]}  {size}  {role or ''}".rstrip())
        partials = [{"path": str(p), "bytes": p.stat().st_size} for p in cache.partials(name)]
        lines.extend(f"    partial {p['path']} ({p['bytes'] / MB:.1f} MB)" for p in partials)
        models[name] = {"entries": rows, "partials": partials}
    return EXIT_OK, {"status": "ok", "changed": False, "message": "\n".join(lines), "cache": models}


def cmd_gc(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    cache = _cache(config, need_key=False)
    names = [args.name] if args.name else cache.names()
    removed = {name: [entry.to_dict() for entry in cache.gc(name, config.keep)] for name in names}
    count = sum(len(entries) for entries in removed.values())
    lines = [
        f"removed {name} {e['version']} ({e['sha256'][:12]})" for name, es in removed.items() for e in es
    ]
    payload = {
        "status": "changed" if count else "unchanged",
        "changed": bool(count),
        "message": "\n".join(lines) or f"nothing to remove (keep {config.keep})",
        "removed": removed,
    }
    return (EXIT_CHANGED if count else EXIT_OK), payload


# -- artifact commands -------------------------------------------------------------------


def _artifacts(config: AgentConfig) -> Artifacts:
    return Artifacts(ModelStore(config.store_config()))


def cmd_artifact_publish(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    if not args.file.is_file():
        raise ConfigError(f"artifact file {args.file}: not a file")
    try:
        info = json.loads(args.info)
    except ValueError as exc:
        raise ConfigError(f"--info is not JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"--info must be a JSON object, got {type(info).__name__}")
    result = _artifacts(config).publish(args.prefix, args.file, arch=args.arch, info=info, check=args.check)
    would = "would be " if result.check else ""
    verb = f"{would}uploaded" if result.uploaded else "already published"
    message = f"artifact {result.key} ({result.sha256[:12]}) {verb}"
    if result.index_changed:
        message += f"; {result.index} {'would point' if result.check else 'now points'} at it"
    payload = {
        "status": "changed" if result.changed else "unchanged",
        "changed": result.changed,
        "message": message,
        "check": result.check,
        "name": result.name,
        "key": result.key,
        "sha256": result.sha256,
        "size": result.size,
        "uploaded": result.uploaded,
        "index": result.index,
        "index_changed": result.index_changed,
    }
    return (EXIT_CHANGED if result.changed else EXIT_OK), payload


def cmd_artifact_resolve(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    result = _artifacts(config).resolve(args.prefix, name=args.name, arch=args.arch)
    source = f" (the index of {args.arch})" if args.arch else ""
    return EXIT_OK, {
        "status": "ok",
        "changed": False,
        "message": f"artifact {result.key}{source}: sha256 {result.sha256}",
        "name": result.name,
        "key": result.key,
        "sha256": result.sha256,
    }


def cmd_artifact_exists(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    artifacts = _artifacts(config)
    sha256 = artifacts.published_sha256(args.prefix, args.name)
    where = f"{args.prefix}/{args.name} in {artifacts.where}"
    return EXIT_OK, {
        "status": "ok",
        "changed": False,
        "message": f"{where}: sha256 {sha256}" if sha256 else f"{where}: not published",
        "name": args.name,
        "published": sha256 is not None,
        "sha256": sha256,
    }


def cmd_artifact_sign_download(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    result = _artifacts(config).sign_download(args.prefix, args.name)
    return EXIT_OK, {
        "status": "ok",
        "changed": False,
        "message": f"signed GET requests for {result.key} and its sha256 (valid for the store's clock skew)",
        "name": result.name,
        "key": result.key,
        "url": result.url,
        "headers": result.headers,
        "sha256_url": result.sha256_url,
        "sha256_headers": result.sha256_headers,
    }


def cmd_artifact_fetch(config: AgentConfig, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    result = _artifacts(config).fetch(args.prefix, args.name, args.dest, args.sha256)
    return EXIT_CHANGED, {
        "status": "changed",
        "changed": True,
        "message": f"artifact {result.key} fetched to {result.path}, sha256 {result.sha256} verified",
        "name": result.name,
        "key": result.key,
        "sha256": result.sha256,
        "size": result.size,
        "path": str(result.path),
    }


# -- job commands ------------------------------------------------------------------------


def _job_settings(path: str) -> Any:
    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ConfigError("settings: expected JSON on stdin (or --settings FILE)")
        where, text = "settings on stdin", sys.stdin.read()
    else:
        where = f"settings file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not JSON ({exc})") from None


def cmd_job_declare(args: argparse.Namespace, secrets: list[str]) -> tuple[int, dict[str, Any]]:
    settings = DeclareSettings.parse(_job_settings(args.settings))
    secrets.extend(settings.nats.secrets())
    payload = asyncio.run(declare(settings, check=args.check))
    return (EXIT_CHANGED if payload["changed"] else EXIT_OK), payload


def cmd_job_worker(args: argparse.Namespace, secrets: list[str]) -> tuple[int, dict[str, Any]]:
    path = Path(args.config)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"worker config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"worker config {path}: not JSON ({exc})") from None
    config = WorkerConfig.parse(data, f"worker config {path}")
    secrets.extend(config.secrets())
    return EXIT_OK, run_worker(config)


def cmd_job_submit(args: argparse.Namespace, secrets: list[str]) -> tuple[int, dict[str, Any]]:
    settings = connection_settings(_job_settings(args.settings))
    secrets.extend(settings.secrets())
    job = Job(
        id=args.job_id or new_job_id(),
        model=args.model,
        prompt="" if args.chat else args.prompt,
        n_predict=args.n_predict,
        messages=(("user", args.prompt),) if args.chat else None,
    )
    payload = asyncio.run(submit(settings, job, wait=not args.no_wait, timeout=args.timeout))
    return EXIT_OK, {"status": "queued" if args.no_wait else "answered", "changed": False, **payload}


def cmd_job_dead(args: argparse.Namespace, secrets: list[str]) -> tuple[int, dict[str, Any]]:
    settings = connection_settings(_job_settings(args.settings))
    secrets.extend(settings.secrets())
    payload = asyncio.run(dead_letters(settings, args.model, limit=args.limit))
    return EXIT_OK, {"status": "ok", "changed": False, **payload}


JOB_COMMANDS = {
    "declare": cmd_job_declare,
    "worker": cmd_job_worker,
    "submit": cmd_job_submit,
    "dead": cmd_job_dead,
}


def _check_job_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "submit":
        if args.job_id is not None and not JOB_ID_RE.fullmatch(args.job_id):
            parser.error("job submit: --id must be 1-128 characters of [A-Za-z0-9_-] (it becomes a subject)")
        if not 1 <= args.n_predict <= MAX_N_PREDICT:
            parser.error(f"job submit: --n-predict must be from 1 to {MAX_N_PREDICT}")
        if args.timeout <= 0:
            parser.error("job submit: --timeout must be > 0 seconds")
        if not args.prompt:
            parser.error("job submit: --prompt must not be empty")
    if args.command == "dead" and args.limit < 1:
        parser.error("job dead: --limit must be at least 1")
    model = getattr(args, "model", None)
    if model is not None and (not model or len(model) > MAX_MODEL_NAME or any(c.isspace() for c in model)):
        parser.error(f"job {args.command}: --model must be 1-{MAX_MODEL_NAME} characters, no spaces")


def cmd_exporter_serve(args: argparse.Namespace, secrets: list[str]) -> tuple[int, dict[str, Any]]:
    config = load_exporter_config(args.config)
    serve_metrics(config)
    return EXIT_OK, {"status": "stopped", "changed": False, "message": f"exporter of {config.node} stopped"}


EXPORTER_COMMANDS = {"serve": cmd_exporter_serve}


def run_job_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """A job or exporter command: each reads its own settings, not the agent's config file."""
    if args.area == "job":
        _check_job_flags(parser, args)
    commands = JOB_COMMANDS if args.area == "job" else EXPORTER_COMMANDS
    secrets: list[str] = []
    try:
        code, payload = commands[args.command](args, secrets)
    except Exception as exc:
        code, payload = EXIT_FAILED, _failure(exc)
    _emit(args, code, payload, tuple(secrets))
    return code


COMMANDS = {
    "model": {
        "publish": cmd_publish,
        "sync": cmd_sync,
        "verify": cmd_verify,
        "activate": cmd_activate,
        "rollback": cmd_rollback,
        "list": cmd_list,
        "gc": cmd_gc,
        "remove": cmd_remove,
    },
    "artifact": {
        "publish": cmd_artifact_publish,
        "resolve": cmd_artifact_resolve,
        "exists": cmd_artifact_exists,
        "sign-download": cmd_artifact_sign_download,
        "fetch": cmd_artifact_fetch,
    },
}


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _emit(args: argparse.Namespace, code: int, payload: dict[str, Any], secrets: tuple[str, ...]) -> None:
    payload = {"command": args.command, **payload}
    if args.json:
        print(_redact(json.dumps(payload, sort_keys=True), secrets))
        return
    stream = sys.stderr if code == EXIT_FAILED else sys.stdout
    prefix = f"pifarm-agent {args.area} {args.command}: error: " if code == EXIT_FAILED else ""
    print(_redact(prefix + payload["message"], secrets), file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.area is None:
        parser.print_help()
        return EXIT_OK
    args.json = args.json or args.json_first
    if args.area in ("job", "exporter"):
        return run_job_command(parser, args)
    if args.area == "model" and args.command == "sync" and args.all and args.model_version:
        parser.error("model sync: --version is for one model; --all syncs the versions the config declares")
    secrets: tuple[str, ...] = ()
    try:
        config = apply_flags(load_config(args.config), args)
        secrets = config.secrets()
        if (args.area, args.command) == ("artifact", "sign-download"):
            # A signed request names the access key's id by design (Credential=...); the
            # secret key, which signs it, never leaves.
            secrets = tuple(secret for secret in secrets if secret != config.access_key)
        code, payload = COMMANDS[args.area][args.command](config, args)
    except Exception as exc:
        # Every failure is reported, never a traceback with what the frames held.
        code, payload = EXIT_FAILED, _failure(exc)
    _emit(args, code, payload, secrets)
    return code


def _failure(exc: BaseException) -> dict[str, Any]:
    return {
        "status": "failed",
        "changed": False,
        "message": str(exc),
        "error": {"type": type(exc).__name__, "message": str(exc)},
    }


if __name__ == "__main__":
    sys.exit(main())
