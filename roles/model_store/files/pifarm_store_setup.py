# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Buckets with versioning, access policies and users of the pifarm model store.

Runs on the storage host with the Python of the store's virtualenv, which holds
the ``minio`` library (the S3 client the node agent uses too). The model_store
role runs it with its settings as one JSON object on stdin, so no credential is
ever on a command line, and reads one JSON object from stdout::

    {"changed": bool, "buckets": [{"name", "created", "versioning", "changed"}],
     "policies": [{"name", "status"}], "users": [{"policy", "status": [...]}],
     "buckets_before": {...}, "buckets_after": {...}}

or, exiting 1, ``{"failed": true, "msg": "<step> <object>: <cause>"}``. Users are
reported by their policy; no key is ever printed. ``--check`` reads the store
and reports what would change without writing.

What it does: waits until the S3 endpoint answers, creates the missing buckets
and turns versioning on (or suspends it). With backend ``minio`` it creates or
updates each canned policy through MinIO's admin API (``MinioAdmin``), creates
each user, resets a user's secret when the store no longer accepts it, and maps
each user to exactly its one policy. With backend ``moto`` (the test backend)
the server seeds its users and policies at start; this checks that the store
accepts each user's keys.

Input keys: endpoint (host:port), secure, ca_bundle, backend (minio|moto),
access_key and secret_key (the administrator: MinIO's root user), buckets
([{name, versioning}]), policies ({name: IAM policy document}), users
([{access_key, secret_key, policy}]), probe_bucket (a bucket users' keys are
tried against), timeout (seconds to wait for the endpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import certifi
import urllib3
from minio import Minio, MinioAdmin
from minio.commonconfig import ENABLED
from minio.credentials import StaticProvider
from minio.error import MinioAdminException, S3Error
from minio.versioningconfig import SUSPENDED, VersioningConfig

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
REJECTED_KEY_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch")
LIST_FIELDS = ("Action", "NotAction", "Resource", "NotResource")


class StoreSetupError(Exception):
    """A step failed; the message names the step and the object."""


def http_client(params: dict[str, Any]) -> urllib3.PoolManager:
    ca_bundle = params["ca_bundle"] or (
        SYSTEM_CA_BUNDLE if os.path.isfile(SYSTEM_CA_BUNDLE) else certifi.where()
    )
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3.0, read=30.0),
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_bundle,
        retries=urllib3.Retry(total=1, backoff_factor=0.2),
    )


def s3_client(params: dict[str, Any], access_key: str, secret_key: str) -> Minio:
    return Minio(
        params["endpoint"],
        access_key=access_key,
        secret_key=secret_key,
        secure=params["secure"],
        http_client=http_client(params),
    )


def wait_for_store(client: Minio, endpoint: str, timeout: int) -> None:
    """Until the endpoint answers an S3 request (any S3 answer counts; a refused connection does not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return
        except S3Error as exc:
            if exc.code in REJECTED_KEY_CODES:
                raise StoreSetupError(
                    f"sign in to the store at {endpoint} as its administrator: {exc.code} "
                    "(the root credentials in the inventory are not the ones the store runs with)"
                ) from None
            return
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise StoreSetupError(
                    f"reach the store at {endpoint}: no answer within {timeout}s ({exc})"
                ) from None
            time.sleep(1)


def ensure_buckets(
    client: Minio, buckets: list[dict[str, Any]], check_mode: bool
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    results, before, after = [], {}, {}
    for bucket in buckets:
        name = bucket["name"]
        try:
            exists = client.bucket_exists(name)
            status = client.get_bucket_versioning(name).status if exists else "Off"
        except S3Error as exc:
            raise StoreSetupError(f"read bucket {name}: {exc.code}: {exc.message}") from None
        wanted = ENABLED if bucket["versioning"] else (SUSPENDED if status == ENABLED else status)
        before[name] = status if exists else "absent"
        after[name] = wanted
        if not check_mode:
            try:
                if not exists:
                    client.make_bucket(name)
                if wanted != status:
                    client.set_bucket_versioning(name, VersioningConfig(wanted))
            except S3Error as exc:
                raise StoreSetupError(f"set up bucket {name}: {exc.code}: {exc.message}") from None
        results.append(
            {
                "name": name,
                "created": not exists,
                "versioning": wanted,
                "changed": not exists or wanted != status,
            }
        )
    return results, before, after


def normalise_policy(document: dict[str, Any]) -> dict[str, Any]:
    """A policy document in one canonical form: list fields as sorted lists, statements sorted."""
    if isinstance(document, dict) and "Policy" in document and "Statement" not in document:
        document = document["Policy"]  # MinIO's info format v2 wraps the document
    statements = []
    for statement in document.get("Statement", []):
        canonical = dict(statement)
        for field in LIST_FIELDS:
            if field in canonical:
                value = canonical[field]
                canonical[field] = sorted(value if isinstance(value, list) else [value])
        statements.append(canonical)
    return {
        "Version": document.get("Version"),
        "Statement": sorted(statements, key=lambda s: json.dumps(s, sort_keys=True)),
    }


def admin_missing(exc: MinioAdminException) -> bool:
    return exc.code == "404" or "NoSuch" in (exc.body or "")


def ensure_policies(admin: MinioAdmin, policies: dict[str, Any], check_mode: bool) -> list[dict[str, Any]]:
    results = []
    for name, document in sorted(policies.items()):
        try:
            current = normalise_policy(json.loads(admin.policy_info(name)))
        except MinioAdminException as exc:
            if not admin_missing(exc):
                raise StoreSetupError(f"read policy {name}: HTTP {exc.code}: {exc.body}") from None
            current = None
        if current == normalise_policy(document):
            results.append({"name": name, "status": "unchanged"})
            continue
        if not check_mode:
            try:
                admin.policy_add(name, policy=document)
            except MinioAdminException as exc:
                raise StoreSetupError(f"write policy {name}: HTTP {exc.code}: {exc.body}") from None
        results.append({"name": name, "status": "created" if current is None else "updated"})
    return results


def keys_accepted(params: dict[str, Any], user: dict[str, str], probe_bucket: str) -> bool:
    """Whether the store accepts this user's keys: a HEAD of the probe bucket not refused for the keys."""
    try:
        s3_client(params, user["access_key"], user["secret_key"]).bucket_exists(probe_bucket)
    except S3Error as exc:
        return exc.code not in REJECTED_KEY_CODES
    return True


