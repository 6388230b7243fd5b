#!/usr/bin/env python3
"""Run the network-policy conformance cases against a live cluster (kubectl on PATH).

Creates the world (namespaces x, y, z; pods a, b, c serving TCP/UDP 80/81 with agnhost, as the
Kubernetes e2e suite does), then for each case applies its policies, probes every ordered pod
pair with ``agnhost connect`` for each port/protocol of the expected matrix, compares with
``expected/<case>.json`` ({"PORT/PROTO": {"src": {"dst": bool}}}; self traffic is not judged),
and deletes the policies. Exits non-zero listing every mismatch. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.43"
PORTS = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]


def kubectl(ctx: str, *args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--context", ctx, *args], input=stdin, text=True,
                          capture_output=True, check=check)


def world(ctx: str) -> list[str]:
    pods = []
    docs = []
    for ns in ("x", "y", "z"):
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": ns, "labels": {"ns": ns, "kubernetes.io/metadata.name": ns}}})
        for name in ("a", "b", "c"):
            containers = [{
                "name": f"cont-{port}-{proto.lower()}", "image": AGNHOST,
                "args": ["serve-hostname", f"--{proto.lower()}", "--http=false", "--port",
                         str(port)],
                "ports": [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port,
                           "protocol": proto}]} for port, proto in PORTS]
            docs.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                         "spec": {"containers": containers, "terminationGracePeriodSeconds": 0}})
            pods.append(f"{ns}/{name}")
    kubectl(ctx, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))
    for ns in ("x", "y", "z"):
        kubectl(ctx, "-n", ns, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=300s")
    return pods


def pod_ips(ctx: str, pods: list[str]) -> dict[str, str]:
    out = {}
    for ref in pods:
        ns, name = ref.split("/")
        out[ref] = kubectl(ctx, "-n", ns, "get", "pod", name, "-o",
                           "jsonpath={.status.podIP}").stdout.strip()
    return out


def probe(ctx: str, src: str, ip: str, port: int, proto: str) -> bool:
    ns, name = src.split("/")
    result = kubectl(ctx, "-n", ns, "exec", name, "-c", f"cont-{port}-{proto.lower()}", "--",
                     "/agnhost", "connect", f"{ip}:{port}", "--timeout=3s",
                     f"--protocol={proto.lower()}", check=False)
    return result.returncode == 0


def run_case(ctx: str, case: Path, expected: dict[str, dict[str, dict[str, bool]]],
             ips: dict[str, str]) -> list[str]:
    kubectl(ctx, "apply", "-f", str(case))
    time.sleep(2)  # policy propagation to every node: no status to wait on across the cluster
    problems = []
    try:
        jobs = [(key, src, dst, want) for key, matrix in expected.items()
                for src, row in matrix.items() for dst, want in row.items() if src != dst]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda j: probe(ctx, j[1], ips[j[2]], int(j[0].split("/")[0]),
                                                j[0].split("/")[1]), jobs))
        for (key, src, dst, want), have in zip(jobs, got, strict=True):
            if have != want:
                problems.append(f"{case.stem} {key} {src} -> {dst}: expected "
                                f"{'allowed' if want else 'denied'}, got "
                                f"{'allowed' if have else 'denied'}")
    finally:
        kubectl(ctx, "delete", "-f", str(case), "--ignore-not-found", check=False)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args()
    pods = world(args.context)
    ips = pod_ips(args.context, pods)
    problems = []
    for case in sorted((args.dir / "cases").glob("*.yaml")):
        expected = json.loads((args.dir / "expected" / f"{case.stem}.json").read_text())
        found = run_case(args.context, case, expected, ips)
        print(f"{case.stem}: {'ok' if not found else f'{len(found)} mismatches'}")
        problems += found
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
