"""playbooks/quantize_model.yml: its refusals, and a real quantization on this machine.

Input that needs nothing from the builder is refused before the builder is
reached (the unreachable host of tests/playbook_harness.py). Checks that read the
builder run on this machine as the builder (local connection, no become), with
farm_builder_dir and the controller directory in pytest's tmp_path: each is
refused before any change, naming the value. The positive run requantizes the
test model (Gemma 3 270M Q4_K_M -> Q4_0) with the cached llama.cpp build,
stopping after the fetch (--skip-tags publish_model); publishing is
exercised in molecule against a real store.
"""

from __future__ import annotations

import filecmp
import grp
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from host_cache import cached_llama_bin, cached_test_model
from playbook_harness import (
    INVENTORY,
    LOCALHOST,
    assert_refused_before_the_host,
    first_failed_task,
    recap,
    run_playbook,
)

from pifarm_agent.manifest import NAME_RE, VERSION_RE

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "quantize_model.yml"
# This machine as the builder: no become (the tests run as the invoking user).
LOCAL_BUILDER = LOCALHOST.rstrip("\n") + " ansible_become=false\n"
UNREACHABLE = "pifarm-no-such-host"
NAMES = {
    "publish_model_name": "gemma3-270m",
    "publish_model_version": "1.0.0",
    "publish_model_context_length": 32768,
}


def quantize(
    tmp_path: Path,
    env: dict[str, str],
    extra_vars: dict,
    *,
    inventory: str = LOCAL_BUILDER,
    check: bool = False,
    publish: bool = False,
) -> subprocess.CompletedProcess:
    """The playbook as an operator runs it; without ``publish``, stopped after the fetch."""
    options = () if publish else ("--skip-tags", "publish_model")
    return run_playbook(
        PLAYBOOK, tmp_path, env, extra_vars, inventory=inventory, check=check, options=options, timeout=600
    )


@pytest.fixture(scope="module")
def llama_bin() -> Path:
    """The llama.cpp build holding llama-quantize; skips when nothing is built (see host_cache)."""
    return cached_llama_bin("llama-quantize")


@pytest.fixture(scope="module")
def test_model() -> Path:
    """The real Q4_K_M GGUF: $PIFARM_TEST_MODEL, else scripts/test-model.sh provides it."""
    model = cached_test_model()
    with model.open("rb") as handle:
        assert handle.read(4) == b"GGUF", f"{model} is not a GGUF file"
    return model


def builder_vars(tmp_path: Path, bin_dir: Path | None, source: Path | str) -> dict:
    """This machine as the builder, every directory the playbook writes in tmp_path.

    With ``bin_dir``, farm_builder_dir/llama.cpp/current is linked to its build,
    as runtime_builder leaves it on a builder.
    """
    builder = tmp_path / "builder"
    (builder / "llama.cpp").mkdir(parents=True)
    if bin_dir is not None:
        (builder / "llama.cpp" / "current").symlink_to(bin_dir.parent)
    return {
        "quantize_model_builder": "localhost",
        "farm_builder_dir": str(builder),
        # The builder's farm group is created by runtime_builder; here, the invoking user's own group.
        "farm_system_group": grp.getgrgid(os.getgid()).gr_name,
        "quantize_model_controller_dir": str(tmp_path / "controller"),
        "quantize_model_source": str(source),
        "quantize_model_type": "Q4_0",
        **NAMES,
    }


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "builder" / "quantized").exists(), "the output directory was created"
    assert not (tmp_path / "controller").exists(), "the controller directory was created"


def assert_refused_on_the_builder(result: subprocess.CompletedProcess, failing_task: str, named: str) -> None:
    counts = recap(result, "localhost")
    assert result.returncode != 0
    assert counts["failed"] == 1, result.stdout
    assert counts["changed"] == 0
    assert failing_task in first_failed_task(result)
    assert named in result.stdout


# -- refused before the builder is reached ----------------------------------------------------

UNREACHABLE_BUILDER = {
    "quantize_model_builder": UNREACHABLE,
    "quantize_model_source": "/srv/models/gemma-3-270m-f16.gguf",
    "quantize_model_type": "Q4_K_M",
    **NAMES,
}


