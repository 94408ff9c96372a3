#!/usr/bin/python
# Copyright (c) pifarm.inference maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_sync
short_description: Fetch, verify and activate a model in a node's model cache
version_added: 0.1.0
description:
  - Runs the node agent C(pifarm-agent) on the node, which holds the one implementation of the
    model flow. This module only builds its command line and reads its JSON result.
  - With O(state=active) the model version is fetched from the model store into the node's
    content-addressed cache, its size, SHA-256 and minisign signature are verified, and the cache's
    C(current) link is switched to it atomically; the version before stays as C(previous) for rollback.
  - With O(state=present) the version is fetched and verified but C(current) is left as it is
    (a prefetch). With O(state=absent) one cached version, or the whole model, is removed.
  - When the store cannot be reached and a verified model is cached, the node keeps it and the
    module reports RV(status=served-from-cache) with a warning, without failing.
  - Store credentials are handed to the agent through its environment, never on its command line.
options:
  name:
    description:
      - The model's name in the store, for example V(gemma3-270m).
    type: str
    required: true
  version:
    description:
      - A version C(MAJOR.MINOR.PATCH), or V(latest) for the newest version published in the store.
      - With O(state=absent), V(latest) removes the whole model (every cached version, both links
        and any partial download); a version removes only that one.
    type: str
    default: latest
  state:
    description:
      - V(active) makes the version current (fetching and verifying it first when needed).
      - V(present) makes sure the version is cached and verified, without switching C(current).
      - V(absent) removes it from the cache. The current version cannot be removed on its own;
        activate another one first, or remove the whole model.
    type: str
    choices: [active, present, absent]
    default: active
  config:
    description:
      - The agent's JSON configuration file (store endpoint, bucket, credentials, public key, cache root).
      - When not set, the agent reads its default C(/etc/pifarm/agent.json) (the file the C(model_cache)
        role writes), and does without it when it does not exist.
      - The options below override what the file says.
    type: path
  agent:
    description:
      - Path of the C(pifarm-agent) executable.
    type: path
    default: /opt/pifarm/agent/bin/pifarm-agent
  endpoint:
    description:
      - The model store, C(host:port) or C(http(s)://host:port).
    type: str
  bucket:
    description:
      - The store bucket that holds the models.
    type: str
  access_key:
    description:
      - Store access key (read-only is enough for O(state=active) and O(state=present)).
      - Passed to the agent in its environment, never on its command line.
    type: str
  secret_key:
    description:
      - Store secret key. Passed to the agent in its environment, never on its command line.
    type: str
  public_key:
    description:
      - The minisign public key file trusted for model manifests.
    type: path
  cache_root:
    description:
      - The cache root; models live in C(<cache_root>/models/<name>/).
    type: path
  allow_downgrade:
    description:
      - Accept making a version current that is older than the current one (or the current version
        number with other content). Without it such a switch fails and the current model stays.
    type: bool
    default: false
  cached_only:
    description:
      - With O(state=active), make O(version) current from the cache alone, without asking the store;
        the version must be cached (fetched and verified before); its signature and size are checked
        again, and the switch is the same atomic link switch. The rollback path, which works while the
        store is down. O(version) must be a version, not V(latest).
    type: bool
    default: false
    version_added: 0.2.0
  keep_current:
    description:
      - With O(state=active), make the version current only when the model has no current version
        yet; when it has one, fetch and verify the version without switching (as O(state=present))
        and report RV(kept_current=true).
      - For a model a llama-server serves, whose switch belongs to the staged rollout
        (C(playbooks/rollout_model.yml)), which drains the node first, and never to a plain run.
    type: bool
    default: false
    version_added: 0.2.0
author:
  - pifarm.inference maintainers (@pifarm)
attributes:
  check_mode:
    description: >-
      Runs the agent with C(--plan): the store's signed manifest is fetched and verified, the version
      policy and the free-space guard are applied, nothing is written; RV(would_fetch_bytes) says how many
      bytes the real run would download.
    support: full
  diff_mode:
    description: Shows the current model (name, version, sha256) before and after.
    support: full
  platform:
    description: A node with the pifarm agent installed (the C(model_cache) role).
    support: full
    platforms: posix
notes:
  - The agent's exit codes decide the result; 0 is unchanged, 2 changed, 1 a failure whose message
    is the agent's; the current model is never left half switched.
seealso:
  - name: The node agent
    description: C(pifarm-agent model sync|remove --json), which this module runs.
    link: https://github.com/pifarm/inference#the-node-agent-and-models
"""

EXAMPLES = r"""
- name: Make the newest gemma3-270m current on the node
  pifarm.inference.model_sync:
    name: gemma3-270m
  become: true
  register: model

- name: Prefetch a version without switching to it
  pifarm.inference.model_sync:
    name: gemma3-270m
    version: 1.1.0
    state: present
  become: true

- name: Sync from an explicit store with credentials from the vault
  pifarm.inference.model_sync:
    name: gemma3-270m
    version: 1.0.0
    endpoint: "http://storage1:9000"
    bucket: models
    access_key: "{{ farm_store_node_access_key }}"
    secret_key: "{{ farm_store_node_secret_key }}"
    public_key: /etc/pifarm/model-signing.pub
  become: true
  no_log: true

- name: Remove an old version from the cache
  pifarm.inference.model_sync:
    name: gemma3-270m
    version: 1.0.0
    state: absent
  become: true
"""

RETURN = r"""
status:
  description:
    - What the agent reports. V(changed) or V(unchanged); V(served-from-cache) when the store could
      not be reached and the cached model stays.
    - In check mode, the status the real run would report.
  returned: always
  type: str
  sample: changed
message:
  description: The agent's one-line summary.
  returned: always
  type: str
  sample: "model gemma3-270m 1.1.0 (0c3b5e2a17f4) activated"
bytes_fetched:
  description: Bytes downloaded from the store by this run (0 in check mode and when nothing was fetched).
  returned: always
  type: int
  sample: 253113024
would_fetch_bytes:
  description: In check mode, the bytes the real run would download (a resumable partial download counts).
  returned: in check mode, with O(state=active) or O(state=present)
  type: int
  sample: 253113024
verify_seconds:
  description: Seconds the agent spent hashing and checking signatures.
  returned: always
  type: float
  sample: 0.84
seconds:
  description: Seconds the agent's command took.
  returned: always
  type: float
  sample: 1.27
active_version:
  description:
    - The current version after the run (in check mode, the one that would be current); null when none.
  returned: always
  type: str
  sample: 1.1.0
active_sha256:
  description: SHA-256 of the current model after the run (in check mode, of the one that would be current).
  returned: always
  type: str
  sample: a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
kept_current:
  description: With O(keep_current), true when the model had a current version that was kept.
  returned: when O(state=active)
  type: bool
  sample: true
  version_added: 0.2.0
target_version:
  description:
    - With O(state=active) or O(state=present), the version this run fetched and verified, or found
      verified in the cache (V(latest) resolved to the store's newest); null when the store could not
      be reached.
  returned: when O(state=active) or O(state=present)
  type: str
  sample: 1.1.0
  version_added: 0.2.0
previous_version:
  description: The version kept as C(previous) for rollback after the run; null when none.
  returned: always
  type: str
  sample: 1.0.0
removed_versions:
  description: With O(state=absent), the cached versions removed (in check mode, that would be removed).
  returned: when O(state=absent)
  type: list
  elements: str
  sample: ["1.0.0"]
"""

# Ansible modules import below their documentation (validate-modules: import-before-documentation).
import json
import os

from ansible.module_utils.basic import AnsibleModule

C_LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_MESSAGES": "C"}
CREDENTIAL_ENV = {"access_key": "PIFARM_S3_ACCESS_KEY", "secret_key": "PIFARM_S3_SECRET_KEY"}
# pifarm-agent's exit codes.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CHANGED = 2
EXIT_USAGE = 64
INSTALL_HINT = "install the agent with the model_cache role (pifarm.inference.model_cache), or set agent"
# Agent flags set from the options of the same name: the store's (sync only) and the cache's.
STORE_FLAGS = (("endpoint", "--endpoint"), ("bucket", "--bucket"), ("public_key", "--public-key"))
CACHE_FLAGS = (("config", "--config"), ("cache_root", "--cache-root"))


def find_agent(module: AnsibleModule) -> str:
    agent = module.params["agent"]
    if not os.path.isfile(agent):
        module.fail_json(msg=f"pifarm-agent {agent} not found: {INSTALL_HINT}")
    if not os.access(agent, os.X_OK):
        module.fail_json(msg=f"pifarm-agent {agent} is not executable: {INSTALL_HINT}")
    return agent


def build_argv(params: dict, agent: str, check_mode: bool) -> list[str]:
    """The agent's command line. Credentials are never part of it (see agent_environment)."""
    version = None if params["version"] == "latest" else params["version"]
    if params["state"] == "absent":
        argv = [agent, "model", "remove", params["name"], "--json"]
        flags = CACHE_FLAGS
    else:
        argv = [agent, "model", "sync", params["name"], "--json"]
        flags = CACHE_FLAGS + STORE_FLAGS
        if params["state"] == "present":
            argv.append("--no-activate")
        if params["allow_downgrade"]:
            argv.append("--allow-downgrade")
    if version is not None:
        argv += ["--version", version]
    for option, flag in flags:
        if params[option] is not None:
            argv += [flag, params[option]]
    if check_mode:
        argv.append("--plan")
    return argv


def agent_environment(params: dict) -> dict[str, str]:
    environment = dict(C_LOCALE)
    for option, variable in CREDENTIAL_ENV.items():
        if params[option]:
            environment[variable] = params[option]
    return environment


def run_agent(module: AnsibleModule, argv: list[str]) -> tuple[int, dict]:
    """Run the agent; fail unless it exited 0 or 2 with its JSON result."""
    verb = argv[2] if len(argv) > 2 and argv[2] in ("remove", "activate", "list") else "sync"
    what = f"{verb} model {module.params['name']}"
    rc, stdout, stderr = module.run_command(argv, environ_update=agent_environment(module.params))
    if rc == EXIT_USAGE:
        module.fail_json(
            msg=f"{what}: pifarm-agent {argv[0]} refused the command line the module built (exit 64): "
            f"{stderr.strip().splitlines()[-1] if stderr.strip() else 'no message'}; the agent and the "
            "collection are of different versions, or this is a bug in model_sync",
            rc=rc,
            cmd=argv,
            stderr=stderr,
        )
    try:
        payload = json.loads(stdout)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        module.fail_json(
            msg=f"{what}: pifarm-agent {argv[0]} printed no JSON result (exit {rc})",
            rc=rc,
            cmd=argv,
            stdout=stdout,
            stderr=stderr,
        )
    if rc == EXIT_FAILED:
        module.fail_json(
            msg=f"{what}: {payload.get('message')}", rc=rc, error=payload.get("error"), stderr=stderr
        )
    if rc not in (EXIT_OK, EXIT_CHANGED):
        module.fail_json(
            msg=f"{what}: pifarm-agent {argv[0]} ended with exit {rc}, which it does not use",
            rc=rc,
            cmd=argv,
            stdout=stdout,
            stderr=stderr,
        )
    return rc, payload


def _line(name: str, item: dict | None) -> str:
    return f"{name} {item['version']} {item['sha256']}\n" if item else ""


def sync_outcome(payload: dict, check_mode: bool) -> tuple[dict | None, dict | None, str | None]:
    """(current before, current after, previous after) of a sync or, in check mode, its plan."""
    before, previous = payload.get("from"), payload.get("previous")
    if not check_mode:
        return before, payload.get("current"), previous and previous["version"]
    if payload.get("would_switch"):
        return before, payload["to"], before and before["version"]
    return before, before, previous and previous["version"]


def remove_outcome(payload: dict, check_mode: bool) -> tuple[dict | None, dict | None, str | None]:
    """(current before, current after, previous after) of a removal or, in check mode, its plan."""
    before = payload.get("from")
    if not check_mode:
        previous = payload.get("previous")
        return before, payload.get("current"), previous and previous["version"]
    links = payload.get("removed_links", [])
    after = None if "current" in links else before
    previous = None if "previous" in links else payload.get("previous")
    return before, after, previous and previous["version"]


def cache_entries(module: AnsibleModule, agent: str) -> list[dict]:
    """The model's cached versions, each with its role (current, previous or none): the agent's listing."""
    params = module.params
    argv = [agent, "model", "list", params["name"], "--json"]
    argv += [
        arg for option, flag in CACHE_FLAGS if params[option] is not None for arg in (flag, params[option])
    ]
    _rc, payload = run_agent(module, argv)
    try:
        return payload["cache"][params["name"]]["entries"]
    except (KeyError, TypeError):
        module.fail_json(msg=f"list model {params['name']}: pifarm-agent {agent} printed no cache listing")


def activate_cached(module: AnsibleModule, agent: str) -> tuple[int, dict]:
    """``cached_only``: the agent's activate (offline), or in check mode its outcome read off the cache."""
    params = module.params
    if not module.check_mode:
        argv = [agent, "model", "activate", params["name"], params["version"], "--json"]
        # The signature is checked again before the switch, with the trusted key, not the store.
        flags = (*CACHE_FLAGS, ("public_key", "--public-key"))
        argv += [
            arg for option, flag in flags if params[option] is not None for arg in (flag, params[option])
        ]
        if params["allow_downgrade"]:
            argv.append("--allow-downgrade")
        return run_agent(module, argv)
    entries = cache_entries(module, agent)
    target = next((e for e in entries if e["version"] == params["version"]), None)
    if target is None:
        module.fail_json(msg=f"activate model {params['name']}: version {params['version']} is not cached")
    current = next((e for e in entries if e.get("role") == "current"), None)
    changed = current is None or current["sha256"] != target["sha256"]
    return (EXIT_CHANGED if changed else EXIT_OK), {
        "status": "changed" if changed else "unchanged",
        "message": f"model {params['name']} {target['version']} ({target['sha256'][:12]}) "
        + ("would be activated" if changed else "already active"),
        "version": target["version"],
        "from": current and {"version": current["version"], "sha256": current["sha256"]},
        "to": {"version": target["version"], "sha256": target["sha256"]},
        "would_switch": changed,
        "previous": current if changed else next((e for e in entries if e.get("role") == "previous"), None),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "version": {"type": "str", "default": "latest"},
            "state": {"type": "str", "choices": ["active", "present", "absent"], "default": "active"},
            "config": {"type": "path"},
            "agent": {"type": "path", "default": "/opt/pifarm/agent/bin/pifarm-agent"},
            "endpoint": {"type": "str"},
            "bucket": {"type": "str"},
            "access_key": {"type": "str", "no_log": True},
            "secret_key": {"type": "str", "no_log": True},
            "public_key": {"type": "path"},
            "cache_root": {"type": "path"},
            "allow_downgrade": {"type": "bool", "default": False},
            "keep_current": {"type": "bool", "default": False},
            "cached_only": {"type": "bool", "default": False},
        },
        mutually_exclusive=[("keep_current", "cached_only")],
        supports_check_mode=True,
    )
    params = module.params
    agent = find_agent(module)
    if params["cached_only"] and (params["state"] != "active" or params["version"] == "latest"):
        module.fail_json(
            msg=f"model {params['name']}: cached_only makes a named cached version current: it needs "
            f"state=active and a version, not state={params['state']} version={params['version']}"
        )
    kept_current = (
        params["state"] == "active"
        and params["keep_current"]
        and any(entry.get("role") == "current" for entry in cache_entries(module, agent))
    )
    argv_params = {**params, "state": "present"} if kept_current else params
    if params["cached_only"]:
        rc, payload = activate_cached(module, agent)
    else:
        rc, payload = run_agent(module, build_argv(argv_params, agent, module.check_mode))

    if params["state"] == "absent":
        before, after, previous_version = remove_outcome(payload, module.check_mode)
    else:
        before, after, previous_version = sync_outcome(payload, module.check_mode)
    result = {
        "changed": rc == EXIT_CHANGED,
        "status": payload["status"],
        "message": payload["message"],
        "bytes_fetched": payload.get("bytes_fetched", 0),
        "verify_seconds": payload.get("verify_seconds", 0.0),
        "seconds": payload.get("seconds", 0.0),
        "active_version": after and after["version"],
        "active_sha256": after and after["sha256"],
        "previous_version": previous_version,
    }
    if params["state"] == "absent":
        result["removed_versions"] = [entry["version"] for entry in payload.get("removed", [])]
    else:
        result["target_version"] = payload.get("version")
    if params["state"] == "active":
        result["kept_current"] = kept_current
    if params["state"] != "absent" and module.check_mode:
        result["would_fetch_bytes"] = payload.get("would_fetch_bytes", 0)
    if payload["status"] == "served-from-cache":
        module.warn(payload["message"])
    if module._diff:
        result["diff"] = {
            "before": _line(params["name"], before),
            "after": _line(params["name"], after),
            "before_header": f"{params['name']} current (before)",
            "after_header": f"{params['name']} current (after)",
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
