"""The CNI protocol (spec 1.0.0), pure: environment + stdin in, result or error JSON out.

The runtime runs the plugin with ``CNI_COMMAND`` (ADD, DEL, CHECK, VERSION), ``CNI_CONTAINERID``,
``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` (``K8S_POD_NAMESPACE=..;K8S_POD_NAME=..``) and
``CNI_PATH`` in the environment and the network configuration as JSON on stdin. Success prints
a result (ADD) or nothing (DEL, CHECK); failure prints the spec's error object and exits non-zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")


class Command(StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"


class ErrorCode(IntEnum):
    """The spec's well-known error codes (0-99 are reserved by the spec)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11


class CniError(Exception):
    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, version: str = CNI_VERSION) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": int(self.code), "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


@dataclass(frozen=True)
class AgentConfig:
    """Where the node's datapath agent listens (network config key ``agent``)."""

    url: str = "http://127.0.0.1:9890"
    token_file: str = ""
    timeout: float = 30.0


@dataclass(frozen=True)
class Invocation:
    command: Command
    cni_version: str
    network: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    args: dict[str, str] = field(default_factory=dict)
    agent: AgentConfig = AgentConfig()

    def agent_request(self) -> dict[str, str]:
        """The body of ``POST /v1/cni/add`` and ``/v1/cni/del`` (docs/k8s.md)."""
        return {"containerID": self.container_id, "netns": self.netns, "ifName": self.ifname,
                "podNamespace": self.pod_namespace, "podName": self.pod_name}


def parse_cni_args(raw: str) -> dict[str, str]:
    """``IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=y`` -> dict."""
    out: dict[str, str] = {}
    for part in raw.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _agent_config(network: Mapping[str, Any]) -> AgentConfig:
    raw = network.get("agent", {})
    if not isinstance(raw, dict):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "agent must be an object")
    url = raw.get("url", AgentConfig.url)
    token_file = raw.get("tokenFile", "")
    timeout = raw.get("timeout", AgentConfig.timeout)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG,
                       f"agent.url must be an http(s) URL: {url!r}")
    if not isinstance(token_file, str):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "agent.tokenFile must be a string")
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "agent.timeout must be a positive number")
    return AgentConfig(url.rstrip("/"), token_file, float(timeout))


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, f"bad cniVersion {version!r}") from None


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Check the environment and network config the way the spec requires for each command."""
    raw_command = env.get("CNI_COMMAND", "")
    try:
        command = Command(raw_command)
    except ValueError:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       f"CNI_COMMAND must be one of {', '.join(Command)}, got {raw_command!r}"
                       ) from None
    try:
        network = json.loads(stdin.decode("utf-8")) if stdin.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CniError(ErrorCode.DECODE_FAILURE, "network configuration is not JSON",
                       str(exc)) from None
    if not isinstance(network, dict):
        raise CniError(ErrorCode.DECODE_FAILURE, "network configuration must be a JSON object")
    version = network.get("cniVersion", CNI_VERSION if command is Command.VERSION else "")
    if not isinstance(version, str) or not version:
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "cniVersion is required")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION,
                       f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if command is Command.VERSION:
        return Invocation(command, version, network)
    if command is Command.CHECK and _version_tuple(version) < (0, 4, 0):
        raise CniError(ErrorCode.INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later")
    required = ["CNI_CONTAINERID", "CNI_IFNAME"]
    if command is not Command.DEL:
        required.append("CNI_NETNS")  # DEL may come after the namespace is gone
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"missing {', '.join(missing)}")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    namespace, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if command is Command.ADD and not (namespace and name):
        raise CniError(ErrorCode.INVALID_ENVIRONMENT,
                       "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME")
    return Invocation(command, version, network, env["CNI_CONTAINERID"], env.get("CNI_NETNS", ""),
                      env["CNI_IFNAME"], namespace, name, args, _agent_config(network))


def version_document(version: str = CNI_VERSION) -> dict[str, Any]:
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def result_document(reply: Mapping[str, Any], version: str) -> dict[str, Any]:
    """The agent's ``/v1/cni/add`` reply as the spec's ADD result for ``version``.

    ``ips[].interface`` indexes ``interfaces``; the agent names the interface of each address.
    """
    interfaces = [dict(i) for i in reply.get("interfaces") or []]
    names = [i.get("name") for i in interfaces]
    ips = []
    for ip in reply.get("ips") or []:
        entry: dict[str, Any] = {"address": ip["address"]}
        if ip.get("gateway"):
            entry["gateway"] = ip["gateway"]
        if ip.get("interface") in names:
            entry["interface"] = names.index(ip["interface"])
        if _version_tuple(version) < (1, 0, 0):
            entry["version"] = "6" if ":" in ip["address"] else "4"
        ips.append(entry)
    return {"cniVersion": version, "interfaces": interfaces, "ips": ips,
            "routes": [dict(r) for r in reply.get("routes") or []], "dns": {}}


def error_for_status(status: int, detail: str) -> CniError:
    """Map the agent's HTTP answer to the spec's error code."""
    if status == 404:
        return CniError(ErrorCode.UNKNOWN_CONTAINER, detail)
    if status in (400, 422):
        return CniError(ErrorCode.INVALID_NETWORK_CONFIG, detail)
    if status in (409, 429, 502, 503, 504):
        return CniError(ErrorCode.TRY_AGAIN_LATER, detail)
    return CniError(ErrorCode.IO_FAILURE, f"agent answered {status}: {detail}")
