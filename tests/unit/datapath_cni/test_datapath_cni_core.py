"""The CNI protocol core: environment checks, error codes, result shape, host-local IPAM."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.datapath.cni.core.invocation import (
    CniError,
    Command,
    ErrorCode,
    error_for_status,
    parse_cni_args,
    parse_invocation,
    result_document,
)
from services.datapath.cni.core.ipam import HostLocalIpam, IpamExhausted

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/p",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web"}
CONF = json.dumps({"cniVersion": "1.0.0", "name": "ciliate", "type": "ciliate-cni",
                   "agent": {"url": "http://127.0.0.1:9890/"}}).encode()


def test_add_invocation_carries_the_pod_and_the_agent() -> None:
    inv = parse_invocation(ENV, CONF)
    assert inv.command is Command.ADD
    assert inv.agent_request() == {"containerID": "abc", "netns": "/var/run/netns/p",
                                   "ifName": "eth0", "podNamespace": "prod", "podName": "web"}
    assert inv.agent.url == "http://127.0.0.1:9890"


@pytest.mark.parametrize(("env", "conf", "code"), [
    ({**ENV, "CNI_COMMAND": "BOGUS"}, CONF, ErrorCode.INVALID_ENVIRONMENT),
    ({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, CONF, ErrorCode.INVALID_ENVIRONMENT),
    ({**ENV, "CNI_ARGS": "K8S_POD_NAME=web"}, CONF, ErrorCode.INVALID_ENVIRONMENT),
    ({**ENV, "CNI_ARGS": "garbage"}, CONF, ErrorCode.INVALID_ENVIRONMENT),
    (ENV, b"{", ErrorCode.DECODE_FAILURE),
    (ENV, b'{"cniVersion": "2.0.0"}', ErrorCode.INCOMPATIBLE_VERSION),
    (ENV, b'{"name": "x"}', ErrorCode.INVALID_NETWORK_CONFIG),
    ({**ENV, "CNI_COMMAND": "CHECK"}, b'{"cniVersion": "0.3.1"}', ErrorCode.INCOMPATIBLE_VERSION),
    (ENV, b'{"cniVersion": "1.0.0", "agent": {"url": "unix:/x"}}',
     ErrorCode.INVALID_NETWORK_CONFIG),
])
def test_bad_invocations_get_the_spec_error_code(env: dict[str, str], conf: bytes,
                                                 code: ErrorCode) -> None:
    with pytest.raises(CniError) as info:
        parse_invocation(env, conf)
    assert info.value.code == code
    doc = info.value.document()
    assert doc["code"] == int(code) and doc["msg"]


def test_del_needs_no_netns_since_it_may_already_be_gone() -> None:
    env = {k: v for k, v in ENV.items() if k not in ("CNI_NETNS", "CNI_ARGS")}
    inv = parse_invocation({**env, "CNI_COMMAND": "DEL"}, CONF)
    assert inv.command is Command.DEL and inv.netns == ""


def test_cni_args_parse() -> None:
    assert parse_cni_args("A=1; B = two ;;") == {"A": "1", "B": "two"}


def test_result_indexes_interfaces_and_adds_version_for_old_specs() -> None:
    reply = {"interfaces": [{"name": "lxc1", "mac": "m1"},
                            {"name": "eth0", "mac": "m2", "sandbox": "/n"}],
             "ips": [{"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": "eth0"}],
             "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]}
    new = result_document(reply, "1.0.0")
    assert new["ips"] == [{"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1}]
    assert new["cniVersion"] == "1.0.0" and new["routes"] == reply["routes"]
    assert result_document(reply, "0.3.1")["ips"][0]["version"] == "4"


@pytest.mark.parametrize(("status", "code"), [(404, 3), (422, 7), (503, 11), (500, 5)])
def test_agent_statuses_map_to_spec_codes(status: int, code: int) -> None:
    assert error_for_status(status, "x").code == code


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=80))
def test_ipam_never_hands_one_address_to_two_containers(ops: list[tuple[bool, int]]) -> None:
    ipam = HostLocalIpam("10.1.0.0/28")
    for add, cid in ops:
        if add:
            try:
                first = ipam.allocate(str(cid))
            except IpamExhausted:
                assert len(ipam.by_container) == 14
                continue
            assert ipam.allocate(str(cid)) == first, "a retried ADD gets the same address"
            assert ipaddress.ip_address(first) in ipaddress.ip_network("10.1.0.0/28")
        else:
            ipam.release(str(cid))
        values = list(ipam.by_container.values())
        assert len(values) == len(set(values))
    restored = HostLocalIpam("10.1.0.0/28", ipam.by_container)
    assert restored.by_container == ipam.by_container
