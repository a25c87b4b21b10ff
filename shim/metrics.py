"""The shim's own Prometheus metrics: requests by endpoint and answer, and their latency."""

import os
import time

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess


def install(app: Flask, registry: CollectorRegistry) -> None:
    """Count and time every request; the endpoint label is the route, never the raw path.

    Under gunicorn with several workers (`creditledger serve` sets PROMETHEUS_MULTIPROC_DIR),
    each worker writes its samples to that directory and a scrape, served by any worker, sums
    them all; otherwise a scrape would see one worker's counters and rate() would see resets."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
        registry = None  # samples go to the shared files, not to this worker's registry
    requests_total = Counter(
        "creditledger_http_requests_total",
        "HTTP requests by endpoint and status code",
        ["endpoint", "code"],
        registry=registry,
    )
    latency = Histogram(
        "creditledger_http_request_seconds",
        "HTTP request latency by endpoint",
        ["endpoint"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )

    @app.before_request
    def start_timer():
        g.started_at = time.perf_counter()

    @app.after_request
    def observe(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - g.get("started_at", time.perf_counter()))
        return response
