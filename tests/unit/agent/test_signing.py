"""Minisign signatures over manifests, bound to the artifact by the trusted comment."""

from __future__ import annotations

import re

import minisign
import pytest
from agent_helpers import blob, make_manifest, signed

from pifarm_agent.signing import (
    SignatureError,
    check_trusted_comment,
    load_public_key,
    load_secret_key,
    sign_manifest,
    trusted_comment,
    verify_manifest,
)


def test_a_good_signature_verifies_and_returns_the_manifest(keypair):
    artifact = signed(keypair.secret_key, blob(1))
    manifest = verify_manifest(artifact.manifest_bytes, artifact.signature, keypair.public_key)
    assert manifest == artifact.manifest
    assert minisign.Signature.from_bytes(artifact.signature).trusted_comment == (
        f"pifarm-model name=tiny version=1.0.0 sha256={artifact.manifest.sha256}"
    )


def test_a_signature_by_another_key_is_refused(keypair, other_keypair):
    artifact = signed(other_keypair.secret_key, blob(1))
    with pytest.raises(SignatureError, match="another key"):
        verify_manifest(artifact.manifest_bytes, artifact.signature, keypair.public_key)


def test_a_signature_moved_from_another_artifact_is_refused(keypair):
    first, second = signed(keypair.secret_key, blob(1)), signed(keypair.secret_key, blob(2))
    with pytest.raises(SignatureError, match="does not match the manifest"):
        verify_manifest(second.manifest_bytes, first.signature, keypair.public_key)


def test_an_altered_manifest_is_refused(keypair):
    artifact = signed(keypair.secret_key, blob(1))
    tampered = artifact.manifest_bytes.replace(b'"version":"1.0.0"', b'"version":"9.0.0"')
    assert tampered != artifact.manifest_bytes
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(tampered, artifact.signature, keypair.public_key)


def test_an_edited_trusted_comment_breaks_the_global_signature(keypair):
    artifact = signed(keypair.secret_key, blob(1))
    forged = artifact.signature.replace(b"version=1.0.0", b"version=2.0.0")
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(artifact.manifest_bytes, forged, keypair.public_key)


def test_a_trusted_comment_for_another_artifact_is_refused(keypair):
    """A valid signature whose comment names another version (an older release replayed as newer)."""
    old = make_manifest(blob(1), version="1.0.0")
    new_raw = make_manifest(blob(1), version="2.0.0").to_json()
    signature = keypair.secret_key.sign(new_raw, trusted_comment=trusted_comment(old))
    with pytest.raises(
        SignatureError, match=re.escape("trusted comment has version=1.0.0, manifest has version=2.0.0")
    ):
        verify_manifest(new_raw, bytes(signature), keypair.public_key)


@pytest.mark.parametrize("comment", ["timestamp:1700000000", "pifarm-model name=tiny", ""])
def test_foreign_trusted_comments_are_refused(comment):
    with pytest.raises(SignatureError, match="not a pifarm-model comment"):
        check_trusted_comment(comment, make_manifest(b"x"))


@pytest.mark.parametrize(
    "garbage", [b"", b"not a signature", b"untrusted comment: x\nAAAA\ntrusted comment: y\nBBBB"]
)
def test_garbage_signatures_are_refused(keypair, garbage):
    artifact = signed(keypair.secret_key, blob(1))
    with pytest.raises(SignatureError, match="not a minisign signature"):
        verify_manifest(artifact.manifest_bytes, garbage, keypair.public_key)


def test_keys_load_from_files_and_encrypted_keys_need_the_password(tmp_path):
    pair = minisign.KeyPair.generate()
    pair.secret_key.encrypt(
        "correct horse", opslimit=minisign.OPSLIMIT // 64, memlimit=minisign.MEMLIMIT // 64
    )
    (tmp_path / "key.sec").write_bytes(bytes(pair.secret_key))
    (tmp_path / "key.pub").write_bytes(bytes(pair.public_key))
    with pytest.raises(SignatureError, match="encrypted and no password"):
        load_secret_key(tmp_path / "key.sec")
    with pytest.raises(SignatureError, match="wrong password") as error:
        load_secret_key(tmp_path / "key.sec", "battery staple")
    assert "battery" not in str(error.value)
    secret = load_secret_key(tmp_path / "key.sec", "correct horse")
    raw = make_manifest(blob(3)).to_json()
    verify_manifest(raw, sign_manifest(raw, secret), load_public_key(tmp_path / "key.pub"))


def test_missing_and_malformed_key_files_are_named(tmp_path):
    with pytest.raises(SignatureError, match=r"read public key .*nope.pub"):
        load_public_key(tmp_path / "nope.pub")
    (tmp_path / "bad.pub").write_text("hello\n")
    with pytest.raises(SignatureError, match="not a minisign public key"):
        load_public_key(tmp_path / "bad.pub")
