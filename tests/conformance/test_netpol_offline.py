"""Every shared network-policy case gives exactly its expected matrix through `policy matrix`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.policy.cli import policy

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance" / "netpol"
CASES = sorted((SHARED / "cases").glob("*.yaml")) if SHARED.is_dir() else []
KEYS = ("80/TCP", "81/TCP", "80/UDP", "81/UDP")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared conformance folder missing: {SHARED}")
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case_matrix_matches_expected(case: Path) -> None:
    expected = json.loads((SHARED / "expected" / f"{case.stem}.json").read_text())
    runner = CliRunner()
    for key in KEYS:
        port, proto = key.split("/")
        args = ["matrix", "--world", str(SHARED / "world.yaml"), "-f", str(case)]
        result = runner.invoke(policy, [*args, "--port", port, "--protocol", proto, "-o", "json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == expected[key], key
