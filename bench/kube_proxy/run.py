"""kube-proxy replacement benchmark: Ciliate socket LB and tc LB against kube-proxy's iptables
(legacy and nft backends) and nftables modes, at 10, 1,000 and 10,000 services (2 ports, 3
backends each), in one run on one machine, all inside namespaces this run creates.

Topology (services.datapath.sandbox): node n1 holds three backend pods running a C accept
loop; node n2 holds the client pod. Every mode is measured from the same client pod over the
same path (pod -> n2 -> bridge -> n1 -> backend pod):
  direct          the backend address itself: no translation (the limit)
  socket LB       cgroup connect4 at n2's cgroup subtree; client connects to the ClusterIP
  tc LB           n1's eth0 tc program; client connects to the Service's LoadBalancer IP
                  (routed to n1), DNAT to a local backend with conntrack
  iptables-*      kube-proxy's nat rules in n2's namespace (PREROUTING -> KUBE-SERVICES ->
                  KUBE-SVC-* statistic random -> KUBE-SEP-* DNAT), via iptables-restore
  nftables        kube-proxy's nftables-mode table (service-ips verdict map, numgen vmaps)
Measured: (a) new TCP connections/s from a C connect loop (the VIP of the first, middle and last
Service for rule-list modes), (b) time from one Service change to the first successful connect
(p50/p99), (c) kernel memory (Slab + Percpu + VmallocUsed delta) and BPF map memlock.

Run as root: ``.venv/bin/python -m bench.kube_proxy.run [--sizes 10,1000,10000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.kube_proxy.kv import Backend, Frontend, Service, render
from services.datapath.lb.loader import LbDatapath, LbSizes, unpin
from services.datapath.maps import PIN_ROOT
from services.datapath.sandbox import CGROUP_ROOT, DevCluster, enter_cgroup

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAGLEV_M = 251
POD_CIDR = "10.244.0.0/16"
VIP_BASE = int(ipaddress.IPv4Address("10.96.0.1"))
LBIP_BASE = int(ipaddress.IPv4Address("10.100.0.1"))
FAKE_BASE = int(ipaddress.IPv4Address("10.245.0.1"))
REAL = ["10.244.1.10", "10.244.1.11", "10.244.1.12"]
PORTS = ((80, 8080), (443, 8443))
RULE_TIMEOUT_S = 120.0
"""A rule update that takes longer is recorded as infinitely slow (and the run goes on)."""


def ip(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def vip(i: int) -> str:
    return ip(VIP_BASE + i)


def lbip(i: int) -> str:
    return ip(LBIP_BASE + i)


class Ids:
    """Backend ids per address:port (as the lb service allocates them), frontend ids."""

    def __init__(self) -> None:
        self.backends: dict[tuple[str, int], int] = {}

    def backend(self, addr: str, port: int) -> int:
        return self.backends.setdefault((addr, port), len(self.backends) + 1)


def backends_of(i: int, n: int, real_every: set[int]) -> list[str]:
    if i in real_every:
        return REAL
    return [ip(FAKE_BASE + 3 * i + k) for k in range(3)]


def make_services(n: int, ids: Ids, extra: int = 0) -> list[Service]:
    """``n`` Services (plus ``extra`` more, for change timing); the first, middle and last
    (and every extra) have the real backend pods, the others addresses nobody answers."""
    real = {0, n // 2, n - 1} | set(range(n, n + extra))
    out = []
    for i in range(n + extra):
        fes, bes = [], []
        for j, (port, target) in enumerate(PORTS):
            pn = f"p{port}"
            fes.append(Frontend(1 + 4 * i + 2 * j, vip(i), port, port_name=pn))
            fes.append(Frontend(2 + 4 * i + 2 * j, lbip(i), port, "LoadBalancer", port_name=pn))
            bes += [Backend(ids.backend(a, target), a, target, "n1", port_name=pn)
                    for a in backends_of(i, n, real)]
        out.append(Service("bench", f"svc-{i}", fes, bes, type="LoadBalancer"))
    return out


# --- kube-proxy's rules ---------------------------------------------------------------------

def _h(*parts: object) -> str:
    import hashlib

    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16].upper()


def iptables_rules(n: int, only_services: bool = False, new: list[int] | None = None) -> str:
    """kube-proxy's nat table for ``n`` Services. ``only_services``: the partial restore of
    MinimizeIPTablesRestore after one change (KUBE-SERVICES in full, plus only the chains of
    the Services in ``new``)."""
    real = {0, n // 2, n - 1} | set(new or [])
    total = n + len(new or [])
    chains: list[str] = [":KUBE-SERVICES - [0:0]"]
    rules: list[str] = []
    if not only_services:
        chains += [":KUBE-MARK-MASQ - [0:0]"]
        rules += ["-A PREROUTING -m comment --comment \"kubernetes service portals\" "
                  "-j KUBE-SERVICES",
                  "-A OUTPUT -m comment --comment \"kubernetes service portals\" "
                  "-j KUBE-SERVICES",
                  "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    for i in range(total):
        write_chains = not only_services or i in (new or [])
        for port, target in PORTS:
            svc = f"KUBE-SVC-{_h(i, port)}"
            name = f"bench/svc-{i}:p{port}"
            rules.append(f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment "
                         f"\"{name} cluster IP\" -m tcp --dport {port} -j {svc}")
            if not write_chains:
                continue
            chains.append(f":{svc} - [0:0]")
            rules.append(f"-A {svc} ! -s {POD_CIDR} -d {vip(i)}/32 -p tcp -m comment "
                         f"--comment \"{name} cluster IP\" -m tcp --dport {port} "
                         f"-j KUBE-MARK-MASQ")
            addrs = backends_of(i, n, real)
            for k, a in enumerate(addrs):
                sep = f"KUBE-SEP-{_h(i, port, a)}"
                chains.append(f":{sep} - [0:0]")
                left = len(addrs) - k
                stat = (f"-m statistic --mode random --probability {1 / left:.11f} "
                        if left > 1 else "")
                rules.append(f"-A {svc} -m comment --comment \"{name} -> {a}:{target}\" "
                             f"{stat}-j {sep}")
                rules.append(f"-A {sep} -s {a}/32 -m comment --comment \"{name}\" "
                             f"-j KUBE-MARK-MASQ")
                rules.append(f"-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp "
                             f"-j DNAT --to-destination {a}:{target}")
    return "*nat\n" + "\n".join(chains + rules) + "\nCOMMIT\n"


def nft_rules(n: int, new: list[int] | None = None, incremental: bool = False) -> str:
    """kube-proxy's nftables-mode table (``table ip kube-proxy``); ``incremental``: only what
    one sync adds for the Services in ``new`` (chains and map elements)."""
    real = {0, n // 2, n - 1} | set(new or [])
    idx = list(new or []) if incremental else list(range(n + len(new or [])))
    out: list[str] = []
    if not incremental:
        out += ["add table ip kube-proxy",
                "add chain ip kube-proxy mark-for-masquerade",
                "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
                "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . "
                "inet_service : verdict ; }",
                "add chain ip kube-proxy nat-prerouting { type nat hook prerouting "
                "priority dstnat ; }",
                "add chain ip kube-proxy services",
                "add rule ip kube-proxy nat-prerouting jump services",
                "add rule ip kube-proxy services ip daddr . meta l4proto . th dport "
                "vmap @service-ips"]
    elems = []
    for i in idx:
        for port, target in PORTS:
            svc = f"service-{_h(i, port)}-bench/svc-{i}/tcp/p{port}"
            out.append(f"add chain ip kube-proxy {svc}")
            addrs = backends_of(i, n, real)
            eps = []
            for a in addrs:
                ep = f"endpoint-{_h(i, port, a)}-bench/svc-{i}/tcp/p{port}__{a}/{target}"
                eps.append(ep)
                out.append(f"add chain ip kube-proxy {ep}")
                out.append(f"add rule ip kube-proxy {ep} ip saddr {a} jump mark-for-masquerade")
                out.append(f"add rule ip kube-proxy {ep} meta l4proto tcp dnat to {a}:{target}")
            out.append(f"add rule ip kube-proxy {svc} ip daddr {vip(i)} tcp dport {port} "
                       f"ip saddr != {POD_CIDR} jump mark-for-masquerade")
            vmap = ", ".join(f"{k} : goto {ep}" for k, ep in enumerate(eps))
            out.append(f"add rule ip kube-proxy {svc} numgen random mod {len(eps)} "
                       f"vmap {{ {vmap} }}")
            elems.append(f"{vip(i)} . tcp . {port} : goto {svc}")
    for k in range(0, len(elems), 2000):
        out.append("add element ip kube-proxy service-ips { " + ", ".join(elems[k:k + 2000])
                   + " }")
    return "\n".join(out) + "\n"


# --- the bench ------------------------------------------------------------------------------

def kernel_mem_kb() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(info[k].split()[0]) for k in ("Slab", "Percpu", "VmallocUsed"))


def bpf_memlock_kb(pins: Path) -> int:
    """Sum of the pinned maps' memlock (the Maglev hash is not preallocated: its entries are
    counted as key + table + element overhead)."""
    from services.datapath.lb.maps import LbMaps
    from services.datapath.maps import obj_get

    total = 0
    for p in pins.iterdir():
        fd = obj_get(p)
        try:
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        finally:
            os.close(fd)
    maps = LbMaps.open(pins, MAGLEV_M)
    try:
        tables = sum(1 for _ in maps.maglev.keys())  # noqa: SIM118
    finally:
        maps.close()
    return (total + tables * (MAGLEV_M * 4 + 8 + 64)) // 1024


class Bench:
    def __init__(self, seconds: float, reps: int, tools: Path,
                 modes: tuple[str, ...] = (), client_node: str = "n2", samples: int = 3) -> None:
        self.seconds = seconds
        self.samples = samples
        self.reps = reps
        self.tools = tools
        self.modes = modes or tuple(k for k, _label in MODES)
        self.client_node = client_node
        self.salt = "k" + secrets.token_hex(3)
        self.cluster = DevCluster(salt=self.salt)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pin_root = PIN_ROOT / f"bench-{self.salt}"
        self.lbs: dict[str, LbDatapath] = {}

    def setup(self) -> None:
        c = self.cluster
        c.add_node("n1")
        c.add_node("n2")
        for k, addr in enumerate(REAL):
            pod = c.add_pod("n1", "bench", f"b{k}", addr, [], [])
            p = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, str(self.tools / "acceptloop"), "8080",
                 "8443"], stdout=subprocess.PIPE,
                preexec_fn=lambda pod=pod: enter_cgroup(pod.record.cgroup))  # type: ignore[misc]
            assert p.stdout is not None
            p.stdout.readline()
            self.procs.append(p)
        self.client = c.add_pod(self.client_node, "bench", "client",
                                "10.244.1.20" if self.client_node == "n1" else "10.244.2.10",
                                [], [])
        n2 = c.nodes["n2"]
        subprocess.run(["ip", "netns", "exec", n2.netns, "ip", "route", "add",
                        "10.100.0.0/16", "via", c.nodes["n1"].ip], check=True)
        for ns in (c.nodes["n1"].netns, n2.netns, self.client.netns):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000",
                            "net.netfilter.nf_conntrack_max=1048576"],
                           check=False, capture_output=True)
        sizes = LbSizes(services=262144, backends=131072, revnat=65536, sk_revnat=65536,
                        affinity=1024, ct=262144, maglev_tables=32768, events_pages=8)
        for n in ("n1", "n2"):
            self.lbs[n] = LbDatapath(n, self.pin_root, node_ip=c.nodes[n].ip,
                                     maglev_m=MAGLEV_M, sizes=sizes)

    def teardown(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
        for lb in self.lbs.values():
            with contextlib.suppress(Exception):
                lb.destroy()
        self.flush_rules()
        self.cluster.destroy()
        if self.pin_root.exists():
            for d in self.pin_root.iterdir():
                unpin(d)
            self.pin_root.rmdir()

    # -- helpers ---------------------------------------------------------------------------

    @property
    def n2ns(self) -> str:
        """Where kube-proxy's rules go: the client's node (PREROUTING sees the pod's packets)."""
        return self.cluster.nodes[self.client_node].netns

    def in_client(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.client.netns, *args]

    def rate(self, addr: str, port: int) -> float:
        """Median of ``samples`` samples (this 2-core VM is noisy)."""
        return statistics.median(self._rate(addr, port) for _ in range(self.samples))

    def direct_before(self) -> float:
        """The direct rate just before a mode loads anything: its baseline, taken under the
        same load as the mode's own samples. (Not interleaved with them: the mode's rules and
        programs would tax the direct connections too; kube-proxy's KUBE-SERVICES scan does.)"""
        return self.rate(REAL[0], 8080)

    def _rate(self, addr: str, port: int) -> float:
        out = subprocess.run(self.in_client(str(self.tools / "connloop"), addr, str(port),
                                            str(self.seconds)),
                             preexec_fn=lambda: enter_cgroup(self.client.record.cgroup),
                             capture_output=True, text=True, check=True)
        ok, err, secs = out.stdout.split()
        if int(err) > int(ok) // 100:
            raise RuntimeError(f"{addr}:{port}: {err} errors of {int(ok) + int(err)}")
        return int(ok) / float(secs)

    def reach_ms(self, addr: str, port: int, change: Callable[[], object]) -> float:
        """Milliseconds from starting ``change`` to the first successful connect; infinity
        when the change itself timed out."""
        p = subprocess.Popen(self.in_client(str(self.tools / "reach"), addr, str(port), "30"),
                             preexec_fn=lambda: enter_cgroup(self.client.record.cgroup),
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        p.stdout.readline()
        t0 = time.monotonic_ns()
        try:
            change()
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            p.stdout.close()
            return float("inf")
        t1 = int(p.stdout.readline())
        p.wait()
        if not t1:
            raise RuntimeError(f"{addr}:{port} never became reachable")
        return (t1 - t0) / 1e6

    def ns_run(self, *args: str, stdin: str | None = None, timeout: float = RULE_TIMEOUT_S,
               ) -> float:
        t = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", self.n2ns, *args], input=stdin, text=True,
                       check=True, capture_output=True, timeout=timeout)
        return time.perf_counter() - t

    def flush_rules(self) -> None:
        for tool in ("iptables-legacy", "iptables-nft"):
            for args in (("-t", "nat", "-F"), ("-t", "nat", "-X")):
                with contextlib.suppress(subprocess.CalledProcessError, KeyError):
                    self.ns_run(tool, *args)
        with contextlib.suppress(subprocess.CalledProcessError, KeyError):
            self.ns_run("nft", "flush", "ruleset")

    # -- modes -----------------------------------------------------------------------------

    def run_size(self, n: int) -> dict[str, Any]:
        ids = Ids()
        reps = self.reps
        services = make_services(n, ids, extra=reps)
        cache: dict[tuple[Any, ...], Any] = {}
        kv = render(services[:n], m=MAGLEV_M, cache=cache)
        extra_kv = [render([s], m=MAGLEV_M, cache=cache) for s in services[n:]]
        res: dict[str, Any] = {"services": n}
        positions = {"start": 0, "middle": n // 2, "end": n - 1}
        res["direct"] = {"conn_per_s": self.rate(REAL[0], 8080)}
        res["client_node"] = self.client_node
        if "socket_lb" in self.modes:
            res["socket_lb"] = self.ciliate(n, kv, extra_kv, self.client_node, socket=True)
        if "tc_lb" in self.modes and self.client_node == "n1":
            res["tc_lb"] = {"error": "n/a: the tc LB needs a client on another node"}
        elif "tc_lb" in self.modes:
            res["tc_lb"] = self.ciliate(n, kv, extra_kv, "n1", socket=False)
        for tool in ("iptables-legacy", "iptables-nft"):
            if tool not in self.modes:
                continue
            before = self.direct_before()
            m0 = kernel_mem_kb()
            # The first load without --noflush: iptables-nft-restore --noflush of 10,000
            # Services ran for more than 7 minutes here; partial restores use it, as
            # kube-proxy does.
            load = self.ns_run(f"{tool}-restore", stdin=iptables_rules(n), timeout=1200)
            mem = kernel_mem_kb() - m0
            rates = {pos: self.rate(vip(i), 80) for pos, i in positions.items() if pos != "end"}
            rates["end"] = self.rate(vip(positions["end"]), 80)
            lat = []
            for r in range(reps):
                partial = iptables_rules(n, only_services=True, new=list(range(n, n + r + 1)))
                lat.append(self.reach_ms(vip(n + r), 80, functools.partial(
                    self.ns_run, f"{tool}-restore", "--noflush", stdin=partial)))
            res[tool] = {"conn_per_s": rates["end"], "direct_conn_per_s": before,
                         "by_position": rates, "full_restore_s": load, "change_ms": lat,
                         "kernel_mem_kb": mem}
            self.flush_rules()
        if "nftables" not in self.modes:
            return res
        before = self.direct_before()
        m0 = kernel_mem_kb()
        load = self.ns_run("nft", "-f", "-", stdin=nft_rules(n), timeout=1200)
        mem = kernel_mem_kb() - m0
        rates = {pos: self.rate(vip(i), 80) for pos, i in positions.items() if pos != "end"}
        rates["end"] = self.rate(vip(positions["end"]), 80)
        lat = [self.reach_ms(vip(n + r), 80, functools.partial(
            self.ns_run, "nft", "-f", "-", stdin=nft_rules(n, new=[n + r], incremental=True)))
            for r in range(reps)]
        res["nftables"] = {"conn_per_s": rates["end"], "direct_conn_per_s": before,
                           "by_position": rates,
                           "full_load_s": load, "change_ms": lat, "kernel_mem_kb": mem}
        self.flush_rules()
        return res

    def ciliate(self, n: int, kv: dict[str, dict[str, Any]],
                extra_kv: list[dict[str, dict[str, Any]]], node: str,
                socket: bool) -> dict[str, Any]:
        lb = self.lbs[node]
        cg = CGROUP_ROOT / (self.salt + self.client_node)
        before = self.direct_before()
        m0 = kernel_mem_kb()
        t = time.perf_counter()
        lb.sync(kv)
        load = time.perf_counter() - t
        mem = kernel_mem_kb() - m0
        target = vip if socket else lbip
        if socket:
            lb.attach_socket_lb(cg)
        else:
            lb.attach_nodeport("eth0", self.cluster.nodes["n1"].netns)
        try:
            rate = self.rate(target(n - 1), 80)
            lat = []
            for r, one in enumerate(extra_kv):
                def change(one: dict[str, dict[str, Any]] = one) -> None:
                    for key in sorted(one, key=lambda k: not k.startswith("tbl.")):
                        lb.update(key, one[key])
                lat.append(self.reach_ms(target(n + r), 80, change))
            memlock = bpf_memlock_kb(lb.pins)
        finally:
            if socket:
                lb.detach_socket_lb(cg)
            else:
                lb.detach_nodeport("eth0", self.cluster.nodes["n1"].netns)
            lb.sync({})
        return {"conn_per_s": rate, "direct_conn_per_s": before, "full_sync_s": load,
                "change_ms": lat,
                "kernel_mem_kb": mem, "bpf_memlock_kb": memlock}


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


MODES = (("direct", "direct (no translation)"), ("socket_lb", "Ciliate socket LB"),
         ("tc_lb", "Ciliate tc LB"), ("iptables-legacy", "kube-proxy iptables (legacy)"),
         ("iptables-nft", "kube-proxy iptables (nft)"), ("nftables", "kube-proxy nftables"))


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| services | mode | conn/s (last VIP) | % of direct (just before) | "
             "change p50 / p99 ms | load s | kernel mem KiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        direct = r["direct"]["conn_per_s"]
        size = f"{r['services']:,}" + (" (same node)" if r.get("client_node") == "n1" else "")
        for key, label in MODES:
            m = r.get(key)
            if m is None or "conn_per_s" not in m:
                if m is None:
                    continue
                lines.append(f"| {size} | {label} | failed: "
                             f"{(m or {}).get('error', 'not run')} | | | | |")
                continue
            ch = (f"{statistics.median(m['change_ms']):.1f} / {p(m['change_ms'], .99):.1f}"
                  if "change_ms" in m else "").replace("inf", f">{RULE_TIMEOUT_S * 1000:.0f}")
            load = m.get("full_sync_s", m.get("full_restore_s", m.get("full_load_s")))
            mem = m.get("kernel_mem_kb", "")
            if "bpf_memlock_kb" in m:
                mem = f"{mem} (maps {m['bpf_memlock_kb']})"
            lines.append(f"| {size} | {label} | {m['conn_per_s']:,.0f} | "
                         f"{100 * m['conn_per_s'] / m.get('direct_conn_per_s', direct):.0f}% | "
                         f"{ch} | "
                         f"{'' if load is None else f'{load:.2f}'} | {mem} |")
    return "\n".join(lines)


def plots(results: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    xs = [r["services"] for r in results]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in MODES:
        ax.plot(xs, [r.get(key, {}).get("conn_per_s", float("nan")) for r in results],
                marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("services")
    ax.set_ylabel("new TCP connections/s")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=.3)
    paths.append(out / "kube-proxy-conn-rate.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in MODES[1:]:
        ax.plot(xs, [p(r[key]["change_ms"], .99) if "change_ms" in r.get(key, {})
                     else float("nan") for r in results], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services")
    ax.set_ylabel("change to reachable, p99 ms")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=.3)
    paths.append(out / "kube-proxy-change-latency.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


@contextlib.contextmanager
def compiled_tools() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kp-bench-"))
    try:
        for src in (HERE / "c").glob("*.c"):
            subprocess.run(["gcc", "-O2", "-o", str(d / src.stem), str(src)], check=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--seconds", type=float, default=3.0, help="per connection-rate sample")
    ap.add_argument("--samples", type=int, default=3,
                    help="connection-rate samples per measurement (their median is reported)")
    ap.add_argument("--reps", type=int, default=10, help="changes timed per mode and size")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plots", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--modes", default="",
                    help="comma list of " + ",".join(k for k, _l in MODES[1:])
                    + " (direct always runs); default all")
    ap.add_argument("--client-node", choices=("n2", "n1"), default="n2",
                    help="n2: client pod on the other node (pod -> n2 -> bridge -> n1 -> "
                    "backend); n1: client pod beside the backends (pod -> n1 -> backend), "
                    "kube-proxy's rules and the socket LB on n1, no tc LB")
    ap.add_argument("--merge", type=Path, default=None,
                    help="JSON lines of earlier sizes' results to include in the table")
    args = ap.parse_args()
    # (no SIGTERM handler: pyroute2 namespace workers inherit it and node set-up fails)
    results = ([json.loads(line) for line in args.merge.read_text().splitlines()
                if line.startswith("{")] if args.merge else [])
    with compiled_tools() as tools:
        modes = tuple(m for m in args.modes.split(",") if m)
        unknown = set(modes) - {k for k, _l in MODES}
        if unknown:
            ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
        bench = Bench(args.seconds, args.reps, tools, ("direct", *modes) if modes else (),
                      args.client_node, args.samples)
        try:
            bench.setup()
            for n in (int(s) for s in args.sizes.split(",")):
                results.append(bench.run_size(n))
                print(json.dumps(results[-1]), flush=True)
        finally:
            bench.teardown()
    print(table(results))
    for path in plots(results, args.plots):
        print(f"plot: {path}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
