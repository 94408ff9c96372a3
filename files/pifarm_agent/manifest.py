"""The model manifest: the one description of a published model artifact.

A manifest is a JSON object with exactly these keys (schema 1)::

    {
      "schema": 1,
      "name": "gemma3-270m",                 # [a-z0-9][a-z0-9._-]{0,63}
      "version": "1.0.0",                    # MAJOR.MINOR.PATCH, decimal, no leading zeros
      "format": "gguf",                      # "gguf" (llama.cpp) or "hef" (Hailo NPU)
      "quantization": "Q4_K_M",              # [A-Za-z0-9_.+-]{1,32}
      "size": 253113344,                     # bytes of the model file, > 0
      "sha256": "a5fd...",                   # 64 lowercase hex digits of the model file
      "context_length": 32768,               # tokens, > 0
      "memory_required_mb": 512,             # RAM (MiB) the runtime needs to load it, > 0
      "npu_required": false,                 # true for NPU-only models (format "hef")
      "created": "2026-03-01T12:00:00Z"      # RFC 3339, UTC, whole seconds
    }

Unknown keys are refused: everything a node acts on is covered by the signature
and checked here. Every error is a :class:`ManifestError` naming the field.

Versions compare as tuples of three integers (``1.10.0`` > ``1.9.3``). There are
no pre-release or build suffixes: a version is a directory name in the store and
part of the signed trusted comment, so it stays a plain dotted triple.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

SCHEMA = 1
FORMATS = ("gguf", "hef")
MODEL_FILENAMES = {"gguf": "model.gguf", "hef": "model.hef"}

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")
QUANTIZATION_RE = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CREATED_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
# A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES = 64 * 1024
FIELDS = (
    "schema",
    "name",
    "version",
    "format",
    "quantization",
    "size",
    "sha256",
    "context_length",
    "memory_required_mb",
    "npu_required",
    "created",
)


class ManifestError(ValueError):
    """A manifest is malformed; ``field`` names the offending key (``"manifest"`` for the whole)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"manifest field {field!r}: {problem}")
        self.field = field
        self.problem = problem


def parse_version(value: str, field: str = "version") -> tuple[int, int, int]:
    """``"1.10.0"`` -> ``(1, 10, 0)``; raises ManifestError naming ``field`` otherwise."""
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string like 1.0.0, got {type(value).__name__}")
    match = VERSION_RE.fullmatch(value)
    if match is None:
        raise ManifestError(field, f"{value[:40]!r} is not MAJOR.MINOR.PATCH (decimal, no leading zeros)")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def utc_now() -> str:
    """The current time in the manifest's ``created`` format."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    format: str
    quantization: str
    size: int
    sha256: str
    context_length: int
    memory_required_mb: int
    npu_required: bool
    created: str
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        validate(asdict(self))

    @property
    def version_key(self) -> tuple[int, int, int]:
        return parse_version(self.version)

    @property
    def model_filename(self) -> str:
        return MODEL_FILENAMES[self.format]

    def to_dict(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in FIELDS}

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces, trailing newline): what gets signed and stored."""
        return (json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        validate(data)
        return cls(**{field: data[field] for field in FIELDS})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        return cls.from_dict(_decode(raw))


def _decode(raw: bytes | str) -> Any:
    if not isinstance(raw, bytes | str):
        raise ManifestError("manifest", f"must be bytes or text, got {type(raw).__name__}")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest", f"is {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError("manifest", f"is not JSON: {exc}") from None


def _require_int(data: dict[str, Any], field: str, minimum: int) -> None:
    value = data[field]
    # bool is an int subclass; true is not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(field, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ManifestError(field, f"must be at least {minimum}, got {value}")


def _require_match(data: dict[str, Any], field: str, pattern: re.Pattern[str], shape: str) -> None:
    value = data[field]
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string, got {type(value).__name__}")
    if pattern.fullmatch(value) is None:
        raise ManifestError(field, f"{value[:80]!r} is not {shape}")


def validate(data: Any) -> None:
    """Raise ManifestError naming the first field that is missing, unknown or malformed."""
    if not isinstance(data, dict):
        raise ManifestError("manifest", f"must be a JSON object, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            shown = key[:40] if isinstance(key, str) else repr(key)
            raise ManifestError(shown, "is not a manifest field (unknown key)")
    for field in FIELDS:
        if field not in data:
            raise ManifestError(field, "is missing")
    schema = data["schema"]
    if isinstance(schema, bool) or schema != SCHEMA:
        raise ManifestError("schema", f"must be {SCHEMA}, got {schema!r:.40}")
    _require_match(data, "name", NAME_RE, "a model name ([a-z0-9][a-z0-9._-]{0,63})")
    parse_version(data["version"])
    if data["format"] not in FORMATS:
        raise ManifestError("format", f"must be one of {', '.join(FORMATS)}, got {data['format']!r:.40}")
    _require_match(data, "quantization", QUANTIZATION_RE, "a quantization tag like Q4_K_M")
    _require_int(data, "size", 1)
    _require_match(data, "sha256", SHA256_RE, "64 lowercase hex digits")
    _require_int(data, "context_length", 1)
    _require_int(data, "memory_required_mb", 1)
    if not isinstance(data["npu_required"], bool):
        raise ManifestError(
            "npu_required", f"must be true or false, got {type(data['npu_required']).__name__}"
        )
    if data["format"] == "hef" and not data["npu_required"]:
        raise ManifestError("npu_required", "must be true for a hef (NPU) model")
    _require_match(data, "created", CREATED_RE, "an RFC 3339 UTC time like 2026-03-01T12:00:00Z")
    try:
        datetime.strptime(data["created"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ManifestError("created", f"{data['created']!r} is not a valid date and time") from None
