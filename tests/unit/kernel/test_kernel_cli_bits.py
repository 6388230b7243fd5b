"""Small pieces of the CLI and client: tables, context file mode, plugin merging, replicas."""

from __future__ import annotations

import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ciliate.cli.main import _replicas, cli
from ciliate.cli.output import table
from ciliate.cli.plugins import _merge
from ciliate.client import ClientContext, ContextMissing


def test_table_aligns_columns() -> None:
    out = table(["ID", "LABELS"], [[1, "reserved:host"], [256, "k8s:app=web"]])
    assert out.splitlines() == ["ID    LABELS", "1     reserved:host", "256   k8s:app=web"]


def test_context_file_is_private_and_round_trips(tmp_path: Path) -> None:
    ctx = ClientContext(state_dir=str(tmp_path), nats_url="nats://127.0.0.1:1", token="s3cret",
                        services={"identity": ["http://127.0.0.1:2"]})
    path = ctx.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ClientContext.load(tmp_path) == ctx


def test_missing_context_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ContextMissing, match=str(tmp_path / "context.json")):
        ClientContext.load(tmp_path)


def test_groups_of_the_same_name_merge() -> None:
    root = click.Group("root")
    first, second = click.Group("bpf"), click.Group("bpf")
    first.add_command(click.Command("policy"))
    second.add_command(click.Command("lb"))
    _merge(root, first)
    _merge(root, second)
    bpf = root.commands["bpf"]
    assert isinstance(bpf, click.Group)
    assert sorted(bpf.commands) == ["lb", "policy"]


def test_replicas_flag_is_validated() -> None:
    assert _replicas(("identity=3", "lb=2")) == {"identity": 3, "lb": 2}
    for bad in ("identity", "identity=0", "identity=x"):
        with pytest.raises(click.BadParameter, match="expected SERVICE=N"):
            _replicas((bad,))


def test_up_refuses_unknown_service_replicas(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["up", "--state-dir", str(tmp_path), "--replicas", "nope=2"])
    assert result.exit_code != 0
    assert "unknown service" in result.output
    assert not (tmp_path / "context.json").exists()


def test_apply_refuses_a_bad_file_before_contacting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                   "spec: {ports: [{port: 70000}]}\n")
    result = CliRunner().invoke(cli, ["apply", "-f", str(bad)],
                                env={"CILIATE_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert "spec.ports[0].port" in result.output
