"""``ciliate-cni``: the CNI plugin binary the kubelet's runtime runs for each pod sandbox.

Stateless and short-lived: it parses the spec's environment and stdin, asks the node's datapath
agent over REST (``agent.url`` in the network config, bearer token from ``agent.tokenFile``)
to wire or unwire the sandbox, and prints the spec's result or error JSON on stdout. Install
it in ``/opt/cni/bin`` as the config's ``type`` (see infra/k8s/ and docs/k8s.md).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from services.datapath.cni.core.invocation import (
    CNI_VERSION,
    CniError,
    Command,
    ErrorCode,
    Invocation,
    error_for_status,
    parse_invocation,
    result_document,
    version_document,
)


def _call(inv: Invocation, method: str, path: str, body: Any = None) -> Any:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if inv.agent.token_file:
        try:
            token = Path(inv.agent.token_file).read_text().strip()
        except OSError as exc:
            raise CniError(ErrorCode.IO_FAILURE, f"agent token: {exc}") from None
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(inv.agent.url + path, data=data, headers=headers,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=inv.agent.timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            problem = json.loads(raw)
            detail = str(problem.get("detail") or problem.get("title") or raw.decode())
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")
        raise error_for_status(exc.code, detail) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CniError(ErrorCode.TRY_AGAIN_LATER,
                       f"datapath agent at {inv.agent.url} is not answering", str(exc)) from None


def run(env: Mapping[str, str], stdin: bytes) -> dict[str, Any] | None:
    """One invocation; returns the document to print (None: print nothing)."""
    inv = parse_invocation(env, stdin)
    if inv.command is Command.VERSION:
        return version_document(inv.cni_version)
    if inv.command is Command.ADD:
        reply = _call(inv, "POST", "/v1/cni/add", inv.agent_request())
        return result_document(reply, inv.cni_version)
    if inv.command is Command.DEL:
        _call(inv, "POST", "/v1/cni/del", inv.agent_request())
        return None
    query = urllib.parse.urlencode({k: v for k, v in inv.agent_request().items() if v})
    _call(inv, "GET", f"/v1/cni/check?{query}")
    return None


def main(env: Mapping[str, str] | None = None, stdin: IO[bytes] | None = None,
         stdout: IO[str] | None = None) -> int:
    env = os.environ if env is None else env
    out = stdout or sys.stdout
    raw = (stdin or sys.stdin.buffer).read()
    try:
        doc = run(env, raw)
    except CniError as exc:
        try:
            version = str(json.loads(raw).get("cniVersion") or CNI_VERSION)
        except (ValueError, AttributeError):
            version = CNI_VERSION
        json.dump(exc.document(version), out)
        out.write("\n")
        return 1
    if doc is not None:
        json.dump(doc, out)
        out.write("\n")
    return 0


def console() -> None:
    """Console-script entry point: ``ciliate-cni``."""
    sys.exit(main())


if __name__ == "__main__":
    console()
