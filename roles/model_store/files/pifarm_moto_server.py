# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""moto's S3 server with IAM users seeded at start: the model store's TEST backend.

NOT FOR PRODUCTION. moto keeps every bucket and object in memory, so a restart
empties the store. It runs here only because MinIO cannot be downloaded on the
CI hosts.

This is ``moto_server -H HOST -p PORT`` plus one step before it serves: the IAM
users of the store (root, publisher, node), each with the access key the
inventory gives it and a managed policy, are created in moto's IAM backend. The
unit sets INITIAL_NO_AUTH_ACTION_COUNT=0, moto's switch for enforcing IAM in
server mode, so from the first request on every S3 call must be signed by one of
these keys and is checked against its policy: the node key can read but not
write. moto's IAM API can only generate random access keys, so the chosen keys
are set on the key objects directly; that touches moto internals and is pinned
to the moto release the role installs.

The users come from the file named by ``--iam`` (root and the store's user may
read it), or ``$CREDENTIALS_DIRECTORY/iam.json`` under systemd's LoadCredential=::

    {"users": [{"name": "pifarm-node", "access_key": "...", "secret_key": "...",
                "policy_name": "pifarm-node-read", "policy": {...IAM policy document...}}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# moto has no region of its own; the store's clients sign for us-east-1.
REGION = "us-east-1"


def iam_file(argv: list[str]) -> tuple[Path, list[str]]:
    """The IAM file (--iam, else the systemd credential) and the arguments left for moto_server."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--iam")
    args, rest = parser.parse_known_args(argv)
    if args.iam:
        return Path(args.iam), rest
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        sys.exit(
            "pifarm-moto-server: no --iam file and no $CREDENTIALS_DIRECTORY (LoadCredential=iam.json:...)"
        )
    return Path(credentials) / "iam.json", rest


def load_users(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.exit(f"pifarm-moto-server: read IAM file {path}: {exc}")
    users = data.get("users") if isinstance(data, dict) else None
    required = ("name", "access_key", "secret_key", "policy_name", "policy")
    if not isinstance(users, list) or not all(
        isinstance(u, dict) and all(u.get(k) for k in required) for u in users
    ):
        sys.exit(f"pifarm-moto-server: IAM file {path}: 'users' must list objects with {', '.join(required)}")
    return users


def seed(users: list[dict[str, Any]]) -> None:
    """Create each user with its policy and its given access key in moto's IAM backend."""
    from moto.core import DEFAULT_ACCOUNT_ID  # noqa: PLC0415 (moto reads its settings at import)
    from moto.iam.models import iam_backends  # noqa: PLC0415

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for user in users:
        backend.create_user(REGION, user["name"])
        policy = backend.create_policy(
            description=f"pifarm model store: {user['policy_name']}",
            path="/",
            policy_document=json.dumps(user["policy"]),
            policy_name=user["policy_name"],
            tags=[],
        )
        backend.attach_user_policy(policy.arn, user["name"])
        key = backend.create_access_key(user["name"])
        backend.access_keys.pop(key.physical_resource_id, None)
        key.access_key_id = user["access_key"]
        key.secret_access_key = user["secret_key"]
        backend.access_keys[key.physical_resource_id] = key
    print(
        f"pifarm-moto-server: seeded {len(users)} IAM users: {', '.join(u['name'] for u in users)}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    path, moto_args = iam_file(sys.argv[1:] if argv is None else argv)
    seed(load_users(path))
    from moto.server import main as moto_server  # noqa: PLC0415

    moto_server(moto_args)


if __name__ == "__main__":
    main()