@pytest.mark.parametrize(
    ("override", "failing_task", "named"),
    [
        pytest.param(
            {"quantize_model_source": None},
            "Assert every required variable is set",
            "quantize_model_source is not set",
            id="no-source",
        ),
        pytest.param(
            {"quantize_model_source": "models/gemma-f16.gguf"},
            "Assert the source is an absolute path and the type a name",
            "quantize_model_source=models/gemma-f16.gguf must be an absolute path on the builder",
            id="relative-source",
        ),
        pytest.param(
            {"quantize_model_type": "15"},
            "Assert the source is an absolute path and the type a name",
            "quantize_model_type=15 a llama-quantize type name",
            id="type-by-number",
        ),
        pytest.param(
            {"publish_model_name": "Gemma 3"},
            "Assert the name, version and context length are valid manifest fields",
            "publish_model_name=Gemma 3 ([a-z0-9]",
            id="name-not-a-manifest-name",
        ),
        pytest.param(
            {"publish_model_version": "1.0"},
            "Assert the name, version and context length are valid manifest fields",
            "publish_model_version=1.0 (MAJOR.MINOR.PATCH)",
            id="version-not-semver",
        ),
        pytest.param(
            {"publish_model_memory_required_mb": "lots"},
            "Assert the optional settings are sane",
            "publish_model_memory_required_mb=lots (MiB > 0",
            id="memory-not-a-number",
        ),
        pytest.param(
            {"quantize_model_threads": 0},
            "Assert the optional settings are sane",
            "quantize_model_threads=0 (null or 1 or more)",
            id="zero-threads",
        ),
        pytest.param(
            {"publish_model_quantization": "Q8_0"},
            "Assert the file and the quantization for publishing are left to this playbook",
            "publish_model_quantization=Q8_0 are set",
            id="quantization-given-twice",
        ),
    ],
)
def test_bad_input_is_refused_before_the_builder_is_reached(
    tmp_path, ansible_env, override, failing_task, named
):
    extra = {k: v for k, v in {**UNREACHABLE_BUILDER, **override}.items() if v is not None}
    result = quantize(tmp_path, ansible_env, extra, inventory=INVENTORY)
    assert_refused_before_the_host(result, failing_task, named)


def test_a_missing_signing_key_is_refused_before_quantizing(tmp_path, ansible_env):
    """Publishing (not skipped here) signs on the controller: its key must be there first."""
    extra = {**UNREACHABLE_BUILDER, "publish_model_secret_key": "/nonexistent/pifarm-models.key"}
    result = quantize(tmp_path, ansible_env, extra, inventory=INVENTORY, publish=True)
    assert_refused_before_the_host(
        result,
        "Assert the signing key is on the controller",
        "publish_model_secret_key=/nonexistent/pifarm-models.key: no such file on the controller",
    )
    assert "Publish a signed model" not in result.stdout, "the publishing play ran after a refusal"


@pytest.mark.parametrize(
    ("inventory", "builder", "named"),
    [
        pytest.param(
            "[pifarm_nodes]\nnode1\n",
            None,
            "quantize_model_builder=pifarm_storage[0] matches 0 host(s)",
            id="no-storage",
        ),
        pytest.param(
            "[pifarm_storage]\nstore-a\nstore-b\n",
            "pifarm_storage",
            "quantize_model_builder=pifarm_storage matches 2 host(s) (store-a, store-b)",
            id="two-builders",
        ),
    ],
)
def test_the_builder_must_be_one_host(tmp_path, ansible_env, inventory, builder, named):
    extra = {
        k: v for k, v in {**UNREACHABLE_BUILDER, "quantize_model_builder": builder}.items() if v is not None
    }
    result = quantize(tmp_path, ansible_env, extra, inventory=inventory)
    assert recap(result, "localhost")["failed"] == 1
    assert "Assert the builder pattern names exactly one host" in first_failed_task(result)
    assert named in result.stdout
    assert "PLAY [Quantize a model on the builder" not in result.stdout


def test_name_and_version_rules_are_the_manifests():
    """The playbook checks name and version early with the agent's own rules."""
    plays = yaml.safe_load(PLAYBOOK.read_text())
    play_vars = next(play["vars"] for play in plays if "__quantize_model_name_regex" in play.get("vars", {}))
    assert play_vars["__quantize_model_name_regex"] == f"^{NAME_RE.pattern}$"
    assert play_vars["__quantize_model_version_regex"] == f"^{VERSION_RE.pattern}$"


# -- refused on the builder (this machine), before any change ---------------------------------


def test_a_missing_source_is_refused(tmp_path, ansible_env):
    extra = builder_vars(tmp_path, None, "/nonexistent/gemma-3-270m-f16.gguf")
    result = quantize(tmp_path, ansible_env, extra)
    assert_refused_on_the_builder(
        result,
        "Assert the source model exists",
        "quantize_model_source=/nonexistent/gemma-3-270m-f16.gguf: no such file on localhost",
    )
    assert_nothing_written(tmp_path)


