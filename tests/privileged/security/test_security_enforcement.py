"""The security agent against the real kernel: Sigkill on exec under /tmp, Post on openat with
matchBinaries, and refusal of a kprobe policy. Test processes run in a cgroup made here, which is
the agent's scope, so nothing else on the machine is observed or killed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF and cgroups"),
]

EXAMPLES = Path("/work/shared/examples")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")


class Agent:
    def __init__(self, loader: Any, builder: Any) -> None:
        self.loader = loader
        self.builder = builder
        self.events: list[dict[str, Any]] = []

    def on_record(self, record: Any) -> None:
        for event in self.builder.handle(record):
            self.events.append(event)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll the ring buffers until predicate(events) holds or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.loader.poll(20)
            if predicate(self.events):
                break
        return self.events

    def load(self, doc: dict[str, Any]) -> None:
        loaded = self.loader.load_policy(doc)
        self.builder.policies[loaded.policy_id] = loaded.info


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if not CGROUP_ROOT.is_dir():
        pytest.skip("cgroup2 is not mounted at /sys/fs/cgroup/unified")
    path = CGROUP_ROOT / f"ciliate-test-security-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        deadline = time.monotonic() + 5
        while (path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        path.rmdir()


@pytest.fixture
def agent(cgroup: Path) -> Iterator[Agent]:
    from services.security.core.events import EventBuilder
    from services.security.loader import Loader, boot_wall_ns

    builder = EventBuilder(node="test-node", boot_wall_ns=boot_wall_ns())
    holder: list[Agent] = []
    loader = Loader(cgroup_subtree=cgroup, on_record=lambda r: holder[0].on_record(r))
    ag = Agent(loader, builder)
    holder.append(ag)
    loader.start()
    try:
        yield ag
    finally:
        loader.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ciliate-sec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def in_cgroup(cgroup: Path, script: str) -> list[str]:
    """A shell that moves itself into the test cgroup, then runs script."""
    return ["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && {script}"]


def test_kill_tmp_exec_kills_every_execution_before_it_runs(
    agent: Agent, cgroup: Path, workdir: Path
) -> None:
    agent.load(yaml.safe_load((EXAMPLES / "tracingpolicy-kill-tmp-exec.yaml").read_text()))
    payload = workdir / "payload"
    shutil.copy("/usr/bin/touch", payload)
    runs = 100
    script = (
        f"i=0; while [ $i -lt {runs} ]; do {payload} {workdir}/made-$i; i=$((i+1)); done; "
        f"/usr/bin/touch {workdir}/control"
    )
    result = subprocess.run(in_cgroup(cgroup, script), timeout=60, check=False)
    assert result.returncode == 0
    # Executions elsewhere: a binary outside /tmp inside the scope, a /tmp binary outside it.
    assert (workdir / "control").exists()
    subprocess.run([str(payload), str(workdir / "outside")], check=True, timeout=10)
    assert (workdir / "outside").exists()
    assert not list(workdir.glob("made-*")), "a killed payload ran and created its file"

    def killed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("process_exit", {}).get("signal") == "SIGKILL"]

    events = agent.wait_for(lambda evs: len(killed(evs)) >= runs)
    assert len(killed(events)) == runs
    enforced = [
        e for e in events
        if e.get("process_tracepoint", {}).get("action") == "KPROBE_ACTION_SIGKILL"
    ]
    assert len(enforced) == runs
    assert {e["process_tracepoint"]["args"][0]["string_arg"] for e in enforced} == {str(payload)}
    assert {e["process_tracepoint"]["policy_name"] for e in enforced} == {"kill-tmp-exec"}
    killed_pids = {e["process_exit"]["process"]["pid"] for e in killed(events)}
    assert killed_pids == {e["process_tracepoint"]["process"]["pid"] for e in enforced}


def test_post_on_openat_with_prefix_and_match_binaries(
    agent: Agent, cgroup: Path, workdir: Path
) -> None:
    cat = shutil.which("cat")
    head = shutil.which("head")
    assert cat and head
    watched = workdir / "watched.txt"
    watched.write_text("x\n")
    (workdir / "other.txt").write_text("y\n")
    agent.load({
        "apiVersion": "cilium.io/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": "open-watch"},
        "spec": {"tracepoints": [{
            "subsystem": "syscalls",
            "event": "sys_enter_openat",
            "args": [{"index": 5, "type": "int"}, {"index": 6, "type": "string"}],
            "selectors": [{
                "matchArgs": [{"index": 6, "operator": "Prefix",
                               "values": [str(workdir / "watched")]}],
                "matchBinaries": [{"operator": "In", "values": [cat]}],
                "matchActions": [{"action": "Post"}],
            }],
        }]},
    })
    cat_proc = subprocess.Popen(
        in_cgroup(cgroup, f"exec {cat} {watched} {workdir}/other.txt"),
        stdout=subprocess.DEVNULL,
    )
    assert cat_proc.wait(timeout=10) == 0
    subprocess.run(in_cgroup(cgroup, f"exec {head} {watched}"), check=True, timeout=10,
                   stdout=subprocess.DEVNULL)
    # Outside the agent's cgroup scope: never reported.
    subprocess.run([cat, str(watched)], check=True, timeout=10, stdout=subprocess.DEVNULL)

    def opens(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e["process_tracepoint"] for e in events if "process_tracepoint" in e]

    agent.wait_for(lambda evs: any("process_exit" in e and e["process_exit"]["process"]["binary"]
                                   == head for e in evs))
    found = opens(agent.events)
    assert len(found) == 1, found
    event = found[0]
    assert event["process"]["binary"] == cat
    assert event["process"]["pid"] == cat_proc.pid
    assert event["args"][1] == {"string_arg": str(watched)}
    assert event["policy_name"] == "open-watch"
    assert event["action"] == "KPROBE_ACTION_POST"
    assert event["subsys"] == "syscalls" and event["event"] == "sys_enter_openat"
    exec_events = [e["process_exec"]["process"] for e in agent.events if "process_exec" in e]
    assert any(p["pid"] == cat_proc.pid and p["binary"] == cat and p["cwd"] == os.getcwd()
               for p in exec_events), exec_events


def test_kprobe_policy_is_refused_with_the_missing_feature(agent: Agent) -> None:
    from ciliate.doctor.probes import MissingKernelFeature, kernel_features

    if kernel_features().has("kprobe"):
        pytest.skip("this kernel has kprobes")
    doc = yaml.safe_load((EXAMPLES / "tracingpolicy-fd-install.yaml").read_text())
    with pytest.raises(MissingKernelFeature) as info:
        agent.load(doc)
    assert info.value.name == "kprobe"
    assert "kprobe" in str(info.value)
    assert agent.loader.policies == {}


def test_string_and_integer_selectors_match_exactly_in_the_kernel(
    agent: Agent, cgroup: Path, workdir: Path
) -> None:
    """Equal, NotEqual, Prefix (compared in a small stack buffer of just the bytes needed),
    Postfix (whole string), Mask (hoisted before the scope check when every selector has one),
    and two long strings whose compare buffers exceed the stack budget (compared in the event):
    exactly the opens and the rename that should match post, with their whole paths."""
    w = str(workdir)
    old = f"{w}/" + "r" * (127 - len(w) - 1)  # 127 bytes: the longest value a selector takes
    new = f"{w}/" + "s" * (127 - len(w) - 1)
    policy = {
        "apiVersion": "cilium.io/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": "selectors"},
        "spec": {"tracepoints": [
            {"subsystem": "syscalls", "event": "sys_enter_openat",
             "args": [{"index": 6, "type": "string"}, {"index": 7, "type": "int"}],
             "selectors": [
                 {"matchArgs": [{"index": 6, "operator": "Equal", "values": [f"{w}/eq.txt"]}]},
                 {"matchArgs": [{"index": 6, "operator": "Prefix", "values": [f"{w}/pre-"]}]},
                 {"matchArgs": [{"index": 6, "operator": "Prefix", "values": [f"{w}/"]},
                                {"index": 6, "operator": "Postfix", "values": [".post"]}]},
                 {"matchArgs": [{"index": 6, "operator": "Prefix", "values": [f"{w}/ne-"]},
                                {"index": 6, "operator": "NotEqual", "values": [f"{w}/ne-a"]}]},
                 {"matchArgs": [{"index": 7, "operator": "Mask", "values": ["0x40"]},
                                {"index": 6, "operator": "Prefix", "values": [f"{w}/creat-"]}]},
             ]},
            {"subsystem": "syscalls", "event": "sys_enter_openat",
             "args": [{"index": 6, "type": "string"}, {"index": 7, "type": "int"}],
             "selectors": [
                 {"matchArgs": [{"index": 7, "operator": "Mask", "values": ["0x40"]},
                                {"index": 6, "operator": "Equal", "values": [f"{w}/only"]}]},
             ]},
            {"subsystem": "syscalls", "event": "sys_enter_rename",
             "args": [{"index": 5, "type": "string"}, {"index": 6, "type": "string"}],
             "selectors": [
                 {"matchArgs": [{"index": 5, "operator": "Equal", "values": [old]},
                                {"index": 6, "operator": "Equal", "values": [new]}]},
             ]},
        ]},
    }
    agent.load(policy)
    hook = agent.loader.policies["selectors"].compiled.c_text
    assert "u64 *cmp1 = (u64 *)e->strs[1];" in hook  # the rename hook's second buffer
    assert "if (!(" in hook  # the Mask-only hook is hoisted before the scope check
    opens = ["eq.txt", "eq.txtx", "eq.tx", "pre-1", "pre", "a.post", "a.pos", "ne-a", "ne-b",
             "ne-"]
    script = "\n".join([
        "import os",
        f"w = {w!r}",
        f"for name in {opens!r}:",
        "    try: os.close(os.open(w + '/' + name, os.O_RDONLY))",
        "    except OSError: pass",
        "os.close(os.open(w + '/creat-1', os.O_CREAT | os.O_WRONLY))",
        "os.close(os.open(w + '/creat-1', os.O_RDONLY))",
        "os.close(os.open(w + '/only', os.O_CREAT | os.O_WRONLY))",
        "os.close(os.open(w + '/only', os.O_RDONLY))",
        f"open({old!r}, 'w').close()",
        f"os.rename({old!r}, {new!r})",  # matches
        f"os.rename({new!r}, {old!r})",
        f"os.rename({old!r}, {new[:-1] + 't'!r})",  # differs in the last byte only
    ])
    proc = subprocess.run(["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && "
                           f"exec {sys.executable} -c \"$1\"", "sh", script],
                          timeout=30, check=False)
    assert proc.returncode == 0

    def hits(events: list[dict[str, Any]]) -> list[tuple[str, ...]]:
        return sorted(tuple(a.get("string_arg", "") for a in e["process_tracepoint"]["args"]
                            if "string_arg" in a)
                      for e in events if "process_tracepoint" in e)

    matched = ("eq.txt", "pre-1", "a.post", "ne-b", "ne-", "creat-1", "only")
    expected = sorted([(f"{w}/{n}",) for n in matched] + [(old, new)])
    agent.wait_for(lambda evs: len(hits(evs)) >= len(expected))
    assert hits(agent.events) == expected
