"""The host checks behind `ciliate doctor`, as one table: what is checked, whether it is
required, and which repair `--fix` applies when it fails.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ciliate.doctor import fix
from ciliate.doctor.btf import VMLINUX_BTF
from ciliate.doctor.probes import CAPABILITIES, KernelFeatures, kernel_features

# What the datapath and security services cannot run without.
REQUIRED_CAPABILITIES = (
    "tc",
    "xdp",
    "cgroup_sock_addr",
    "tracepoint",
    "raw_tracepoint",
    "ringbuf",
    "lpm_trie",
    "lru_hash",
    "btf",
)
# Nice to have: policies that need these are refused by name when they are missing.
OPTIONAL_CAPABILITIES = tuple(name for name in CAPABILITIES if name not in REQUIRED_CAPABILITIES)


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's report."""

    name: str
    ok: bool
    required: bool
    detail: str
    fixed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """A named test of the host with an optional idempotent repair."""

    name: str
    required: bool
    run: Callable[[], tuple[bool, str]]
    repair: Callable[[], str] | None = None


def _root() -> tuple[bool, str]:
    uid = os.geteuid()
    return uid == 0, "running as root" if uid == 0 else f"euid {uid}: BPF and mounts need root"


def _bcc() -> tuple[bool, str]:
    try:
        module = importlib.import_module("bcc")
    except Exception as exc:
        return False, f"import bcc failed: {type(exc).__name__}: {exc}"
    return True, f"bcc from {Path(module.__file__ or '?').parent}"


def _in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def _repair_bcc() -> str:
    if not _in_venv():
        raise fix.FixFailed("not running from a virtualenv: apt-get install python3-bpfcc")
    result = fix.ensure_bcc_path(Path(sys.prefix), Path(sysconfig.get_paths()["purelib"]))
    importlib.invalidate_caches()
    link_dir = str(Path(sys.prefix) / fix.BCC_LINK_DIR)
    if link_dir not in sys.path:
        sys.path.append(link_dir)
    return result


def _headers() -> tuple[bool, str]:
    release = platform.release()
    base = fix.LIB_MODULES / release
    if fix.header_links_ok(release):
        build = (base / "build").resolve()
        note = "" if release in build.name else f" (older than the running {release}, expected)"
        return True, f"{base}/build -> {build}{note}"
    return False, f"{base}/build or source does not resolve to installed headers"


def _mount_check(mount: fix.Mount) -> Callable[[], tuple[bool, str]]:
    def run() -> tuple[bool, str]:
        if fix.is_mounted(mount):
            return True, f"{mount.fstype} at {mount.target}"
        return False, f"{mount.fstype} not mounted at {mount.target}"

    return run


def _bpftool() -> tuple[bool, str]:
    found = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None
    )
    return (True, found) if found else (False, "bpftool not found: apt-get install bpftool")


def _btf() -> tuple[bool, str]:
    if VMLINUX_BTF.is_file():
        return True, str(VMLINUX_BTF)
    return False, f"{VMLINUX_BTF} missing: kernel built without CONFIG_DEBUG_INFO_BTF"


def _features(names: tuple[str, ...], required: bool) -> Callable[[], tuple[bool, str]]:
    def run() -> tuple[bool, str]:
        found: KernelFeatures = kernel_features()
        missing = [name for name in names if not found.capabilities.get(name, False)]
        present = [name for name in names if name not in missing]
        detail = f"available: {', '.join(present) or 'none'}"
        if missing:
            detail += f"; missing: {', '.join(missing)}"
        return (not missing) if required else True, detail

    return run


CHECKS: tuple[Check, ...] = (
    Check("root", True, _root),
    Check("bcc", True, _bcc, _repair_bcc),
    Check("kernel-headers", True, _headers, lambda: fix.ensure_header_links(platform.release())),
    Check("tracefs", True, _mount_check(fix.TRACEFS), lambda: fix.ensure_mounted(fix.TRACEFS)),
    Check("bpffs", True, _mount_check(fix.BPFFS), lambda: fix.ensure_mounted(fix.BPFFS)),
    Check("cgroup2", True, _mount_check(fix.CGROUP2), lambda: fix.ensure_mounted(fix.CGROUP2)),
    Check("bpftool", True, _bpftool),
    Check("btf", True, _btf),
    Check("bpf-features", True, _features(REQUIRED_CAPABILITIES, required=True)),
    Check("bpf-optional", False, _features(OPTIONAL_CAPABILITIES, required=False)),
)


def run_check(check: Check, apply_fix: bool = False) -> CheckResult:
    """Run ``check``; with ``apply_fix``, repair a failure and check again."""
    ok, detail = check.run()
    fixed: str | None = None
    if not ok and apply_fix and check.repair is not None:
        try:
            fixed = check.repair()
        except (fix.FixFailed, OSError) as exc:
            fixed = f"repair failed: {exc}"
        ok, detail = check.run()
    return CheckResult(check.name, ok, check.required, detail, fixed)


def run_checks(apply_fix: bool = False, checks: tuple[Check, ...] = CHECKS) -> list[CheckResult]:
    """Every check in order; repairs run before the kernel-feature checks that depend on them."""
    results = []
    for check in checks:
        result = run_check(check, apply_fix)
        if result.fixed is not None:
            kernel_features.cache_clear()  # a repaired mount can change what the probes find
        results.append(result)
    return results


def healthy(results: list[CheckResult]) -> bool:
    return all(result.ok for result in results if result.required)