def test_a_builder_without_llama_quantize_is_refused(tmp_path, ansible_env):
    source = tmp_path / "model-f16.gguf"
    source.write_bytes(b"GGUF")
    extra = builder_vars(tmp_path, None, source)
    result = quantize(tmp_path, ansible_env, extra)
    tool = tmp_path / "builder" / "llama.cpp" / "current" / "bin" / "llama-quantize"
    assert_refused_on_the_builder(
        result,
        "Assert llama-quantize is installed",
        f"llama-quantize is not installed at {tool} on localhost: run the runtime_builder role (site.yml) "
        "on localhost first",
    )
    assert_nothing_written(tmp_path)


def test_an_unknown_type_is_refused_with_the_known_ones(tmp_path, ansible_env, llama_bin, test_model):
    extra = {**builder_vars(tmp_path, llama_bin, test_model), "quantize_model_type": "Q4_Z"}
    result = quantize(tmp_path, ansible_env, extra)
    assert_refused_on_the_builder(
        result,
        "Assert the type is one llama-quantize offers",
        "quantize_model_type=Q4_Z is not a type the llama-quantize on localhost offers",
    )
    known = re.search(r"Known: ([^.]*)\.", result.stdout)
    assert known, result.stdout
    assert {"Q4_0", "Q4_K_M", "Q8_0", "F16"} <= set(known.group(1).split(", "))
    assert "COPY" not in known.group(1).split(", ")
    assert_nothing_written(tmp_path)


def test_a_quantized_source_needs_allow_requantize(tmp_path, ansible_env, llama_bin, test_model):
    extra = builder_vars(tmp_path, llama_bin, test_model)
    result = quantize(tmp_path, ansible_env, extra)
    assert_refused_on_the_builder(
        result,
        "Assert an already quantized source is requantized only on request",
        f"quantize_model_source={test_model} is already quantized (tensor types q4_K, q5_0, q6_K, q8_0)",
    )
    assert "quantize_model_allow_requantize=true" in result.stdout
    assert_nothing_written(tmp_path)


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path, ansible_env, llama_bin):
    source = tmp_path / "model-f16.gguf"
    source.write_text("not a model\n")
    extra = builder_vars(tmp_path, llama_bin, source)
    result = quantize(tmp_path, ansible_env, extra)
    assert_refused_on_the_builder(
        result, "Assert llama-quantize can read the source", f"llama-quantize --dry-run {source} Q4_0 failed"
    )
    assert "expected 'GGUF'" in result.stdout
    assert_nothing_written(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="runuser (switching to another user) needs root")
def test_a_source_the_build_user_cannot_read_is_refused(tmp_path, ansible_env, llama_bin):
    source = tmp_path / "private" / "model-f16.gguf"
    source.parent.mkdir(mode=0o700)
    source.write_bytes(b"GGUF")
    source.chmod(0o600)
    extra = {**builder_vars(tmp_path, llama_bin, source), "quantize_model_user": "nobody"}
    result = quantize(tmp_path, ansible_env, extra)
    assert_refused_on_the_builder(
        result,
        "Assert the user can read the source",
        f"quantize_model_source={source} is not readable by nobody, the user llama-quantize runs as",
    )
    assert_nothing_written(tmp_path)


def test_an_alias_is_quantized_under_its_canonical_name(tmp_path, ansible_env, llama_bin, test_model):
    """Check mode with Q4_K (llama-quantize's alias of Q4_K_M): reported, not done."""
    extra = {
        **builder_vars(tmp_path, llama_bin, test_model),
        "quantize_model_type": "q4_k",
        "quantize_model_allow_requantize": True,
    }
    result = quantize(tmp_path, ansible_env, extra, check=True)
    assert recap(result, "localhost")["failed"] == 0, result.stdout
    output = tmp_path / "builder" / "quantized" / "gemma3-270m-1.0.0-Q4_K_M.gguf"
    assert f"to Q4_K_M in {output}" in result.stdout
    assert_nothing_written(tmp_path)


# -- a real quantization on this machine ------------------------------------------------------

# A llama-quantize that answers --help and --dry-run with the real one, then
# dies after writing part of its output (the argument after the source): what
# a full disk or a kill does.
DYING_QUANTIZE = """#!/bin/sh
case " $* " in *" --help "*|*" --dry-run "*) exec {real} "$@" ;; esac
previous=
for arg in "$@"; do
  [ "$previous" = "{source}" ] && printf 'GGUF, the first tensors' >"$arg"
  previous=$arg
done
echo "llama_quantize: failed to quantize: write error (simulated)" >&2
exit 1
"""