def ensure_minio_users(params: dict[str, Any], admin: MinioAdmin, check_mode: bool) -> list[dict[str, Any]]:
    results = []
    for user in params["users"]:
        policy = user["policy"]
        try:
            info = json.loads(admin.user_info(user["access_key"]))
        except MinioAdminException as exc:
            if not admin_missing(exc):
                raise StoreSetupError(f"read the user of policy {policy}: HTTP {exc.code}") from None
            info = None
        status = []
        if info is None:
            status.append("created")
        elif info.get("status") != "enabled" or not keys_accepted(params, user, params["probe_bucket"]):
            status.append("secret reset")
        attached = {p for p in (info or {}).get("policyName", "").split(",") if p}
        if attached != {policy}:
            status.append("policy set")
        if status and not check_mode:
            try:
                if "created" in status or "secret reset" in status:
                    admin.user_add(user["access_key"], user["secret_key"])
                if "policy set" in status:
                    admin.policy_set(policy, user=user["access_key"])
            except MinioAdminException as exc:
                raise StoreSetupError(f"set up the user of policy {policy}: HTTP {exc.code}") from None
        results.append({"policy": policy, "status": status or ["unchanged"]})
    return results


def check_moto_users(params: dict[str, Any]) -> list[dict[str, Any]]:
    for user in params["users"]:
        if not keys_accepted(params, user, params["probe_bucket"]):
            raise StoreSetupError(
                f"the test store refuses the keys of the user with policy {user['policy']}: it seeds its "
                "users from its IAM file at start; restart pifarm-model-store.service after changing them"
            )
    return [{"policy": user["policy"], "status": ["seeded"]} for user in params["users"]]


def run(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    client = s3_client(params, params["access_key"], params["secret_key"])
    wait_for_store(client, params["endpoint"], params["timeout"])
    buckets, buckets_before, buckets_after = ensure_buckets(client, params["buckets"], check_mode)
    if params["backend"] == "minio":
        admin = MinioAdmin(
            endpoint=params["endpoint"],
            credentials=StaticProvider(params["access_key"], params["secret_key"]),
            secure=params["secure"],
            http_client=http_client(params),
        )
        policies = ensure_policies(admin, params["policies"], check_mode)
        users = ensure_minio_users(params, admin, check_mode)
    else:
        policies = [{"name": name, "status": "seeded"} for name in sorted(params["policies"])]
        users = check_moto_users(params)
    changed = (
        any(b["changed"] for b in buckets)
        or any(p["status"] in ("created", "updated") for p in policies)
        or any(u["status"] not in (["unchanged"], ["seeded"]) for u in users)
    )
    return {
        "changed": changed,
        "buckets": buckets,
        "policies": policies,
        "users": users,
        "buckets_before": buckets_before,
        "buckets_after": buckets_after,
    }


REQUIRED = ("endpoint", "backend", "access_key", "secret_key", "probe_bucket")
DEFAULTS: dict[str, Any] = {
    "secure": False,
    "ca_bundle": None,
    "buckets": [],
    "policies": {},
    "users": [],
    "timeout": 60,
}


def read_params(text: str) -> dict[str, Any]:
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise StoreSetupError(f"read the settings on stdin: not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise StoreSetupError("read the settings on stdin: not a JSON object")
    missing = [key for key in REQUIRED if not params.get(key)]
    if missing:
        raise StoreSetupError(f"read the settings on stdin: missing {', '.join(missing)}")
    if params["backend"] not in ("minio", "moto"):
        raise StoreSetupError(
            f"read the settings on stdin: backend {params['backend']!r} is not minio or moto"
        )
    params = {**DEFAULTS, **params}
    params["buckets"] = [{"versioning": True, **bucket} for bucket in params["buckets"]]
    if params["backend"] == "minio":
        unknown = sorted({u["policy"] for u in params["users"]} - set(params["policies"]))
        if unknown:
            raise StoreSetupError(
                f"read the settings on stdin: users name undefined policies {', '.join(unknown)}"
            )
    return params


def redact(text: str, params: dict[str, Any]) -> str:
    """The text without any key of the settings, should a library message ever carry one."""
    secrets = [params.get("access_key"), params.get("secret_key")]
    for user in params.get("users", []):
        secrets += [user.get("access_key"), user.get("secret_key")]
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report what would change, write nothing")
    args = parser.parse_args(argv)
    params: dict[str, Any] = {}
    try:
        params = read_params(sys.stdin.read())
        result = run(params, args.check)
    except StoreSetupError as exc:
        print(json.dumps({"failed": True, "msg": redact(str(exc), params)}))
        return 1
    except Exception as exc:  # one JSON answer, whatever went wrong
        print(
            json.dumps(
                {"failed": True, "msg": redact(f"set up the store: {type(exc).__name__}: {exc}", params)}
            )
        )
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
