"""Security agent benchmark (root): exec overhead, per-openat cost of an in-kernel filter, and
events delivered over NATS with every loss accounted for.

    .venv/bin/python bench/security/run.py [--execs 2000] [--opens 1000000] [--rounds 3]

1. execs/s of a fork+exec loop of /bin/true (a small C driver) inside a benchmark cgroup:
   agent off; lifecycle programs on with events built in a consumer thread; plus a
   non-matching Sigkill policy (kill-tmp-exec: nothing here runs from /tmp).
2. ns per openat+close of a tight C loop: no program; an empty program on
   syscalls/sys_enter_openat (the floor of any hook there); a TracingPolicy on the same
   tracepoint whose Prefix filter never matches. Added cost = mode - no program.
3. The service in-process with a real nats-server: exec storm, events/s received by a
   subscriber on process.<node>, and received + reported lost == expected.

Goals: exec overhead with events on <= 10%; added openat cost of the non-matching filter
<= 1.5x the added cost of the empty program.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ciliate.stack.nats import NatsServer  # noqa: E402
from services.security.core.events import EventBuilder  # noqa: E402
from services.security.loader import Loader, boot_wall_ns  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/unified/ciliate")
EXAMPLES = REPO.parent / "shared" / "examples"

DRIVER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    /* argv: cgroup.procs path, mode ("exec" | "open"), count */
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%d", getpid());
    fclose(f);
    long n = atol(argv[3]);
    double t0 = now();
    if (strcmp(argv[2], "exec") == 0) {
        for (long i = 0; i < n; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                execl("/bin/true", "true", (char *)0);
                _exit(127);
            }
            int status;
            waitpid(pid, &status, 0);
        }
    } else {
        for (long i = 0; i < n; i++) {
            int fd = openat(AT_FDCWD, "/etc/hostname", O_RDONLY);
            if (fd >= 0)
                close(fd);
        }
    }
    printf("%.9f\n", now() - t0);
    return 0;
}
"""

EMPTY_PROGRAM = b"TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return 0; }"

NON_MATCHING_OPENAT = {
    "apiVersion": "cilium.io/v1alpha1",
    "kind": "TracingPolicy",
    "metadata": {"name": "bench-openat"},
    "spec": {"tracepoints": [{
        "subsystem": "syscalls", "event": "sys_enter_openat",
        "args": [{"index": 6, "type": "string"}],
        "selectors": [{"matchArgs": [{"index": 6, "operator": "Prefix",
                                      "values": ["/nonexistent/"]}],
                       "matchActions": [{"action": "Post"}]}],
    }]},
}


def build_driver(workdir: Path) -> Path:
    src = workdir / "driver.c"
    src.write_text(DRIVER_C)
    binary = workdir / "driver"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(src)], check=True)
    return binary


