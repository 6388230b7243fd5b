"""Security agent benchmark (root): exec overhead, per-openat cost of an in-kernel filter, and
events delivered over NATS with every loss accounted for.

    .venv/bin/python -m bench.security.run [--execs 1000] [--opens 200000] [--rounds 7]
        [--only openat]

Programs are loaded once; modes are switched by attaching and detaching their tracepoints, and
the modes of one measurement are interleaved round by round, so load from other work on a shared
machine spreads over every mode alike. Reported: medians over rounds, with min-max.

1. A fork+exec loop of /bin/true (C driver) in a cgroup the agent observes: agent off (nothing
   attached); process events (lifecycle programs; records read, decoded and turned into cached
   processes and lazy events by a consumer thread, as the agent does, JSON not built); plus a
   non-matching Sigkill policy (kill-tmp-exec). Wall execs/s and CPU per exec of the loop and
   its children (getrusage, so time other work takes from the CPU is not counted), and the
   consumer thread's CPU per exec. Two placements: the loop on CPU 1 and the agent on CPU 0
   (the agent given a CPU of its own, as a node agent with a reserved CPU would run), and both
   left to the scheduler.
2. CPU ns per openat of a nonexistent path in a C loop on CPU 1, timed in chunks of 10,000
   with CLOCK_THREAD_CPUTIME_ID (median chunk): no program; an empty program on
   syscalls/sys_enter_openat; a TracingPolicy on the same tracepoint whose Prefix never
   matches (lifecycle programs detached in all, so only the program under test differs); and
   the filter's two steps alone. Then each program's own run time per call from the kernel's
   BPF statistics (BPF_ENABLE_STATS, on only for that pass): far less noisy than the loop, it
   attributes the difference between the filter and the empty program.
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
import statistics
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
from services.security.loader import LoadedPolicy, Loader, boot_wall_ns  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/unified/ciliate")
EXAMPLES = REPO.parent / "shared" / "examples"
LOOP_CPU, AGENT_CPU = 1, 0
LIFECYCLE_TRACEPOINTS = ("sched:sched_process_exec", "sched:sched_process_fork",
                         "syscalls:sys_enter_exit_group", "signal:signal_deliver",
                         "sched:sched_process_exit")
MISSING_PATH = "/etc/ciliate-bench-no-such-file"

DRIVER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double tv(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    /* argv: cgroup.procs path, mode ("exec" | "open"), count, [path] */
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%d", getpid());
    fclose(f);
    long n = atol(argv[3]);
    if (strcmp(argv[2], "exec") == 0) {
        double t0 = clock_s(CLOCK_MONOTONIC);
        for (long i = 0; i < n; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                execl("/bin/true", "true", (char *)0);
                _exit(127);
            }
            int status;
            waitpid(pid, &status, 0);
        }
        double wall = clock_s(CLOCK_MONOTONIC) - t0;
        struct rusage self, kids;
        getrusage(RUSAGE_SELF, &self);
        getrusage(RUSAGE_CHILDREN, &kids);
        double cpu = tv(self.ru_utime) + tv(self.ru_stime) + tv(kids.ru_utime) + tv(kids.ru_stime);
        printf("%.9f %.9f\n", wall, cpu);
        return 0;
    }
    const long chunk = 10000;
    long chunks = n / chunk;
    double *ns = calloc(chunks, sizeof(double));
    for (long c = 0; c < chunks; c++) {
        double t0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
        for (long i = 0; i < chunk; i++) {
            int fd = openat(AT_FDCWD, argv[4], O_RDONLY);
            if (fd >= 0)
                close(fd);
        }
        ns[c] = (clock_s(CLOCK_THREAD_CPUTIME_ID) - t0) / chunk * 1e9;
    }
    qsort(ns, chunks, sizeof(double), cmp);
    printf("%.3f %.3f\n", ns[chunks / 2], ns[0]);
    return 0;
}
"""

