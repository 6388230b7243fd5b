"""`ciliate doctor --fix` on a host missing its mounts and header links, in a private mount
namespace so the real host is untouched."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare(1)",
    ),
]

BREAK_HOST = """
set -e
umount /sys/kernel/tracing
umount /sys/fs/bpf
umount /sys/fs/cgroup/unified
mount -t tmpfs tmpfs /lib/modules
{python} -m ciliate.doctor -o json > "$1/before.json" || true
{python} -m ciliate.doctor --fix -o json > "$1/fixed.json"
{python} -m ciliate.doctor --fix -o json > "$1/again.json"
readlink /lib/modules/{release}/build > "$1/build"
"""


def test_fix_mounts_and_links_what_is_missing_and_is_idempotent(tmp_path: Path) -> None:
    script = BREAK_HOST.format(python=sys.executable, release=platform.release())
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script, "_", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path
    before = json.loads((out / "before.json").read_text())
    fixed = json.loads((out / "fixed.json").read_text())
    again = json.loads((out / "again.json").read_text())

    broken = {c["name"] for c in before["checks"] if not c["ok"]}
    assert before["ok"] is False
    assert broken >= {"kernel-headers", "tracefs", "bpffs", "cgroup2"}
    assert fixed["ok"] is True
    assert {c["name"] for c in fixed["checks"] if c["fixed"]} == broken - {"bpf-features"}
    assert fixed["kernel"]["capabilities"]["tracepoint"] is True  # probed after the remount
    assert again["ok"] is True
    assert not [c for c in again["checks"] if c["fixed"]]
    assert (out / "build").read_text().strip().startswith("/usr/src/linux-headers-")
