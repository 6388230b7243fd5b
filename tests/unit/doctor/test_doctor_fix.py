"""Host repairs: header links, mounts, bcc on the venv path, the BTF reader, the check runner."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.doctor import fix
from ciliate.doctor.btf import BtfError, BtfKind, find_type_id
from ciliate.doctor.checks import Check, CheckResult, healthy, run_check

RELEASE = "6.18.44-fc-test"


def make_headers(usr_src: Path, version: str, common: bool = True) -> None:
    arch = usr_src / f"linux-headers-{version}-amd64"
    arch.mkdir(parents=True)
    (arch / "Makefile").write_text("")
    if common:
        (usr_src / f"linux-headers-{version}-common").mkdir()


def test_header_links_point_at_the_newest_installed_headers(tmp_path: Path) -> None:
    usr_src, lib_modules = tmp_path / "src", tmp_path / "modules"
    for version in ("6.1.0-9", "6.1.0-56", "5.10.0-30"):
        make_headers(usr_src, version)
    assert not fix.header_links_ok(RELEASE, lib_modules)
    fix.ensure_header_links(RELEASE, usr_src, lib_modules)
    base = lib_modules / RELEASE
    assert (base / "build").resolve() == (usr_src / "linux-headers-6.1.0-56-amd64").resolve()
    assert (base / "source").resolve() == (usr_src / "linux-headers-6.1.0-56-common").resolve()
    assert fix.header_links_ok(RELEASE, lib_modules)
    assert "already" in fix.ensure_header_links(RELEASE, usr_src, lib_modules)


def test_dangling_links_from_removed_headers_are_replaced(tmp_path: Path) -> None:
    usr_src, lib_modules = tmp_path / "src", tmp_path / "modules"
    make_headers(usr_src, "6.1.0-56", common=False)
    base = lib_modules / RELEASE
    base.mkdir(parents=True)
    (base / "build").symlink_to(usr_src / "linux-headers-6.1.0-1-amd64")  # gone
    fix.ensure_header_links(RELEASE, usr_src, lib_modules)
    arch = (usr_src / "linux-headers-6.1.0-56-amd64").resolve()
    assert (base / "build").resolve() == arch
    assert (base / "source").resolve() == arch  # no -common tree: the arch tree serves both


def test_missing_headers_say_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(fix.FixFailed, match="linux-headers-amd64"):
        fix.ensure_header_links(RELEASE, tmp_path / "src", tmp_path / "modules")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 300)), min_size=1, max_size=6,
                unique=True))
def test_newest_headers_compare_versions_numerically(versions: list[tuple[int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        usr_src = Path(tmp)
        for minor, abi in versions:
            make_headers(usr_src, f"6.{minor}.0-{abi}")
        trees = fix.newest_headers(usr_src)
        assert trees is not None
        minor, abi = max(versions)
        assert trees.build.name == f"linux-headers-6.{minor}.0-{abi}-amd64"


MOUNTS = """\
sysfs /sys sysfs rw 0 0
tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
tracefs /sys/kernel/tracing tracefs rw 0 0
"""


def test_mount_table_is_read_from_proc_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert fix.is_mounted(fix.TRACEFS, mounts)
    assert fix.is_mounted(fix.CGROUP2, mounts)
    assert not fix.is_mounted(fix.BPFFS, mounts)
    assert fix.cgroup2_root(mounts) == Path("/sys/fs/cgroup/unified")
    assert "already" in fix.ensure_mounted(fix.TRACEFS, mounts)


def test_pure_cgroup2_hosts_are_found_and_not_mounted_over(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert fix.cgroup2_root(mounts) == Path("/sys/fs/cgroup")
    with pytest.raises(fix.FixFailed, match="pure v2"):
        fix.ensure_mounted(fix.CGROUP2, mounts)


def test_bcc_is_linked_alone_onto_the_venv_path(tmp_path: Path) -> None:
    debian_bcc = tmp_path / "dist-packages" / "bcc"
    debian_bcc.mkdir(parents=True)
    (tmp_path / "dist-packages" / "numpy").mkdir()
    venv, site = tmp_path / "venv", tmp_path / "venv" / "site"
    site.mkdir(parents=True)
    fix.ensure_bcc_path(venv, site, debian_bcc)
    link_dir = Path((site / fix.BCC_PTH).read_text().strip())
    assert sorted(p.name for p in link_dir.iterdir()) == ["bcc"]
    assert (link_dir / "bcc").resolve() == debian_bcc.resolve()
    assert "already" in fix.ensure_bcc_path(venv, site, debian_bcc)


def test_bcc_link_to_a_moved_package_is_repointed(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "bcc", tmp_path / "new" / "bcc"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    venv, site = tmp_path / "venv", tmp_path / "site"
    site.mkdir()
    fix.ensure_bcc_path(venv, site, old)
    fix.ensure_bcc_path(venv, site, new)
    assert (venv / fix.BCC_LINK_DIR / "bcc").resolve() == new.resolve()


def test_bcc_missing_from_debian_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(fix.FixFailed, match="python3-bpfcc"):
        fix.ensure_bcc_path(tmp_path, tmp_path, tmp_path / "nope")


def btf_blob(types: list[bytes], strings: bytes) -> bytes:
    type_section = b"".join(types)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(type_section),
                         len(type_section), len(strings))
    return header + type_section + strings


def btf_type(name_off: int, kind: BtfKind, vlen: int = 0, size: int = 0) -> bytes:
    return struct.pack("<III", name_off, (kind << 24) | vlen, size)


def test_btf_reader_finds_types_after_variable_length_ones(tmp_path: Path) -> None:
    strings = b"\0int\0task_struct\0pid\0do_exit\0"
    off = {name: strings.index(b"\0" + name.encode() + b"\0") + 1
           for name in ("int", "task_struct", "pid", "do_exit")}
    types = [
        btf_type(off["int"], BtfKind.INT, size=4) + struct.pack("<I", 32),  # id 1
        btf_type(off["task_struct"], BtfKind.STRUCT, vlen=1, size=8)  # id 2
        + struct.pack("<III", off["pid"], 1, 0),
        btf_type(0, BtfKind.FUNC_PROTO, vlen=2) + struct.pack("<IIII", 0, 1, 0, 1),  # id 3
        btf_type(off["do_exit"], BtfKind.FUNC, size=3),  # id 4
    ]
    path = tmp_path / "btf"
    path.write_bytes(btf_blob(types, strings))
    assert find_type_id(BtfKind.STRUCT, "task_struct", path) == 2
    assert find_type_id(BtfKind.FUNC, "do_exit", path) == 4
    assert find_type_id(BtfKind.FUNC, "task_struct", path) is None  # right name, wrong kind
    assert find_type_id(BtfKind.FUNC, "missing", path) is None
    path.write_bytes(b"\0" * 32)
    with pytest.raises(BtfError):
        find_type_id(BtfKind.FUNC, "do_exit", path)


def test_a_failed_check_is_repaired_and_checked_again() -> None:
    state = {"mounted": False}

    def repair() -> str:
        state["mounted"] = True
        return "mounted"

    check = Check("thing", True, lambda: (state["mounted"], "detail"), repair)
    assert not run_check(check).ok  # without --fix nothing changes
    assert not state["mounted"]
    result = run_check(check, apply_fix=True)
    assert result.ok and result.fixed == "mounted"


def test_a_failed_repair_is_reported_not_raised() -> None:
    def repair() -> str:
        raise fix.FixFailed("cannot")

    result = run_check(Check("thing", True, lambda: (False, "x"), repair), apply_fix=True)
    assert not result.ok and result.fixed == "repair failed: cannot"


def test_only_required_checks_decide_health() -> None:
    optional_failure = CheckResult("opt", ok=False, required=False, detail="")
    required_ok = CheckResult("req", ok=True, required=True, detail="")
    assert healthy([optional_failure, required_ok])
    assert not healthy([CheckResult("req", ok=False, required=True, detail="")])