@contextlib.contextmanager
def cgroup(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        with contextlib.suppress(OSError):
            path.rmdir()


def drive(driver: Path, cg: Path, mode: str, count: int) -> float:
    out = subprocess.run([str(driver), str(cg / "cgroup.procs"), mode, str(count)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout)


class Consumer:
    """Polls the loader in a thread and builds Tetragon events, as the agent does."""

    def __init__(self, loader_cg: Path) -> None:
        self.builder = EventBuilder("bench", boot_wall_ns())
        self.events = 0
        self.loader = Loader(cgroup_subtree=loader_cg, on_record=self._on_record)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_record(self, record: Any) -> None:
        self.events += len(self.builder.handle(record))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.loader.poll(50)

    def start(self) -> None:
        self.loader.start()
        self._thread.start()

    def load(self, doc: dict[str, Any]) -> None:
        loaded = self.loader.load_policy(doc)
        self.builder.policies[loaded.policy_id] = loaded.info

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.loader.close()


def best(rounds: int, fn: Callable[[], float]) -> float:
    """The fastest of several rounds: other processes on this shared machine only add time."""
    return min(fn() for _ in range(rounds))


def exec_rates(driver: Path, cg: Path, execs: int, rounds: int) -> dict[str, float]:
    def rate() -> float:
        return execs / best(rounds, lambda: drive(driver, cg, "exec", execs))

    out = {"agent off": rate()}
    consumer = Consumer(cg)
    consumer.start()
    try:
        out["process events"] = rate()
        consumer.load(yaml.safe_load((EXAMPLES / "tracingpolicy-kill-tmp-exec.yaml").read_text()))
        out["process events + non-matching Sigkill policy"] = rate()
    finally:
        consumer.close()
    return out


def openat_costs(driver: Path, cg: Path, opens: int, rounds: int) -> dict[str, float]:
    from bcc import BPF

    def ns() -> float:
        return best(rounds, lambda: drive(driver, cg, "open", opens)) / opens * 1e9

    out = {"no program": ns()}
    empty = BPF(text=EMPTY_PROGRAM)
    try:
        out["empty program"] = ns()
    finally:
        empty.cleanup()
    consumer = Consumer(cg)
    consumer.start()
    try:
        out["lifecycle programs only"] = ns()
        consumer.load(NON_MATCHING_OPENAT)
        out["non-matching filter"] = ns()
    finally:
        consumer.close()
    return out


async def delivery(execs: int, tmp: Path, db_url: str) -> dict[str, float]:
    """Events/s through the real service and NATS; every missing event must be reported."""
    from ciliate.bus import Bus
    from ciliate.bus.subjects import process
    from ciliate.config import Settings
    from ciliate.runner import run_service
    from services.security.service import SPEC

    nats = NatsServer(tmp / "nats")
    nats.start()
    node = f"bench-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    settings = Settings(nats_url=nats.url, db_url=db_url, node=node, state_dir=tmp)
    task = asyncio.create_task(run_service(SPEC, settings, stop))
    bus = await Bus.connect(nats.url, name="bench")
    received = {"true_exec": 0, "events": 0, "lost": 0}
    first_last = [0.0, 0.0]
    expected = 2 * execs + 1  # exec + exit of each child, exit of the driver
    complete = asyncio.Event()

    async def on_batch(batch: Any) -> None:
        now = time.monotonic()
        if not first_last[0]:
            first_last[0] = now
        first_last[1] = now
        received["events"] += len(batch["items"])
        received["lost"] += batch["lost"]
        received["true_exec"] += sum(
            1 for e in batch["items"]
            if e.get("process_exec", {}).get("process", {}).get("binary") == "/bin/true")
        if received["events"] + received["lost"] >= expected:
            complete.set()

    subtree = CGROUP_ROOT / node
    try:
        warm: list[Any] = []

        async def on_warm(batch: Any) -> None:
            warm.extend(batch["items"])

        sub = await bus.subscribe(process(node), on_warm)
        deadline = time.monotonic() + 60
        while not warm:  # ready once an exec in the subtree comes back as an event
            assert time.monotonic() < deadline and not task.done(), "agent did not start"
            if subtree.is_dir():
                with cgroup(subtree / "bench.warmup") as cg:
                    await asyncio.to_thread(
                        subprocess.run, ["/bin/sh", "-c", f"echo $$ > {cg}/cgroup.procs; "
                                         "/bin/true"], check=True)
            await asyncio.sleep(0.2)
        await sub.unsubscribe()
        await bus.subscribe(process(node), on_batch)
        driver = build_driver(tmp)
        with cgroup(subtree / "bench.storm") as cg:
            took = await asyncio.to_thread(drive, driver, cg, "exec", execs)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(complete.wait(), 30)
        span = max(first_last[1] - first_last[0], took)
        return {"execs/s offered": execs / took, "events received": received["events"],
                "events reported lost": received["lost"], "events expected": expected,
                "events/s delivered": received["events"] / span,
                "/bin/true execs seen": received["true_exec"]}
    finally:
        await bus.close()
        stop.set()
        await asyncio.wait_for(task, 30)
        with contextlib.suppress(OSError):
            subtree.rmdir()
        nats.stop()


def main() -> None:
    from ciliate.store.migrate import upgrade

    parser = argparse.ArgumentParser()
    parser.add_argument("--execs", type=int, default=2000)
    parser.add_argument("--opens", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ciliate-bench-sec-") as tmp_s:
        tmp = Path(tmp_s)
        driver = build_driver(tmp)
        with cgroup(CGROUP_ROOT / f"bench-{os.getpid()}") as cg:
            rates = exec_rates(driver, cg, args.execs, args.rounds)
            print("| exec loop (fork+exec /bin/true) | execs/s | overhead |\n|---|---:|---:|")
            base = rates["agent off"]
            for name, rate in rates.items():
                print(f"| {name} | {rate:,.0f} | {100 * (base / rate - 1):+.1f}% |")
            costs = openat_costs(driver, cg, args.opens, args.rounds)
            print("\n| openat+close loop | ns/iteration | added ns |\n|---|---:|---:|")
            for name, cost in costs.items():
                print(f"| {name} | {cost:,.0f} | {cost - costs['no program']:+,.0f} |")
        added_empty = costs["empty program"] - costs["no program"]
        added_filter = costs["non-matching filter"] - costs["no program"]
        print(f"\nfilter / empty added cost: {added_filter / added_empty:.2f}x", flush=True)
        db_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
        upgrade(db_url)
        storm = asyncio.run(delivery(args.execs, tmp, db_url))
    print("\n| delivery through the service and NATS | value |\n|---|---:|")
    for name, value in storm.items():
        print(f"| {name} | {value:,.0f} |")
    ok_exec = base / rates["process events"] - 1 <= 0.10
    ok_filter = added_filter <= 1.5 * added_empty
    ok_loss = storm["events received"] + storm["events reported lost"] >= storm["events expected"]
    print(f"\ngoals: exec overhead <= 10%: {ok_exec}; filter <= 1.5x empty: {ok_filter}; "
          f"no unaccounted loss: {ok_loss} (best of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