EMPTY_PROGRAM = b"TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return 0; }"
EMPTY_FUNCTION = "tracepoint__syscalls__sys_enter_openat"
SCOPE_ONLY_PROGRAM = b"""
BPF_CGROUP_ARRAY(node_cgroup, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    if (node_cgroup.check_current_task(0) != 1)
        return 0;
    return 0;
}"""
"""The filter's first step alone: is the task in the node's cgroup subtree."""
PREFIX_READ_PROGRAM = b"""
TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    u64 buf[2] = {};
    bpf_probe_read_user_str(buf, 14, args->filename);
    return buf[0] == 1;
}"""
"""The filter's argument step alone: the 13-byte prefix and a NUL from user memory."""
SCOPE_PART = "part: node cgroup check only"
READ_PART = "part: path prefix read only (14 bytes into the stack)"
FILTER = "non-matching Prefix filter (TracingPolicy)"

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
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
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


def drive(driver: Path, cg: Path, mode: str, count: int, cpu: int | None = None,
          path: str = MISSING_PATH) -> tuple[float, float]:
    """The driver's two numbers: (wall s, CPU s) for exec; (median, min) ns per call for open."""
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    out = subprocess.run([str(driver), str(cg / "cgroup.procs"), mode, str(count), path],
                         check=True, capture_output=True, text=True, preexec_fn=pin)
    first, second = out.stdout.split()
    return float(first), float(second)


class Consumer:
    """Polls the loader in a thread and ingests records as the agent does (cache and lazy
    events; JSON is only built when an event is published, which this benchmark does not)."""

    def __init__(self, loader_cg: Path) -> None:
        self.builder = EventBuilder("bench", boot_wall_ns())
        self.events = 0
        self.cpu_s = 0.0
        self.cpu: int | None = None
        self.loader = Loader(cgroup_subtree=loader_cg, on_record=self._on_record)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_record(self, record: Any) -> None:
        if self.builder.ingest(record) is not None:
            self.events += 1

    def _run(self) -> None:
        pinned: int | None = None
        while not self._stop.is_set():
            if self.cpu != pinned:
                pinned = self.cpu
                os.sched_setaffinity(0, {pinned} if pinned is not None else set(
                    range(os.cpu_count() or 1)))
            t0 = time.thread_time()
            self.loader.poll(50)
            self.cpu_s += time.thread_time() - t0

    def start(self) -> None:
        self.loader.start()
        self._thread.start()

    def load(self, doc: dict[str, Any]) -> LoadedPolicy:
        loaded = self.loader.load_policy(doc)
        self.builder.policies[loaded.policy_id] = loaded.info
        return loaded

    def lifecycle(self, attached: bool) -> None:
        for tp in LIFECYCLE_TRACEPOINTS:
            subsystem, event = tp.split(":")
            set_attached(self.loader._lifecycle, tp, f"tracepoint__{subsystem}__{event}",
                         attached)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.loader.close()


def set_attached(bpf: Any, tp: str, function: str, attached: bool) -> None:
    """Attach or detach one tracepoint program (no-op when already so)."""
    if (tp.encode() in bpf.tracepoint_fds) == attached:
        return
    if attached:
        bpf.attach_tracepoint(tp=tp.encode(), fn_name=function.encode())
    else:
        bpf.detach_tracepoint(tp.encode())


def policy_attached(loaded: LoadedPolicy, attached: bool) -> None:
    for att in loaded.compiled.attachments:
        set_attached(loaded.bpf, att.target, att.function, attached)


