"""Kernel feature probes: the ``require`` contract, and agreement with DESIGN.md on this host."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from ciliate.doctor import cli as doctor_cli
from ciliate.doctor.checks import CheckResult
from ciliate.doctor.probes import (
    ATTACH_KINDS,
    CAPABILITIES,
    HELPERS,
    MAP_TYPES,
    PROG_TYPES,
    KernelFeatures,
    MissingKernelFeature,
    kernel_features,
    probe_kernel,
    require,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="BPF probes need root")


def features(**overrides: bool) -> KernelFeatures:
    """Everything available, except the named ``group__name=False`` overrides."""
    tables: dict[str, dict[str, bool]] = {
        "prog_types": dict.fromkeys(PROG_TYPES, True),
        "map_types": dict.fromkeys(MAP_TYPES, True),
        "helpers": dict.fromkeys(HELPERS, True),
        "attach": dict.fromkeys(ATTACH_KINDS, True),
    }
    for key, value in overrides.items():
        group, name = key.split("__")
        tables[group][name] = value
    return KernelFeatures(
        kernel_release="test", privileged=True, btf=True, reasons={"attach:kprobe": "no PMU"},
        **tables,
    )


def test_require_names_the_missing_feature_and_why() -> None:
    found = features(attach__kprobe=False)
    with pytest.raises(MissingKernelFeature) as info:
        require("kprobe", found)
    assert info.value.name == "kprobe"
    assert "'kprobe'" in str(info.value) and "no PMU" in str(info.value)


def test_kprobes_that_load_but_cannot_attach_are_unavailable() -> None:
    found = features(attach__kprobe=False)
    assert found.prog_types["kprobe"]
    assert not found.has("kprobe")
    assert not found.has("override_return")  # the helper exists, but has nowhere to run
    require("prog_type:kprobe", found)  # the detail is still visible on its own


def test_every_capability_is_derived_and_documented() -> None:
    assert set(features().capabilities) == set(CAPABILITIES)
    assert all(features().capabilities.values())


def test_unknown_feature_names_are_a_programming_error() -> None:
    with pytest.raises(KeyError, match="unknown kernel feature"):
        require("kprobes", features())


def test_features_serialize_to_json() -> None:
    found = features(helpers__bpf_sk_assign=False)
    decoded = json.loads(json.dumps(found.to_dict()))
    assert decoded["capabilities"]["sk_assign"] is False
    assert decoded["helpers"]["bpf_sk_assign"] is False


def test_doctor_exits_non_zero_when_a_required_check_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = [
        CheckResult("tracefs", ok=False, required=True, detail="not mounted"),
        CheckResult("bpf-optional", ok=True, required=False, detail="missing: kprobe"),
    ]
    monkeypatch.setattr(doctor_cli, "run_checks", lambda apply_fix: results)
    outcome = CliRunner().invoke(doctor_cli.doctor, [])
    assert outcome.exit_code == 1
    assert "FAIL  tracefs" in outcome.output and "NOT ready" in outcome.output


# The facts in DESIGN.md's "What this kernel offers", checked on this machine.
AVAILABLE = ("tc", "xdp", "cgroup_sock_addr", "tracepoint", "raw_tracepoint", "ringbuf",
             "lpm_trie", "lru_hash", "send_signal", "sk_assign", "btf", "prog_type:kprobe")
UNAVAILABLE = ("kprobe", "lsm", "fentry", "override_return", "prog_type:lsm",
               "prog_type:tracing")


@pytest.mark.privileged
@as_root
def test_probes_agree_with_what_this_kernel_offers() -> None:
    found = probe_kernel()
    assert found.privileged
    missing = [name for name in AVAILABLE if not found.has(name)]
    present = [name for name in UNAVAILABLE if found.has(name)]
    assert not missing, {name: found.reason(name) for name in missing}
    assert not present
    with pytest.raises(MissingKernelFeature, match="kprobe"):
        require("kprobe", found)


@pytest.mark.privileged
@as_root
def test_probe_results_are_cached_per_process() -> None:
    assert kernel_features() is kernel_features()


@pytest.mark.privileged
@as_root
def test_doctor_json_reports_a_ready_host() -> None:
    outcome = CliRunner().invoke(doctor_cli.doctor, ["-o", "json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {"bcc", "tracefs", "bpffs", "cgroup2"}
    assert report["kernel"]["capabilities"]["kprobe"] is False
