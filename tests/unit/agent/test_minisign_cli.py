"""Our signatures against the real ``minisign`` tool, both ways.

The publisher may sign with ``minisign`` itself or with ``pifarm-agent model publish``
(py-minisign); nodes verify with py-minisign, operators may check with ``minisign -V``.
The binary comes from Debian's ``minisign`` package (scripts/testbed.sh installs it).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from agent_helpers import blob, make_manifest, signed

from pifarm_agent.signing import (
    SignatureError,
    load_public_key,
    load_secret_key,
    sign_manifest,
    trusted_comment,
    verify_manifest,
)

MINISIGN = shutil.which("minisign")
pytestmark = pytest.mark.skipif(
    MINISIGN is None,
    reason="the minisign binary is not installed (apt-get install minisign; scripts/testbed.sh installs it)",
)


def minisign(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MINISIGN, *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )


@pytest.fixture
def tool_keys(tmp_path) -> dict[str, Path]:
    """A key pair made by ``minisign -G -W`` (no password)."""
    result = minisign("-G", "-W", "-p", "tool.pub", "-s", "tool.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return {"public": tmp_path / "tool.pub", "secret": tmp_path / "tool.key"}


def test_minisign_verifies_what_we_sign(tmp_path, keypair):
    artifact = signed(keypair.secret_key, blob(1))
    (tmp_path / "manifest.json").write_bytes(artifact.manifest_bytes)
    (tmp_path / "manifest.json.minisig").write_bytes(artifact.signature)
    (tmp_path / "key.pub").write_bytes(bytes(keypair.public_key) + b"\n")
    result = minisign("-Vm", "manifest.json", "-p", "key.pub", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Signature and comment signature verified" in result.stdout
    assert f"Trusted comment: {trusted_comment(artifact.manifest)}" in result.stdout


def test_minisign_refuses_a_manifest_altered_after_we_signed_it(tmp_path, keypair):
    artifact = signed(keypair.secret_key, blob(1))
    (tmp_path / "manifest.json").write_bytes(artifact.manifest_bytes.replace(b'"size":', b'"size": '))
    (tmp_path / "manifest.json.minisig").write_bytes(artifact.signature)
    (tmp_path / "key.pub").write_bytes(bytes(keypair.public_key) + b"\n")
    result = minisign("-Vm", "manifest.json", "-p", "key.pub", cwd=tmp_path)
    assert result.returncode != 0
    assert "Signature verification failed" in result.stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed", "legacy"])
def test_we_verify_what_minisign_signs(tmp_path, tool_keys, legacy):
    manifest = make_manifest(blob(2))
    (tmp_path / "manifest.json").write_bytes(manifest.to_json())
    flags = ["-l"] if legacy else []
    result = minisign(
        "-S", *flags, "-s", str(tool_keys["secret"]), "-m", "manifest.json", "-t", trusted_comment(manifest),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    signature = (tmp_path / "manifest.json.minisig").read_bytes()
    # The signature algorithm: "Ed" signs the file itself (legacy), "ED" its BLAKE2b hash.
    assert base64.b64decode(signature.split(b"\n")[1])[:2] == (b"Ed" if legacy else b"ED")
    verified = verify_manifest(manifest.to_json(), signature, load_public_key(tool_keys["public"]))
    assert verified == manifest


def test_a_minisign_signature_with_a_foreign_trusted_comment_is_refused(tmp_path, tool_keys):
    manifest = make_manifest(blob(2), version="2.0.0")
    older = make_manifest(blob(2), version="1.0.0")
    (tmp_path / "manifest.json").write_bytes(manifest.to_json())
    result = minisign(
        "-S",
        "-s",
        str(tool_keys["secret"]),
        "-m",
        "manifest.json",
        "-t",
        trusted_comment(older),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(
        SignatureError, match=r"trusted comment has version=1\.0\.0, manifest has version=2\.0\.0"
    ):
        verify_manifest(
            manifest.to_json(),
            (tmp_path / "manifest.json.minisig").read_bytes(),
            load_public_key(tool_keys["public"]),
        )


def test_a_minisign_secret_key_signs_through_our_code(tmp_path, tool_keys):
    """An operator's key from ``minisign -G`` works with ``pifarm-agent model publish``."""
    raw = make_manifest(blob(3)).to_json()
    (tmp_path / "manifest.json").write_bytes(raw)
    (tmp_path / "manifest.json.minisig").write_bytes(sign_manifest(raw, load_secret_key(tool_keys["secret"])))
    result = minisign("-Vm", "manifest.json", "-p", str(tool_keys["public"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
