"""The datapath benchmark's code paths on a tiny scale: BPF_PROG_TEST_RUN gives the programs'
verdicts for crafted frames and positive per-packet times, the identity filler adds and removes
exactly its entries, and the C traffic helpers measure through the attached programs."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.geteuid() != 0 or shutil.which("gcc") is None or shutil.which("iperf3") is None:
    pytest.skip("needs root, gcc and iperf3", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: bench/

from bench.datapath.progtest import TC_ACT_OK, TC_ACT_SHOT, TCP_SYN, prog_test_run, tcp_frame
from bench.datapath.run import (
    CLIENT_IP,
    DENIED_PORT,
    ECHO_PORT,
    RULES_PER_IDENTITY,
    SERVER_IP,
    Bench,
    Settings,
)

TINY = Settings(rounds=1, iperf_seconds=0.5, pingpongs=200, connect_seconds=0.3,
                connect_rounds=1, repeat=1_000, syn_batch=100, syn_batches=2, miss_samples=50)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(TINY, tmp_path)
    try:
        b.setup()
        yield b
    finally:
        b.teardown()


def test_bench_paths(bench: Bench) -> None:
    to_fd, from_fd = bench.dp.fn_to.fd, bench.dp.fn_from.fd
    allowed = tcp_frame(CLIENT_IP, SERVER_IP, 41_000, ECHO_PORT, TCP_SYN)
    denied = tcp_frame(CLIENT_IP, SERVER_IP, 41_001, DENIED_PORT, TCP_SYN)
    assert prog_test_run(from_fd, allowed).retval == TC_ACT_OK
    assert prog_test_run(from_fd, denied).retval == TC_ACT_SHOT
    assert prog_test_run(to_fd, denied).retval == TC_ACT_SHOT  # ingress policy at the server too
    drops = [f for f in bench.dp.poll_events(0) if f["verdict"] == "DROPPED"]
    assert {f["drop_reason_desc"] for f in drops} == {"POLICY_DENIED"}

    costs = bench.prog_cost()
    assert all(ns > 0 for ns in costs.values()), costs

    entries = len(list(bench.dp.maps.policy.keys()))
    bench.set_identities(bench.identities + 2)
    assert len(list(bench.dp.maps.policy.keys())) == entries + 2 * RULES_PER_IDENTITY
    bench.set_identities(bench.identities - 2)
    assert len(list(bench.dp.maps.policy.keys())) == entries

    bench.set_programs(True)
    assert bench.connects_per_s() > 0
    p50, p99 = bench.pingpong_us()
    assert 0 < p50 <= p99
    assert bench.dp.metrics()  # the traffic went through the programs
