"""Render the NATS server configuration (JetStream, one user per service) from ``ACCESS``.

Permissions are derived, never hand-written: a service may publish and subscribe to exactly
what ``ciliate.bus.subjects.ACCESS`` grants it, plus the JetStream API subjects its KV buckets
need. ``python -m ciliate.natsconf > infra/nats/nats-server.conf`` regenerates the committed
file; a test keeps the two equal.

Conventions the permissions rely on:
- Heartbeat and node keys start with the writing service's name: ``<service>.<instance>`` in
  the ``heartbeats`` bucket and ``<service>.<node>`` in ``nodes``.
- Replies travel on ``_INBOX.>`` (nats-py's default inbox prefix); services that answer requests
  get ``allow_responses`` instead of a blanket publish right on inboxes.
- Passwords are NATS variable references (``$CILIATE_NATS_PASSWORD_<USER>``), resolved by the
  server from its environment, so the committed file holds no secret.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ciliate.bus.subjects import (
    ACCESS,
    FLOWS_ALL,
    IDENTITY_LOOKUP,
    PROCESS_ALL,
    Access,
    Bucket,
)

INBOX = "_INBOX.>"
JS_ACCOUNT_INFO = "$JS.API.INFO"
# Buckets where each service may write keys prefixed with its own name.
SELF_KEYED_BUCKETS = (Bucket.HEARTBEATS, Bucket.NODES)

CLI_USER = "cli"
CLI_ACCESS = Access(
    publish=frozenset({IDENTITY_LOOKUP}),
    subscribe=frozenset({FLOWS_ALL, PROCESS_ALL}),
    kv_read=frozenset(Bucket),
)
"""The operator's CLI: reads every bucket, follows the event streams, may look identities up."""


def env_password(user: str) -> str:
    """The NATS variable reference a user's password is read from."""
    return f"$CILIATE_NATS_PASSWORD_{user.upper().replace('-', '_')}"


def stream(bucket: Bucket) -> str:
    """The JetStream stream behind a KV bucket."""
    return f"KV_{bucket.value}"


def kv_read_subjects(bucket: Bucket) -> set[str]:
    """JetStream API subjects to open, get from and watch a bucket (nats-py's KV client).

    Opening a bucket may create it (``Bus.kv`` creates with the configuration defined in code;
    creating an existing bucket with the same configuration is a no-op), so readers may too.
    """
    s = stream(bucket)
    return {
        f"$JS.API.STREAM.INFO.{s}",
        f"$JS.API.STREAM.CREATE.{s}",
        f"$JS.API.STREAM.MSG.GET.{s}",
        f"$JS.API.DIRECT.GET.{s}",
        f"$JS.API.DIRECT.GET.{s}.>",
        f"$JS.API.CONSUMER.CREATE.{s}",
        f"$JS.API.CONSUMER.CREATE.{s}.>",
        f"$JS.API.CONSUMER.INFO.{s}.>",
        f"$JS.API.CONSUMER.DELETE.{s}.>",
        f"$JS.FC.{s}.>",
        f"$JS.ACK.{s}.>",
    }


def kv_write_subjects(bucket: Bucket, key: str = ">") -> set[str]:
    """Subjects to put, delete and purge keys (all of them, or those under ``key``)."""
    s = stream(bucket)
    return {
        f"$KV.{bucket.value}.{key}",
        f"$JS.API.STREAM.UPDATE.{s}",
        f"$JS.API.STREAM.PURGE.{s}",
    }


@dataclass(frozen=True)
class Permissions:
    """One NATS user's rights, sorted for a stable rendering."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool


def permissions(service: str, access: Access) -> Permissions:
    """Everything ``service`` may do on the bus, derived from its ``Access`` entry."""
    publish: set[str] = set(access.publish) | {JS_ACCOUNT_INFO}
    subscribe: set[str] = set(access.subscribe) | {INBOX}
    for bucket in access.kv_read | access.kv_write:
        publish |= kv_read_subjects(bucket)
    for bucket in access.kv_write:
        publish |= kv_write_subjects(bucket)
    if service != CLI_USER:
        for bucket in SELF_KEYED_BUCKETS:
            if bucket not in access.kv_write:
                publish |= kv_read_subjects(bucket)
                publish.add(f"$KV.{bucket.value}.{service}.>")
    return Permissions(
        publish=tuple(sorted(publish)),
        subscribe=tuple(sorted(subscribe)),
        allow_responses=bool(access.subscribe),
    )


def users(access: Mapping[str, Access] = ACCESS) -> dict[str, Permissions]:
    """Every NATS user: one per service, then the CLI."""
    table = {service: permissions(service, entry) for service, entry in sorted(access.items())}
    table[CLI_USER] = permissions(CLI_USER, CLI_ACCESS)
    return table


def _value(text: str) -> str:
    """A NATS config value: variable references bare, everything else JSON-quoted."""
    is_reference = text.startswith("$") and text[1:].replace("_", "").isalnum()
    return text if is_reference else json.dumps(text)


def _subject_list(subjects: tuple[str, ...], indent: str) -> list[str]:
    return [f"{indent}{json.dumps(subject)}" for subject in subjects]


def render(
    access: Mapping[str, Access] = ACCESS,
    passwords: Mapping[str, str] | None = None,
    *,
    store_dir: str = "/data/jetstream",
    port: int = 4222,
    monitor_port: int = 8222,
) -> str:
    """The full server configuration text; ``passwords`` default to env variable references."""
    table = users(access)
    secret = dict(passwords) if passwords is not None else {u: env_password(u) for u in table}
    lines = [
        "# Generated by `python -m ciliate.natsconf` from ciliate.bus.subjects.ACCESS.",
        "# Do not edit by hand: change ACCESS and regenerate.",
        f"port: {port}",
        f"http_port: {monitor_port}",
        "",
        "jetstream {",
        f"  store_dir: {json.dumps(store_dir)}",
        "}",
        "",
        "authorization {",
        "  users: [",
    ]
    for user, perms in table.items():
        lines += [
            "    {",
            f"      user: {json.dumps(user)}",
            f"      password: {_value(secret[user])}",
            "      permissions: {",
            "        publish: {",
            "          allow: [",
            *_subject_list(perms.publish, "            "),
            "          ]",
            "        }",
            "        subscribe: {",
            "          allow: [",
            *_subject_list(perms.subscribe, "            "),
            "          ]",
            "        }",
        ]
        if perms.allow_responses:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