def test_a_failed_quantization_leaves_nothing_behind(tmp_path, ansible_env, llama_bin, test_model):
    dying = tmp_path / "dying-build"
    (dying / "bin").mkdir(parents=True)
    tool = dying / "bin" / "llama-quantize"
    tool.write_text(DYING_QUANTIZE.format(real=llama_bin / "llama-quantize", source=test_model))
    tool.chmod(0o755)
    extra = {**builder_vars(tmp_path, tool.parent, test_model), "quantize_model_allow_requantize": True}
    result = quantize(tmp_path, ansible_env, extra)
    counts = recap(result, "localhost")
    assert counts["failed"] == 1
    assert counts["rescued"] == 1
    # The first failure is llama-quantize's, rescued; the run ends in the rescue's report.
    last_failure = list(re.finditer(r"^fatal: \[", result.stdout, re.MULTILINE))[-1]
    last_task = result.stdout[: last_failure.start()].rsplit("TASK [", 1)[1]
    assert last_task.startswith("Report the failed quantization")
    assert f"Quantizing {test_model} to Q4_0 failed on localhost (exit 1)" in result.stdout
    assert "write error (simulated)" in result.stdout
    assert list((tmp_path / "builder" / "quantized").iterdir()) == [], "a partial output was left"
    assert not (tmp_path / "controller").exists()


def report(result: subprocess.CompletedProcess, start: str) -> str:
    """The message of the first debug output that begins with ``start``."""
    match = re.search(rf'"msg": "({re.escape(start)}[^"]*)"', result.stdout)
    assert match, result.stdout
    return match.group(1)


def test_requantize_fetch_and_rerun(tmp_path, ansible_env, llama_bin, test_model):
    """Check mode reports and writes nothing; the run writes a GGUF, fetches it; a re-run changes nothing."""
    extra = {**builder_vars(tmp_path, llama_bin, test_model), "quantize_model_allow_requantize": True}
    output = tmp_path / "builder" / "quantized" / "gemma3-270m-1.0.0-Q4_0.gguf"
    fetched = tmp_path / "controller" / output.name

    checked = quantize(tmp_path, ansible_env, extra, check=True)
    counts = recap(checked, "localhost")
    assert counts["failed"] == 0, checked.stdout
    assert counts["changed"] >= 1, "check mode hid that the run would quantize"
    would = report(checked, "Check mode: would quantize")
    assert f"of {test_model} to Q4_0 in {output}" in would
    assert f"fetch it to {fetched}" in would
    assert_nothing_written(tmp_path)

    ran = quantize(tmp_path, ansible_env, extra)
    counts = recap(ran, "localhost")
    assert counts["failed"] == 0, ran.stdout + ran.stderr
    assert counts["changed"] >= 3  # directory, quantized output and its record, fetched copy
    with output.open("rb") as model:
        assert model.read(4) == b"GGUF"
    assert output.stat().st_size < test_model.stat().st_size
    assert not output.with_name(output.name + ".partial").exists()
    assert filecmp.cmp(output, fetched, shallow=False)

    record = json.loads(output.with_name(output.name + ".json").read_text())
    assert record["source"] == str(test_model)
    assert record["source_size"] == test_model.stat().st_size
    assert record["type"] == "Q4_0"
    assert record["seconds"] >= 0
    assert record["llama_quantize"].startswith("version: ")

    done = report(ran, str(test_model))
    size_mib = output.stat().st_size / 1048576
    memory = math.ceil(size_mib * 125 / 100)
    assert f"({test_model.stat().st_size / 1048576:.1f} MiB, q4_K/q5_0/q6_K/q8_0)" in done
    assert f"-> {output} ({size_mib:.1f} MiB, Q4_0): quantized in {record['seconds']} s as" in done
    assert f"memory_required_mb {memory} (size + 25 %)" in done
    assert "TASK [Sign and upload the model]" not in ran.stdout, "--skip-tags publish_model published"

    again = quantize(tmp_path, ansible_env, extra)
    counts = recap(again, "localhost")
    assert counts["failed"] == 0, again.stdout
    assert counts["changed"] == 0, again.stdout
    assert "already present (quantized in" in report(again, str(test_model))

    # Same name, version and type from another file: the old output is not its answer.
    other = tmp_path / "other-source.gguf"
    shutil.copyfile(test_model, other)
    result = quantize(tmp_path, ansible_env, {**extra, "quantize_model_source": str(other)})
    assert_refused_on_the_builder(
        result,
        "Assert an existing output was made from this source",
        f"{output} on localhost was quantized from {test_model}",
    )
    assert "publish it as a new publish_model_version" in result.stdout
    assert json.loads(output.with_name(output.name + ".json").read_text()) == record
