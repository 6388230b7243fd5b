"""Dev pods' /etc/hosts: Service names resolve to their ClusterIPs as kube-dns answers them."""

from __future__ import annotations

from services.datapath.core.hosts import HEADER, hosts_file

LB = [
    ("svc.default.deathstar", {"namespace": "default", "name": "deathstar", "frontends": [
        {"address": "10.96.0.10", "port": 80, "type": "ClusterIP"},
        {"address": "0.0.0.0", "port": 31080, "type": "NodePort"}]}),
    ("svc.shop.web", {"namespace": "shop", "name": "web", "frontends": [
        {"address": "10.96.0.20", "port": 80, "type": "ClusterIP"},
        {"address": "10.96.0.20", "port": 443, "type": "ClusterIP"}]}),
    ("tbl.abc", {"m": 251}),
    ("svc.bad.x", {"namespace": "bad", "frontends": [{"address": 7, "type": "ClusterIP"}]}),
]


def test_names_follow_kube_dns_and_short_names_stay_in_the_namespace() -> None:
    text = hosts_file(LB, "default")
    assert text.startswith(HEADER)
    lines = text[len(HEADER):].splitlines()
    assert lines == [
        "10.96.0.10 deathstar.default.svc.cluster.local deathstar.default.svc "
        "deathstar.default deathstar",
        "10.96.0.20 web.shop.svc.cluster.local web.shop.svc web.shop",
    ]
    assert hosts_file(LB, "shop").splitlines()[-1].endswith(" web.shop web")
    assert hosts_file([], "default") == HEADER
