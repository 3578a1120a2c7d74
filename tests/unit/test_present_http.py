"""`argus.present.http`: the loopback endpoint serves the state it is given, no daemon: /metrics
(the Prometheus exposition of the registry), /state (the JSON), /healthz, 404 otherwise."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from argus.present.http import serve
from argus.present.live import node_state
from argus.present.metrics import LiveCollector

pytestmark = pytest.mark.unit


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], b""


def test_the_endpoint_serves_the_current_state_at_each_request():
    states = [node_state("n1", [{"job": "j", "ranks": [{"rank": 3, "straggler_score": 4.5}]}],
                         1, targets=2)]
    registry = CollectorRegistry()
    registry.register(LiveCollector(lambda: states[-1]))
    httpd = serve("127.0.0.1", 0, registry, lambda: states[-1])
    try:
        port = httpd.server_address[1]
        code, ctype, body = _get(port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        text = body.decode()
        assert 'argus_straggler_score{host="n1",job_id="j",rank="3"} 4.5' in text
        assert 'argus_targets{host="n1"} 2.0' in text
        code, ctype, body = _get(port, "/state?x=1")
        assert (code, ctype) == (200, "application/json") and json.loads(body) == states[-1]
        states.append(node_state("n1", [], 2, targets=0))  # the next state: read per request
        assert json.loads(_get(port, "/state")[2])["jobs"] == []
        assert "argus_straggler_score{" not in _get(port, "/metrics")[2].decode()
        assert _get(port, "/healthz")[2].startswith(b"argus daemon: /metrics")
        assert _get(port, "/nope")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()
