"""The loopback HTTP endpoint of the live state: `GET /metrics` (Prometheus text exposition
of a registry, `argus.present.metrics.LiveCollector`), `GET /state` (the `argus.live/1`
JSON that `argus top --daemon` reads), `GET /` and `/healthz` (a one-line description).

    httpd = serve("127.0.0.1", 9464, registry, get_state)   # answers from its own threads
    ...
    httpd.shutdown(); httpd.server_close()

Each request reads `get_state()` (the last state the owner published) and renders it; the
owner's loop is never blocked by a scrape.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    get_state: Callable[[], dict[str, Any]]

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = generate_latest(self.registry), CONTENT_TYPE_LATEST
        elif path == "/state":
            body = json.dumps(self.get_state(), default=str).encode()
            ctype = "application/json"
        elif path in ("/", "/healthz"):
            body, ctype = b"argus daemon: /metrics (Prometheus), /state (JSON)\n", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):  # no access log on stderr
        pass


def serve(addr: str, port: int, registry: CollectorRegistry,
          get_state: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Start serving on addr:port (port 0: any free one, `server_address[1]`) in a daemon
    thread; returns the server (`shutdown()` then `server_close()` to stop it)."""
    handler = type("Handler", (_Handler,), {"registry": registry,
                                            "get_state": staticmethod(get_state)})
    httpd = ThreadingHTTPServer((addr, port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="argus-metrics", daemon=True).start()
    return httpd
