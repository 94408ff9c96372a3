"""Minisign (Ed25519) signatures over model manifests.

The publisher signs the manifest bytes. The manifest carries the model's size and
SHA-256, so the signature covers the model file too. The signature's trusted
comment (itself covered by minisign's global signature) repeats what identifies
the artifact::

    pifarm-model name=gemma3-270m version=1.0.0 sha256=<64 hex>

and verification requires it to match the manifest, so a signature cannot be
moved onto another artifact. Signatures are made and read with py-minisign and
are compatible with the ``minisign`` tool (``minisign -Vm manifest.json -p key.pub``).
"""

from __future__ import annotations

import re
from pathlib import Path

import minisign

from pifarm_agent.manifest import Manifest, ManifestError

COMMENT_PREFIX = "pifarm-model"
COMMENT_RE = re.compile(r"pifarm-model name=(\S+) version=(\S+) sha256=(\S+)")


class SignatureError(Exception):
    """A signature is missing, malformed, made by another key or made for another artifact."""


def trusted_comment(manifest: Manifest) -> str:
    return f"{COMMENT_PREFIX} name={manifest.name} version={manifest.version} sha256={manifest.sha256}"


def load_public_key(path: str | Path) -> minisign.PublicKey:
    try:
        return minisign.PublicKey.from_file(path)
    except OSError as exc:
        raise SignatureError(f"read public key {path}: {exc.strerror or exc}") from None
    except minisign.Error as exc:
        raise SignatureError(f"read public key {path}: not a minisign public key ({exc})") from None


def load_secret_key(path: str | Path, password: str | None = None) -> minisign.SecretKey:
    try:
        key = minisign.SecretKey.from_file(path)
    except OSError as exc:
        raise SignatureError(f"read secret key {path}: {exc.strerror or exc}") from None
    except minisign.Error as exc:
        raise SignatureError(f"read secret key {path}: not a minisign secret key ({exc})") from None
    if key.is_encrypted():
        if password is None:
            raise SignatureError(f"secret key {path} is encrypted and no password was given")
        try:
            key.decrypt(password)
        except minisign.Error:
            # The library's message does not echo the password; ours does not either.
            raise SignatureError(f"decrypt secret key {path}: wrong password") from None
    return key


def sign_manifest(manifest_bytes: bytes, secret_key: minisign.SecretKey) -> bytes:
    """The ``.minisig`` file content for these exact manifest bytes."""
    manifest = Manifest.from_json(manifest_bytes)
    signature = secret_key.sign(
        manifest_bytes,
        untrusted_comment=f"signature of {manifest.name} {manifest.version} manifest",
        trusted_comment=trusted_comment(manifest),
    )
    return bytes(signature) + b"\n"


def verify_manifest(
    manifest_bytes: bytes, signature_bytes: bytes, public_key: minisign.PublicKey
) -> Manifest:
    """Check the signature and its trusted comment; return the parsed manifest.

    Raises SignatureError (bad signature, wrong key, comment for another artifact)
    or ManifestError (the signed bytes are not a valid manifest).
    """
    try:
        signature = minisign.Signature.from_bytes(signature_bytes)
    except (minisign.Error, ValueError) as exc:
        raise SignatureError(f"signature is not a minisign signature ({exc})") from None
    try:
        public_key.verify(manifest_bytes, signature)
    except minisign.VerifyError as exc:
        if "key identifiers" in str(exc):
            raise SignatureError("signature was made by another key than the trusted public key") from None
        raise SignatureError(
            "signature does not match the manifest (content or trusted comment altered)"
        ) from None
    manifest = Manifest.from_json(manifest_bytes)
    check_trusted_comment(signature.trusted_comment, manifest)
    return manifest


def check_trusted_comment(comment: str, manifest: Manifest) -> None:
    match = COMMENT_RE.fullmatch(comment)
    if match is None:
        raise SignatureError(f"trusted comment {comment[:120]!r} is not a pifarm-model comment")
    signed = dict(zip(("name", "version", "sha256"), match.groups(), strict=True))
    for field, value in signed.items():
        if getattr(manifest, field) != value:
            raise SignatureError(
                f"signature is for another artifact: trusted comment has {field}={value}, "
                f"manifest has {field}={getattr(manifest, field)}"
            )


__all__ = [
    "ManifestError",
    "SignatureError",
    "check_trusted_comment",
    "load_public_key",
    "load_secret_key",
    "sign_manifest",
    "trusted_comment",
    "verify_manifest",
]
