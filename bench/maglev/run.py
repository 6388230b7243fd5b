"""Maglev table build time and memory, beside the plain reference and Cilium's Go figures.

Run from the repository root: ``.venv/bin/python -m bench.maglev`` prints a Markdown
report; ``--write`` also replaces the "## Maglev" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from services.lb.core.maglev import (
    MaglevBackend,
    backend_hash_key,
    build_table,
    build_table_reference,
    table_bytes,
)

SIZES = (2039, 16381, 65521, 131071)
BACKEND_COUNTS = (10, 100, 1000)
COMMAND = ".venv/bin/python -m bench.maglev --write"
SECTION = "## Maglev"
BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"


@dataclass(frozen=True)
class GoFigure:
    """A Go timing Cilium published for ``GetLookupTable`` with N = 1,000 backends."""

    m: int
    ms: float
    source: str


CILIUM_GO = (
    GoFigure(16381, 8.17, "cilium/cilium#35885, i9-13950HX, 32 threads"),
    GoFigure(131071, 271.0, "cilium/cilium#14597"),
)


@dataclass(frozen=True)
class Goal:
    m: int
    n: int
    max_ms: float


GOALS = (Goal(16381, 100, 0.5), Goal(16381, 1000, 2.0), Goal(131071, 1000, 10.0))
MAX_ALLOC_MB = 16.0


def pod_backends(count: int) -> list[MaglevBackend]:
    """Backends keyed like pod endpoints, as the lb service hashes them."""
    return [
        MaglevBackend(i, backend_hash_key(f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 8080))
        for i in range(count)
    ]


def time_ms(build: Callable[[], object], budget_s: float, min_runs: int) -> tuple[float, float]:
    """Median and fastest wall time of one call in ms, over ``min_runs`` or ``budget_s``."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        build()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def peak_alloc_mb(m: int, n: int) -> float:
    """tracemalloc's peak for one build (NumPy buffers are traced; the backend list is not)."""
    backends = pod_backends(n)
    build_table(backends, m)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        build_table(backends, m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def report() -> str:
    build_table(pod_backends(2), 251)  # compile or load the kernel before timing
    fast: dict[tuple[int, int], float] = {}  # fastest build, ms
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND}` (from the repository root).",
        "",
        f"Machine: {platform.machine()} {_cpu_name()}, Python {platform.python_version()}, "
        f"NumPy {np.__version__}, numba {numba.__version__}, load average at start "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs. Fast = NumPy murmur3 + numba fill, "
        "single-threaded (median and fastest of repeated builds, at least 0.3 s a cell); "
        "reference = the plain-Python build in the same run (one build, all sizes). Every cell "
        "also checks that both give the same table bytes. Goals and ratios use the fastest "
        "build (as `timeit` advises: slower runs measure other processes on this shared "
        "2-CPU machine, see the load average); the median shows what load does to it.",
        "",
        "| M | N | fast median (ms) | fast min (ms) | reference (ms) | reference / fast |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in SIZES:
        for n in BACKEND_COUNTS:
            backends = pod_backends(n)
            table = build_table(backends, m)
            start = time.perf_counter()
            reference = build_table_reference(backends, m)
            reference_ms = (time.perf_counter() - start) * 1e3
            if table_bytes(table) != table_bytes(reference):
                raise SystemExit(f"fast and reference tables differ at M={m} N={n}")
            fast_ms, fast_min = time_ms(functools.partial(build_table, backends, m), 0.3, 5)
            fast[m, n] = fast_min
            cells = (m, n, f"{fast_ms:.3f}", f"{fast_min:.3f}", f"{reference_ms:.1f}")
            lines.append(f"| {' | '.join(map(str, cells))} | {reference_ms / fast_ms:.0f}x |")

    peak = peak_alloc_mb(131071, 1000)
    lines += [
        "",
        f"Allocations (tracemalloc peak) for one build at M=131071, N=1000: {peak:.2f} MB "
        f"(goal <= {MAX_ALLOC_MB:.0f} MB; Cilium preallocates 327 MB of permutations at "
        "M=65521, cilium/cilium#14622). No M x N permutation matrix is built.",
        "",
        "Cilium's published Go figures for N=1000 (their machines, not this one):",
        "",
        "| M | Cilium Go (ms) | source | ours (ms) | Go / ours |",
        "|---:|---:|---|---:|---:|",
    ]
    for go in CILIUM_GO:
        ours = fast[go.m, 1000]
        lines.append(f"| {go.m} | {go.ms} | {go.source} | {ours:.3f} | {go.ms / ours:.1f}x |")
    lines += ["", "Goals on this machine:", ""]
    for goal in GOALS:
        got = fast[goal.m, goal.n]
        verdict = "met" if got <= goal.max_ms else "MISSED"
        lines.append(f"- M={goal.m}, N={goal.n}: {got:.3f} ms <= {goal.max_ms} ms: {verdict}")
    verdict = "met" if peak <= MAX_ALLOC_MB else "MISSED"
    lines.append(
        f"- allocations M=131071, N=1000: {peak:.2f} MB <= {MAX_ALLOC_MB:.0f} MB: {verdict}"
    )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_section(section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) only the Maglev section, leaving other sections untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        rest = "" if end < 0 else text[end:]
        new = text[: start + 1] + section + rest
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    section = report()
    sys.stdout.write(section)
    if args.write:
        write_section(section)
    return 0
