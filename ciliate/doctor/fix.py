"""Repairs the doctor can make to a host: header links and the three pseudo-filesystem mounts.

Every repair is idempotent: it looks first and acts only on what is missing, so `make up` can
run it on every start. Paths are parameters so tests can point the header logic at a tmp tree.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROC_MOUNTS = Path("/proc/self/mounts")
USR_SRC = Path("/usr/src")
LIB_MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class Mount:
    """A pseudo filesystem bcc and the services need, at the path they expect it."""

    fstype: str
    target: Path
    source: str


TRACEFS = Mount("tracefs", Path("/sys/kernel/tracing"), "tracefs")
BPFFS = Mount("bpf", Path("/sys/fs/bpf"), "bpf")
CGROUP2 = Mount("cgroup2", Path("/sys/fs/cgroup/unified"), "cgroup2")
MOUNTS = (TRACEFS, BPFFS, CGROUP2)


class FixFailed(RuntimeError):
    """A repair was attempted and did not work; the message says what to do by hand."""


def mounted_fstypes(mounts_file: Path = PROC_MOUNTS) -> dict[Path, str]:
    """Mount point → filesystem type, the last mount at a path winning (as the kernel shows it)."""
    table: dict[Path, str] = {}
    for line in mounts_file.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            target = fields[1].replace("\\040", " ")
            table[Path(target)] = fields[2]
    return table


def is_mounted(mount: Mount, mounts_file: Path = PROC_MOUNTS) -> bool:
    return mounted_fstypes(mounts_file).get(mount.target) == mount.fstype


def cgroup2_root(mounts_file: Path = PROC_MOUNTS) -> Path | None:
    """Where cgroup v2 is mounted: the hybrid-layout path if there, else the first cgroup2 mount."""
    table = mounted_fstypes(mounts_file)
    if table.get(CGROUP2.target) == "cgroup2":
        return CGROUP2.target
    return next((path for path, fstype in table.items() if fstype == "cgroup2"), None)


def ensure_mounted(mount: Mount, mounts_file: Path = PROC_MOUNTS) -> str:
    """Mount ``mount`` unless it is already there; returns what was done."""
    if is_mounted(mount, mounts_file):
        return f"{mount.target} already has {mount.fstype}"
    if mount is CGROUP2 and mounted_fstypes(mounts_file).get(mount.target.parent) == "cgroup2":
        raise FixFailed(
            f"{mount.target.parent} is itself cgroup2 (a pure v2 host); making {mount.target} "
            "there would create a cgroup, so mount cgroup2 at that path by hand if you need it"
        )
    mount.target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", mount.fstype, mount.source, str(mount.target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FixFailed(f"mount -t {mount.fstype} {mount.target}: {done.stderr.strip()}")
    return f"mounted {mount.fstype} at {mount.target}"


_VERSION_NUMBERS = re.compile(r"\d+")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _VERSION_NUMBERS.findall(name))


@dataclass(frozen=True)
class HeaderTrees:
    """The newest installed header package: ``build`` (arch tree) and ``source`` (common tree)."""

    build: Path
    source: Path


def newest_headers(usr_src: Path = USR_SRC) -> HeaderTrees | None:
    """The newest ``linux-headers-<ver>-<arch>`` tree and its ``-common`` sibling, if installed.

    Debian ships headers for its own kernel only; this machine runs a newer custom kernel, so
    the newest installed tree is the best available (read tracepoint args, not struct layouts).
    """
    arch_trees = [
        path
        for path in usr_src.glob("linux-headers-*")
        if path.is_dir() and not path.name.endswith("-common") and (path / "Makefile").exists()
    ]
    if not arch_trees:
        return None
    build = max(arch_trees, key=lambda path: _version_key(path.name))
    version = build.name.removeprefix("linux-headers-").rsplit("-", 1)[0]
    common = usr_src / f"linux-headers-{version}-common"
    return HeaderTrees(build=build, source=common if common.is_dir() else build)


def header_links_ok(release: str, lib_modules: Path = LIB_MODULES) -> bool:
    """Both ``build`` and ``source`` of the running release resolve to a directory."""
    base = lib_modules / release
    return all((base / link).is_dir() for link in ("build", "source"))


def ensure_header_links(
    release: str, usr_src: Path = USR_SRC, lib_modules: Path = LIB_MODULES
) -> str:
    """Point ``/lib/modules/<release>/{build,source}`` at the newest installed headers."""
    if header_links_ok(release, lib_modules):
        return f"{lib_modules / release}/build and source already resolve"
    trees = newest_headers(usr_src)
    if trees is None:
        raise FixFailed(f"no linux-headers-* under {usr_src}: apt-get install linux-headers-amd64")
    base = lib_modules / release
    base.mkdir(parents=True, exist_ok=True)
    done = []
    for link, target in (("build", trees.build), ("source", trees.source)):
        path = base / link
        if path.is_dir():
            continue
        if path.is_symlink() or path.exists():
            path.unlink()  # a dangling link from an older header package
        path.symlink_to(target)
        done.append(f"{path} -> {target}")
    return "linked " + ", ".join(done)


DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
BCC_LINK_DIR = "bcc-link"
BCC_PTH = "debian-bcc.pth"


def ensure_bcc_path(venv: Path, site_packages: Path, debian_bcc: Path = DEBIAN_BCC) -> str:
    """Make Debian's bcc package (and only it) importable from the virtualenv at ``venv``.

    A folder holding one symlink goes on the path, not all of dist-packages: Debian's other
    packages would shadow the pinned ones in the venv.
    """
    if not debian_bcc.is_dir():
        raise FixFailed(f"{debian_bcc} missing: apt-get install python3-bpfcc")
    link_dir = venv / BCC_LINK_DIR
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "bcc"
    done = []
    if not (link.is_symlink() and link.resolve() == debian_bcc.resolve()):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(debian_bcc)
        done.append(f"{link} -> {debian_bcc}")
    pth = site_packages / BCC_PTH
    if not pth.is_file() or pth.read_text().strip() != str(link_dir):
        pth.write_text(f"{link_dir}\n")
        done.append(f"wrote {pth}")
    return "; ".join(done) if done else "bcc already on the virtualenv path"
