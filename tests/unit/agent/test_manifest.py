"""The manifest schema: valid manifests round-trip, anything else is a ManifestError naming a field."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from agent_helpers import make_manifest
from hypothesis import given, settings
from hypothesis import strategies as st

from pifarm_agent.manifest import FIELDS, Manifest, ManifestError, parse_version

VALID = make_manifest(b"model bytes").to_dict()

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
versions = st.tuples(*[st.integers(0, 10**6)] * 3).map(lambda t: ".".join(map(str, t)))
manifests = st.builds(
    Manifest,
    name=names,
    version=versions,
    format=st.just("gguf"),
    quantization=st.from_regex(r"[A-Za-z0-9_.+-]{1,32}", fullmatch=True),
    size=st.integers(1, 2**45),
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    context_length=st.integers(1, 2**20),
    memory_required_mb=st.integers(1, 2**20),
    npu_required=st.booleans(),
    created=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(manifests)
def test_valid_manifests_round_trip_through_their_canonical_json(manifest):
    raw = manifest.to_json()
    assert Manifest.from_json(raw) == manifest
    assert Manifest.from_json(raw).to_json() == raw


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_random_bytes_raise_only_manifest_error(raw):
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(raw)
    assert error.value.field


@given(json_values)
def test_random_json_raises_only_manifest_error(value):
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(json.dumps(value))
    named = error.value.field
    assert named in (*FIELDS, "manifest") or (isinstance(value, dict) and named in {k[:40] for k in value})


@settings(max_examples=300)
@given(st.sampled_from(FIELDS), json_values)
def test_one_bad_field_is_named_in_the_error(field, value):
    data = dict(VALID, **{field: value})
    outcome = _parse(data)
    if isinstance(outcome, ManifestError):
        assert outcome.field == field
        assert repr(field) in str(outcome)
    else:
        # Only a value that is valid for that field may pass.
        assert getattr(outcome, field) == value


def _parse(data: dict) -> Manifest | ManifestError:
    try:
        return Manifest.from_dict(data)
    except ManifestError as error:
        return error


@pytest.mark.parametrize("field", FIELDS)
def test_a_missing_field_is_named(field):
    data = {k: v for k, v in VALID.items() if k != field}
    with pytest.raises(ManifestError, match=f"'{field}': is missing"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("name", "Gemma", "is not a model name"),
        ("name", "../etc", "is not a model name"),
        ("version", "1.0", "is not MAJOR.MINOR.PATCH"),
        ("version", "01.0.0", "is not MAJOR.MINOR.PATCH"),
        ("version", "1.0.0-rc1", "is not MAJOR.MINOR.PATCH"),
        ("format", "onnx", "must be one of gguf, hef"),
        ("size", 0, "must be at least 1"),
        ("size", True, "must be an integer"),
        ("size", 1.5, "must be an integer"),
        ("sha256", "A" * 64, "64 lowercase hex digits"),
        ("context_length", -1, "must be at least 1"),
        ("npu_required", "yes", "must be true or false"),
        ("created", "2026-02-30T00:00:00Z", "not a valid date"),
        ("created", "2026-03-01 12:00:00", "RFC 3339"),
        ("schema", 2, "must be 1"),
    ],
)
def test_malformed_fields_are_refused_with_the_reason(field, value, problem):
    with pytest.raises(ManifestError, match=problem) as error:
        Manifest.from_dict(dict(VALID, **{field: value}))
    assert error.value.field == field


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ManifestError) as error:
        Manifest.from_dict(dict(VALID, url="http://elsewhere"))
    assert error.value.field == "url"


def test_an_npu_model_must_say_so():
    with pytest.raises(ManifestError) as error:
        Manifest.from_dict(dict(VALID, format="hef", npu_required=False))
    assert error.value.field == "npu_required"
    hef = Manifest.from_dict(dict(VALID, format="hef", npu_required=True))
    assert hef.model_filename == "model.hef"


def test_canonical_json_is_sorted_and_compact():
    raw = make_manifest(b"x").to_json()
    assert raw.endswith(b"}\n")
    assert b" " not in raw
    assert list(json.loads(raw)) == sorted(FIELDS)


def test_versions_compare_numerically():
    assert parse_version("1.10.0") > parse_version("1.9.3")
    assert parse_version("2.0.0") > parse_version("1.99.99")
    assert make_manifest(b"x", version="0.2.0").version_key == (0, 2, 0)


def test_oversized_input_is_refused_before_parsing():
    with pytest.raises(ManifestError, match="more than"):
        Manifest.from_json(b" " * 70_000)
