"""Query parameters, environment config, process-event filters and the service map: the
pure parts the events service's edge relies on."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows import Endpoint, Flow, Verdict
from services.events.core import process as proc
from services.events.core.config import ConfigError, from_env
from services.events.core.request import RequestError, parse_flow_request, parse_time
from services.events.core.servicemap import build, workload_of

NOW = 1_700_000_000_000_000_000


@given(st.integers(0, 99), st.integers(0, 59), st.integers(0, 59))
def test_durations_count_back_from_now(h: int, m: int, s: int) -> None:
    text = f"{h}h{m}m{s}s"
    assert parse_time(text, NOW, "since") == NOW - (h * 3600 + m * 60 + s) * 1_000_000_000


def test_times_in_rfc3339_and_nanoseconds() -> None:
    assert parse_time("2023-11-14T22:13:20Z", NOW, "since") == NOW
    assert parse_time(str(NOW + 5), NOW, "until") == NOW + 5
    with pytest.raises(RequestError) as err:
        parse_time("soon", NOW, "until")
    assert err.value.field == "until"


def test_flow_request_parses_filters_window_and_follow() -> None:
    req = parse_flow_request({"whitelist": ['[{"verdict": ["DROPPED"]}]'], "last": ["5"],
                              "follow": ["true"], "node": ["n1", "n2"]}, NOW)
    assert req.follow and req.query.number == 5 and not req.query.first
    assert req.query.nodes == ["n1", "n2"]
    dropped = Flow(time_ns=1, verdict=Verdict.DROPPED).to_wire()
    forwarded = Flow(time_ns=1, verdict=Verdict.FORWARDED).to_wire()
    assert req.query.accepts(dropped) and not req.query.accepts(forwarded)


@pytest.mark.parametrize(("params", "field"), [
    ({"whitelist": ['[{"verdict": ["NOPE"]}]']}, "whitelist"),
    ({"blacklist": ['{"verdict": "DROPPED"}']}, "blacklist"),
    ({"first": ["1"], "last": ["1"]}, "first"),
    ({"all": ["true"], "last": ["1"]}, "all"),
    ({"since": [str(NOW)], "until": [str(NOW - 1)]}, "until"),
    ({"encoding": ["xml"]}, "encoding"),
    ({"follow": ["maybe"]}, "follow"),
    ({"last": ["1", "2"]}, "last"),
])
def test_bad_parameters_name_their_field(params: dict[str, list[str]], field: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_flow_request(params, NOW)
    assert err.value.field == field


def test_config_from_environment() -> None:
    cfg = from_env({"CILIATE_EVENTS_RING_SIZE": "8191",
                    "CILIATE_HUBBLE_METRICS": "flow,drop:sourceContext=namespace tcp",
                    "CILIATE_EVENTS_EXPORT_ALLOWLIST": '{"verdict":["DROPPED"]}\n'
                                                       '{"source_pod":["x/"]}',
                    "CILIATE_EVENTS_EXPORT_FIELDMASK": "time, verdict"})
    assert cfg.ring_size == 8191
    assert [m.name for m in cfg.metrics] == ["flows-processed", "drop", "tcp"]
    assert cfg.metrics[1].label_names() == ("source", "reason", "protocol")
    assert len(cfg.export.allow_list) == 2 and cfg.export.field_mask == ["time", "verdict"]
    assert [m.name for m in from_env({}).metrics] == ["flows-processed", "drop"]
    assert from_env({"CILIATE_HUBBLE_METRICS": ""}).metrics == []


def test_otlp_config_from_environment() -> None:
    assert from_env({}).otlp.endpoint == ""  # off by default
    cfg = from_env({"CILIATE_EVENTS_OTLP_ENDPOINT": "https://otel.example:4318",
                    "CILIATE_EVENTS_OTLP_HEADERS": "authorization=Bearer%20t, x-tenant=a",
                    "CILIATE_EVENTS_OTLP_TIMEOUT": "2.5", "CILIATE_EVENTS_OTLP_QUEUE": "100",
                    "CILIATE_EVENTS_OTLP_DENYLIST": '[{"verdict": ["DROPPED"]}]',
                    "CILIATE_EVENTS_OTLP_FIELDMASK": "time verdict",
                    "CILIATE_EVENTS_EXPORT_FIELDMASK": "uuid"}).otlp
    assert cfg.endpoint == "https://otel.example:4318/v1/logs"
    assert cfg.headers == {"authorization": "Bearer t", "x-tenant": "a"}
    assert (cfg.timeout, cfg.queue) == (2.5, 100)
    assert len(cfg.export.deny_list) == 1 and cfg.export.field_mask == ["time", "verdict"]
    url = "http://127.0.0.1:4318/otlp/v1/logs"
    assert from_env({"CILIATE_EVENTS_OTLP_ENDPOINT": url}).otlp.endpoint == url


@pytest.mark.parametrize(("env", "variable"), [
    ({"CILIATE_EVENTS_OTLP_ENDPOINT": "ftp://x/"}, "CILIATE_EVENTS_OTLP_ENDPOINT"),
    ({"CILIATE_EVENTS_OTLP_ENDPOINT": "http://:4318/"}, "CILIATE_EVENTS_OTLP_ENDPOINT"),
    ({"CILIATE_EVENTS_OTLP_ENDPOINT": "http://h:port/"}, "CILIATE_EVENTS_OTLP_ENDPOINT"),
    ({"CILIATE_EVENTS_OTLP_HEADERS": "novalue"}, "CILIATE_EVENTS_OTLP_HEADERS"),
    ({"CILIATE_EVENTS_OTLP_HEADERS": "a=b%0D%0Ax: y"}, "CILIATE_EVENTS_OTLP_HEADERS"),
    ({"CILIATE_EVENTS_OTLP_TIMEOUT": "0"}, "CILIATE_EVENTS_OTLP_TIMEOUT"),
    ({"CILIATE_EVENTS_OTLP_QUEUE": "0"}, "CILIATE_EVENTS_OTLP_QUEUE"),
    ({"CILIATE_EVENTS_OTLP_ALLOWLIST": "[{"}, "CILIATE_EVENTS_OTLP_ALLOWLIST"),
])
def test_bad_otlp_config_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_env(env)
    assert err.value.variable == variable


@pytest.mark.parametrize(("env", "variable"), [
    ({"CILIATE_EVENTS_RING_SIZE": "4096"}, "CILIATE_EVENTS_RING_SIZE"),
    ({"CILIATE_EVENTS_RING_SIZE": "x"}, "CILIATE_EVENTS_RING_SIZE"),
    ({"CILIATE_HUBBLE_METRICS": "nope"}, "CILIATE_HUBBLE_METRICS"),
    ({"CILIATE_EVENTS_EXPORT_DENYLIST": "[{"}, "CILIATE_EVENTS_EXPORT_DENYLIST"),
    ({"CILIATE_EVENTS_EXPORT_ALLOWLIST": '[{"bogus": []}]'}, "CILIATE_EVENTS_EXPORT_ALLOWLIST"),
])
def test_bad_config_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_env(env)
    assert err.value.variable == variable


def _exec(ns: str, pod: str, binary: str) -> dict[str, Any]:
    return {"process_exec": {"process": {"binary": binary, "pod": {"namespace": ns,
                                                                   "name": pod}}}}


def test_process_filters_or_within_and_across() -> None:
    events = [_exec("x", "a", "/bin/sh"), _exec("y", "b", "/usr/bin/curl"),
              {"process_exit": {"process": {"binary": "/bin/sh"}}}]
    match = proc.make_predicate(["x", "y"], [], ["curl$", "^/bin/"], [])
    assert [match(e) for e in events] == [True, True, False]
    match = proc.make_predicate([], ["y/b"], [], ["process_exec"])
    assert [match(e) for e in events] == [False, True, False]
    assert proc.make_predicate(["z"], [], [], [])({"k": "lost", "ln": 3})
    with pytest.raises(RequestError):
        proc.make_predicate([], [], ["("], [])


def test_service_map_edges_by_workload_and_verdict() -> None:
    web = Endpoint(namespace="shop", pod_name="web-5d4f8b6c9-x2k9q")
    db = Endpoint(namespace="shop", pod_name="db-6b9f7c8d5-k2lmn")
    records = [
        Flow(time_ns=1, verdict=Verdict.FORWARDED, source=web, destination=db, protocol=6,
             destination_port=5432, is_reply=False).to_wire(),
        Flow(time_ns=2, verdict=Verdict.DROPPED, source=web, destination=db, protocol=6,
             destination_port=5432).to_wire(),
        Flow(time_ns=3, verdict=Verdict.FORWARDED, source=db, destination=web,
             is_reply=True).to_wire(),
        Flow(time_ns=4, verdict=Verdict.FORWARDED, source_ip="1.1.1.1", destination=web,
             source=Endpoint(identity=2)).to_wire(),
    ]
    out = build(records)
    assert [n["id"] for n in out["nodes"]] == ["reserved:world", "shop/db", "shop/web"]
    edges = {(e["source"], e["destination"]): e for e in out["edges"]}
    assert set(edges) == {("shop/web", "shop/db"), ("reserved:world", "shop/web")}
    assert edges[("shop/web", "shop/db")]["verdict"] == "DROPPED"
    assert edges[("shop/web", "shop/db")]["verdicts"] == {"FORWARDED": 1, "DROPPED": 1}
    assert edges[("shop/web", "shop/db")]["ports"] == ["5432/TCP"]
    assert workload_of("a", None) == "a" and workload_of("x-1", [["api", "Deployment"]]) == "api"
