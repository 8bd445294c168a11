#!/usr/bin/python
"""Ansible module: keep a mosquitto password file in step with a list of users, idempotently.

mosquitto_passwd salts every hash, so rebuilding the file on each run would always report a change.
This module verifies each existing hash against the wanted password ($7$ PBKDF2-SHA512 or $6$ SHA512,
the formats mosquitto 2.x reads) and rebuilds the file only when a user is missing, extra or has a new
password. The hashes are made by mosquitto_passwd itself (``-U`` on a 0600 temp file, so no password
ever appears on a command line), and the new file replaces the old one atomically.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: mosquitto_passwd_file
short_description: Keep a mosquitto password file in step with a list of users
description:
  - Verifies existing hashes and rebuilds the file with mosquitto_passwd -U only when it must.
options:
  path:
    description: The password file.
    type: path
    required: true
  users:
    description: Users, each a dict with C(username) and C(password).
    type: list
    elements: dict
    required: true
  mosquitto_passwd:
    description: The mosquitto_passwd binary.
    type: path
    default: mosquitto_passwd
extends_documentation_fragment: [files]
"""


def _verify(stored: str, password: str) -> bool:
    parts = stored.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(digest))
            return hmac.compare_digest(got, digest)
        if len(parts) == 4 and parts[1] == "6":
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode("utf-8") + salt).digest()
            return hmac.compare_digest(got, digest)
    except (ValueError, TypeError):
        return False
    return False


def _read(path: str) -> dict[str, str] | None:
    if not os.path.exists(path):
        return None
    entries: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                user, _, stored = line.partition(":")
                entries[user] = stored
    return entries


def _in_step(existing: dict[str, str] | None, wanted: dict[str, str]) -> bool:
    if existing is None or set(existing) != set(wanted):
        return False
    return all(_verify(existing[user], password) for user, password in wanted.items())


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {"type": "list", "elements": "dict", "required": True, "no_log": True},
            "mosquitto_passwd": {"type": "path", "default": "mosquitto_passwd"},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path: str = module.params["path"]
    wanted: dict[str, str] = {}
    for entry in module.params["users"]:
        user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if not user or ":" in user or any(c.isspace() for c in user):
            module.fail_json(msg=f"invalid mosquitto username {user!r}: empty, or holds ':' or whitespace")
        if not password or "\n" in password:
            module.fail_json(msg=f"user {user!r} has an empty or multi-line password; refusing (no defaults)")
        if user in wanted:
            module.fail_json(msg=f"user {user!r} is listed twice")
        wanted[user] = password

    changed = not _in_step(_read(path), wanted)
    if changed and not module.check_mode:
        binary = module.get_bin_path(module.params["mosquitto_passwd"], required=True)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".passwd-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:  # mkstemp made it 0600
                fh.writelines(f"{user}:{password}\n" for user, password in sorted(wanted.items()))
            rc, _out, err = module.run_command([binary, "-U", tmp])
            if rc != 0:
                module.fail_json(msg=f"mosquitto_passwd -U failed (rc {rc}): {err.strip()}")
            os.replace(tmp, path)  # same directory: atomic, and the file stays 0600 until chmod below
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    file_args = module.load_file_common_arguments(module.params)
    if not module.check_mode or os.path.exists(path):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, path=path, users=sorted(wanted))


if __name__ == "__main__":
    main()
