"""Stands in for MinIO's /minio/v2/metrics/cluster, which this test bed cannot run.

MinIO's server binary cannot be downloaded here, so the monitoring scenario's store is
this process on the store's port: it answers the cluster metrics path with two of MinIO's
v2 cluster metrics, and only to ``Authorization: Bearer <token>`` (the token file is the
first argument), as MinIO does with ``MINIO_PROMETHEUS_AUTH_TYPE=jwt``. Anything else is
403, so a scrape that forgets the token shows as down.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

METRICS = b"""# HELP minio_cluster_capacity_usable_free_bytes Total free usable capacity online in the cluster
# TYPE minio_cluster_capacity_usable_free_bytes gauge
minio_cluster_capacity_usable_free_bytes{server="127.0.0.1:9000"} 4.2e+10
# HELP minio_cluster_usage_total_bytes Total cluster usage in bytes
# TYPE minio_cluster_usage_total_bytes gauge
minio_cluster_usage_total_bytes{server="127.0.0.1:9000"} 2.5e+08
"""


def main() -> None:
    token = Path(sys.argv[1]).read_text(encoding="utf-8").strip()
    port = int(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/minio/v2/metrics/cluster":
                self.send_error(404)
            elif self.headers.get("Authorization") != f"Bearer {token}":
                self.send_error(403)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(METRICS)))
                self.end_headers()
                self.wfile.write(METRICS)

    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
