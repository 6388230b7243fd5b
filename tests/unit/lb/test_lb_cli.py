"""``service list`` prints frontends with numbered backends and states, as cilium-dbg does."""

from __future__ import annotations

from services.lb.cli import frontend_rows, render_rows


def test_service_list_columns_and_numbered_backends() -> None:
    svc = {
        "namespace": "x", "name": "web",
        "frontends": [
            {"id": 2, "address": "10.96.0.10", "port": 80, "protocol": "TCP",
             "type": "ClusterIP", "scope": "cluster", "port_name": "http"},
            {"id": 1, "address": "0.0.0.0", "port": 30080, "protocol": "TCP",
             "type": "NodePort", "scope": "cluster", "port_name": "http"},
        ],
        "backends": [
            {"id": 7, "address": "10.244.1.10", "port": 8080, "protocol": "TCP",
             "state": "active", "node": "n1", "weight": 100, "port_name": "http"},
            {"id": 9, "address": "fd00::5", "port": 8080, "protocol": "TCP",
             "state": "terminating", "node": "n1", "weight": 100, "port_name": "http"},
        ],
    }
    lines = render_rows(frontend_rows([svc])).splitlines()
    assert lines[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert lines[1].split() == ["1", "0.0.0.0:30080/TCP", "NodePort", "1", "=>",
                                "10.244.1.10:8080/TCP", "(active)"]
    assert lines[2].split() == ["2", "=>", "[fd00::5]:8080/TCP", "(terminating)"]
    assert lines[3].split()[:3] == ["2", "10.96.0.10:80/TCP", "ClusterIP"]
