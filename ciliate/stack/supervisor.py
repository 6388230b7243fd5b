"""``ciliate up``: start NATS, migrate SQLite, run every service as its own process, supervise.

Children are restarted with a backoff when they die; Ctrl-C (or SIGTERM) stops them all,
then NATS. Everything lives in the state directory: data, logs, the client context.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciliate import natsconf
from ciliate.bus.subjects import SERVICES
from ciliate.client.context import ClientContext
from ciliate.stack.nats import NatsServer
from ciliate.stack.ports import free_port
from ciliate.store.database import sqlite_url
from ciliate.store.migrate import upgrade

log = logging.getLogger("ciliate.up")

PER_NODE = ("datapath", "security")
"""Agents that run once per node and need root."""


@dataclass
class Child:
    service: str
    replica: str
    node: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class StackConfig:
    state_dir: Path
    nodes: int = 1
    replicas: Mapping[str, int] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    db_url: str | None = None
    agents: bool = True
    """Start the per-node agents (they need root; skipped with a note otherwise)."""
    nats_auth: bool = True
    """One NATS user per service with the subject permissions of ``infra/nats`` (from ACCESS)."""


def load_token(state_dir: Path) -> str:
    """The stack's bearer token, generated once and kept (mode 0600) in the state dir."""
    path = state_dir / "token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token


def node_names(count: int) -> list[str]:
    return [f"node-{i}" for i in range(1, count + 1)]


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.nats = NatsServer(self.state_dir)
        self.db_url = config.db_url or sqlite_url(self.state_dir / "ciliate.db")
        self.token = ""
        self.children: list[Child] = []
        self.skipped: dict[str, str] = {}
        self.nodes = node_names(config.nodes)
        self.nats_passwords: dict[str, str] = {}

    def plan(self) -> list[Child]:
        children = []
        for service in self.config.services:
            if service in PER_NODE:
                if not self.config.agents:
                    self.skipped[service] = "agents disabled (--no-agents)"
                    continue
                if os.geteuid() != 0:
                    self.skipped[service] = "needs root (BPF, network namespaces)"
                    continue
                for node in self.nodes:
                    children.append(Child(service, node, node, free_port()))
            else:
                for i in range(int(self.config.replicas.get(service, 1))):
                    children.append(Child(service, f"r{i + 1}", self.nodes[0], free_port()))
        return children

    def start(self) -> ClientContext:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        self.token = load_token(self.state_dir)
        if self.config.nats_auth:
            self.nats_passwords = {user: secrets.token_urlsafe(24) for user in natsconf.users()}
            self.nats.config_text = natsconf.render(
                passwords=self.nats_passwords,
                store_dir=str(self.state_dir / "nats"),
                port=self.nats.port,
                monitor_port=free_port(),
            )
        self.nats.start()
        upgrade(self.db_url)
        self.children = self.plan()
        context = ClientContext(
            state_dir=str(self.state_dir),
            nats_url=self.nats.url,
            token=self.token,
            db_url=self.db_url,
            services={},
            nodes=self.nodes,
            pid=os.getpid(),
            nats_user=natsconf.CLI_USER if self.nats_passwords else None,
            nats_password=self.nats_passwords.get(natsconf.CLI_USER),
        )
        for child in self.children:
            context.services.setdefault(child.service, []).append(child.url)
            self._spawn(child)
        context.save()
        return context

    def _env(self, child: Child) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CILIATE_NATS_URL=self.nats.url,
            CILIATE_DB_URL=self.db_url,
            CILIATE_TOKEN=self.token,
            CILIATE_STATE_DIR=str(self.state_dir),
            CILIATE_NODE=child.node,
            CILIATE_REPLICA=child.replica,
            CILIATE_HTTP_PORT=str(child.port),
            CILIATE_DEV_MODE="1",
            CILIATE_NODES=",".join(self.nodes),
            CILIATE_LOG_FORMAT="json",
        )
        if self.nats_passwords:
            env.update(CILIATE_NATS_USER=child.service,
                       CILIATE_NATS_PASSWORD=self.nats_passwords[child.service])
        return env

    def _spawn(self, child: Child) -> None:
        logfile = self.state_dir / "logs" / f"{child.service}-{child.replica}.log"
        out = open(logfile, "ab")  # noqa: SIM115 - handed to the child
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "ciliate", "run", child.service],
            env=self._env(child),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()

    def ready(self) -> dict[str, bool]:
        """Each child's ``/readyz`` answer, keyed ``service/replica``."""
        result = {}
        for child in self.children:
            ok = False
            try:
                with urllib.request.urlopen(child.url + "/readyz", timeout=1) as resp:
                    ok = resp.status == 200 and bool(json.loads(resp.read()).get("ready"))
            except (urllib.error.URLError, OSError, ValueError):
                ok = False
            result[f"{child.service}/{child.replica}"] = ok
        return result

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.ready().values()):
                return True
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(
                        f"{child.service}/{child.replica} exited with {child.proc.returncode}; "
                        f"see {self.state_dir / 'logs' / f'{child.service}-{child.replica}.log'}"
                    )
            time.sleep(0.1)
        return False

    def supervise_once(self) -> list[str]:
        """Restart children that died (exponential backoff, at most 30 s). Returns restarts."""
        restarted = []
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.next_start == 0.0:
                child.next_start = now + min(30.0, 0.5 * (2 ** child.restarts))
                log.warning("%s/%s exited with %s; restarting", child.service, child.replica,
                            child.proc.returncode)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._spawn(child)
                restarted.append(f"{child.service}/{child.replica}")
        return restarted

    def stop(self, timeout: float = 15.0) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        self.nats.stop()
        path = ClientContext.path_for(self.state_dir)
        if path.exists():
            path.unlink()

    def summary(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "nats": self.nats.url,
            "database": self.db_url,
            "nodes": self.nodes,
            "services": {c.service + "/" + c.replica: c.url for c in self.children},
            "skipped": self.skipped,
            "context": str(ClientContext.path_for(self.state_dir)),
        }


def run_foreground(
    stack: Stack,
    out: Callable[[str], None],
    ready_timeout: float = 60.0,
    on_ready: Callable[[ClientContext], None] | None = None,
) -> int:
    """Start, report, supervise until SIGINT/SIGTERM, then stop everything."""
    stopping = {"flag": False}

    def handle(_sig: int, _frame: object) -> None:
        stopping["flag"] = True

    old_int = signal.signal(signal.SIGINT, handle)
    old_term = signal.signal(signal.SIGTERM, handle)
    try:
        started = time.monotonic()
        context = stack.start()
        ok = stack.wait_ready(ready_timeout)
        info = stack.summary()
        out(f"ciliate: {'ready' if ok else 'NOT ready'} in {time.monotonic() - started:.1f}s")
        out(f"  state dir  {info['state_dir']}")
        out(f"  NATS       {info['nats']}")
        out(f"  database   {info['database']}")
        out(f"  nodes      {', '.join(info['nodes'])}")
        for name, url in info["services"].items():
            out(f"  {name:<22} {url}")
        for name, why in info["skipped"].items():
            out(f"  {name:<22} skipped: {why}")
        out(f"  context    {info['context']} (export CILIATE_STATE_DIR={info['state_dir']})")
        if ok and on_ready is not None:
            on_ready(context)
        out("Try: ciliate status; ciliate apply -f FILE. Ctrl-C stops everything.")
        while not stopping["flag"]:
            stack.supervise_once()
            time.sleep(0.2)
        return 0 if ok else 1
    finally:
        out("ciliate: stopping")
        stack.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