def interleaved(rounds: int, modes: dict[str, Callable[[], None]],
                measure: Callable[[], tuple[float, ...]]) -> dict[str, list[tuple[float, ...]]]:
    """Each round runs every mode once (setting it up first); the results per mode."""
    out: dict[str, list[tuple[float, ...]]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, enter in modes.items():
            enter()
            out[name].append(measure())
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def exec_table(driver: Path, cg: Path, execs: int, rounds: int) -> tuple[str, float]:
    consumer = Consumer(cg)
    consumer.start()
    lines = ["| exec loop (fork + exec /bin/true), placement | mode | execs/s median (min-max) "
             "| loop CPU us/exec | agent CPU us/exec | overhead (median execs/s) |",
             "|---|---|---:|---:|---:|---:|"]
    pinned_overhead = 0.0
    try:
        loaded = consumer.load(yaml.safe_load(
            (EXAMPLES / "tracingpolicy-kill-tmp-exec.yaml").read_text()))

        def mode(lifecycle: bool, policy: bool) -> Callable[[], None]:
            def enter() -> None:
                consumer.lifecycle(False)
                policy_attached(loaded, False)
                if lifecycle:
                    consumer.lifecycle(True)
                if policy:
                    policy_attached(loaded, True)
            return enter

        modes = {"agent off": mode(False, False), "process events": mode(True, False),
                 "process events + non-matching Sigkill policy": mode(True, True)}
        for placement, loop_cpu, agent_cpu in (
                (f"loop on CPU {LOOP_CPU}, agent on CPU {AGENT_CPU}", LOOP_CPU, AGENT_CPU),
                ("unpinned", None, None)):
            consumer.cpu = agent_cpu

            def measure(loop_cpu: int | None = loop_cpu) -> tuple[float, ...]:
                before = consumer.cpu_s
                wall, cpu = drive(driver, cg, "exec", execs, loop_cpu)
                deadline = time.monotonic() + 2  # let the consumer finish this round's records
                while consumer.loader._raw and time.monotonic() < deadline:
                    time.sleep(0.01)
                return execs / wall, cpu / execs * 1e6, (consumer.cpu_s - before) / execs * 1e6

            results = interleaved(rounds, modes, measure)
            base = statistics.median(r[0] for r in results["agent off"])
            for name, rows in results.items():
                rate = statistics.median(r[0] for r in rows)
                overhead = 100 * (base / rate - 1)
                if name == "process events" and agent_cpu is not None:
                    pinned_overhead = overhead
                lines.append(
                    f"| {placement} | {name} | {spread([r[0] for r in rows])} | "
                    f"{statistics.median(r[1] for r in rows):,.0f} | "
                    f"{statistics.median(r[2] for r in rows):,.0f} | {overhead:+.1f}% |")
    finally:
        consumer.close()
    return "\n".join(lines), pinned_overhead


class BpfStats:
    """The kernel's per-program run time (BPF_ENABLE_STATS: on while this object is open)."""

    BPF_ENABLE_STATS = 32
    BPF_STATS_RUN_TIME = 0

    def __enter__(self) -> BpfStats:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint8 * 128)()
        attr[0] = self.BPF_STATS_RUN_TIME
        self.fd = libc.syscall(321, self.BPF_ENABLE_STATS, attr, len(attr))  # __NR_bpf x86_64
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    @staticmethod
    def run(prog_id: int) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of a loaded program."""
        import json

        out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "--json"],
                             check=True, capture_output=True, text=True).stdout
        info = json.loads(out)
        return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def prog_id(bpf: Any, function: str) -> int:
    fd = bpf.funcs[function.encode()].fd
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("prog_id:"):
            return int(line.split()[1])
    raise RuntimeError(f"no prog_id for {function}")


def openat_table(driver: Path, cg: Path, opens: int, rounds: int) -> tuple[str, float, float]:
    from bcc import BPF

    consumer = Consumer(cg)
    consumer.start()
    programs = {name: BPF(text=text) for name, text in (
        ("empty program", EMPTY_PROGRAM),
        (SCOPE_PART, SCOPE_ONLY_PROGRAM),
        (READ_PART, PREFIX_READ_PROGRAM))}
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        programs[SCOPE_PART][b"node_cgroup"][0] = fd
    finally:
        os.close(fd)
    try:
        loaded = consumer.load(NON_MATCHING_OPENAT)
        consumer.lifecycle(False)

        def mode(program: str | None, filter_on: bool) -> Callable[[], None]:
            def enter() -> None:
                for name, bpf in programs.items():
                    set_attached(bpf, "syscalls:sys_enter_openat", EMPTY_FUNCTION,
                                 name == program)
                policy_attached(loaded, filter_on)
            return enter

        modes = {"no program": mode(None, False),
                 **{name: mode(name, False) for name in programs},
                 FILTER: mode(None, True)}
        results = interleaved(rounds, modes,
                              lambda: drive(driver, cg, "open", opens, LOOP_CPU))
        ids = {name: prog_id(bpf, EMPTY_FUNCTION) for name, bpf in programs.items()}
        ids[FILTER] = prog_id(loaded.bpf, loaded.compiled.attachments[0].function)
        own: dict[str, list[float]] = {name: [] for name in ids}
        with BpfStats():
            for _ in range(rounds):
                for name in ids:
                    modes[name]()
                    t0, n0 = BpfStats.run(ids[name])
                    drive(driver, cg, "open", opens, LOOP_CPU)
                    t1, n1 = BpfStats.run(ids[name])
                    own[name].append((t1 - t0) / max(n1 - n0, 1))
        modes["no program"]()
    finally:
        for bpf in programs.values():
            bpf.cleanup()
        consumer.close()
    medians = {name: [r[0] for r in rows] for name, rows in results.items()}
    base = medians["no program"]
    lines = ["| openat of a missing path, CPU ns per call | median of rounds (min-max) | "
             "added ns median (min-max, paired by round) | program's own run time, ns per call "
             "(BPF stats, median (min-max)) |", "|---|---:|---:|---:|"]
    added: dict[str, float] = {}
    for name, values in medians.items():
        diffs = [v - b for v, b in zip(values, base, strict=True)]
        added[name] = statistics.median(diffs)
        run = own.get(name)
        run_text = (f"{statistics.median(run):,.1f} ({min(run):,.1f}-{max(run):,.1f})"
                    if run else "-")
        lines.append(f"| {name} | {spread(values)} | {added[name]:+,.1f} "
                     f"({min(diffs):+,.1f} to {max(diffs):+,.1f}) | {run_text} |")
    own_extra = statistics.median(own[FILTER]) - statistics.median(own["empty program"])
    lines.append(f"\nfilter's own run time minus the empty program's: {own_extra:+,.1f} ns per "
                 f"call; ratio predicted from it: "
                 f"{(added['empty program'] + own_extra) / added['empty program']:.2f}x"
                 if added["empty program"] > 0 else "")
    return ("\n".join(lines), added["empty program"], added[FILTER])


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
            took, _cpu = await asyncio.to_thread(drive, driver, cg, "exec", execs)
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
    parser.add_argument("--execs", type=int, default=1000)
    parser.add_argument("--opens", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["openat"], default=None,
                        help="run only the openat measurement")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ciliate-bench-sec-") as tmp_s:
        tmp = Path(tmp_s)
        driver = build_driver(tmp)
        with cgroup(CGROUP_ROOT / f"bench-{os.getpid()}") as cg:
            if args.only is None:
                table, overhead = exec_table(driver, cg, args.execs, args.rounds)
                print(table + "\n", flush=True)
                print(f"load average: {os.getloadavg()}", flush=True)
            table, added_empty, added_filter = openat_table(driver, cg, args.opens, args.rounds)
            print(table + "\n", flush=True)
        ratio = added_filter / added_empty if added_empty > 0 else float("inf")
        print(f"filter / empty added cost: {ratio:.2f}x "
              f"(goal <= 1.5x: {added_filter <= 1.5 * added_empty})", flush=True)
        print(f"load average: {os.getloadavg()}", flush=True)
        if args.only == "openat":
            return
        db_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
        upgrade(db_url)
        storm = asyncio.run(delivery(args.execs, tmp, db_url))
    print("\n| delivery through the service and NATS | value |\n|---|---:|")
    for name, value in storm.items():
        print(f"| {name} | {value:,.0f} |")
    ok_loss = storm["events received"] + storm["events reported lost"] >= storm["events expected"]
    print(f"\ngoals: exec overhead (pinned) <= 10%: {overhead <= 10} ({overhead:+.1f}%); "
          f"filter <= 1.5x empty: {added_filter <= 1.5 * added_empty} ({ratio:.2f}x); "
          f"no unaccounted loss: {ok_loss} ({args.rounds} interleaved rounds)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
