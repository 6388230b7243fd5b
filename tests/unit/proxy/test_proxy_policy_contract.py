"""The KV contract end to end: the policy core compiles the Star Wars CNP, encodes it for KV,
and the proxy's view finds the redirect with the HTTP rules (and the wildcard case)."""

from __future__ import annotations

from ciliate.labels import LabelSet
from ciliate.resources.base import validate_model
from ciliate.resources.ciliumpolicy import CiliumNetworkPolicy
from services.datapath.proxy.core.http import Head, Parser
from services.datapath.proxy.core.policy import PolicyView
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.kv import encode_policy
from services.policy.core.spec import normalize

NS = "k8s:io.kubernetes.pod.namespace=default"
WORLD = {
    300: LabelSet.from_strings(["k8s:org=empire", "k8s:class=deathstar", NS]),
    301: LabelSet.from_strings(["k8s:org=empire", "k8s:class=tiefighter", NS]),
    302: LabelSet.from_strings(["k8s:org=alliance", "k8s:class=xwing", NS]),
}
L7_RULE = {"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
           "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                        "rules": {"http": [{"method": "POST", "path": "/v1/request-landing"}]}}]}


def view_for(ingress: list[dict[str, object]]) -> PolicyView:
    data = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "rule1", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                     "ingress": ingress}}
    policy = validate_model(CiliumNetworkPolicy, data)
    compiled = PolicyEngine(normalize([policy]), IdentityWorld(WORLD)).compile_all().policies
    view = PolicyView(node="n1")
    for ident, (name, ip) in {300: ("deathstar", "10.0.0.1"), 301: ("tiefighter", "10.0.0.2"),
                              302: ("xwing", "10.0.0.3")}.items():
        view.set_endpoint(f"default.{name}", {"identity": ident, "ips": [ip], "node": "n1"})
    view.set_policy("300", encode_policy(compiled[300], 1))
    return view


def head(raw: bytes) -> Head:
    ev = Parser().feed(raw)[0]
    assert isinstance(ev, Head)
    return ev


def test_starwars_policy_reaches_the_proxy_with_its_http_rules() -> None:
    view = view_for([L7_RULE])
    (redirect,) = view.redirects("10.0.0.2", "10.0.0.1", 6, 80)
    assert redirect.direction == "ingress" and redirect.proxy_port == 15001
    assert redirect.rules.allows_http(head(b"POST /v1/request-landing HTTP/1.1\r\n\r\n"))
    assert redirect.rules.allows_http(head(b"PUT /v1/exhaust-port HTTP/1.1\r\n\r\n")) is None
    assert view.redirects("10.0.0.3", "10.0.0.1", 6, 80) == []  # xwing: no entry at all


def test_an_l4_only_allow_on_the_same_port_wildcards_l7() -> None:
    l4_only = {"fromEndpoints": [{"matchLabels": {"class": "tiefighter"}}],
               "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}
    view = view_for([L7_RULE, l4_only])
    (redirect,) = view.redirects("10.0.0.2", "10.0.0.1", 6, 80)
    assert redirect.rules.wildcard
    assert redirect.rules.allows_http(head(b"PUT /v1/exhaust-port HTTP/1.1\r\n\r\n"))
