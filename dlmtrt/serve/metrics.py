"""Prometheus metrics of one server (its own registry, so that several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("dlmtrt_queue_depth", "Accepted requests waiting for a cohort", registry=r)
        self.running_requests = Gauge("dlmtrt_running_requests",
                                      "Requests in running cohorts (the running batch size, summed over cohorts)",
                                      registry=r)
        self.running_cohorts = Gauge("dlmtrt_running_cohorts", "Cohorts (DecodeSessions) being stepped", registry=r)
        self.cohort_size = Histogram("dlmtrt_cohort_size", "Requests per cohort when it starts",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.cohorts_finished = Counter("dlmtrt_cohorts_finished", "Cohorts finished or dropped", registry=r)
        self.steps = Counter("dlmtrt_steps", "Denoising steps executed (one cohort, one step)", registry=r)
        self.tokens = Counter("dlmtrt_tokens_generated", "Answer tokens returned (up to EOS)", registry=r)
        self.rows_computed = Counter("dlmtrt_rows_computed", "Canvas rows the backend computed", registry=r)
        self.rows_full = Counter("dlmtrt_rows_full",
                                 "Rows recomputing every canvas row at every step would have cost", registry=r)
        self.prefix_rows = Counter("dlmtrt_prefix_rows_served", "Prompt rows served by the prefix store", registry=r)
        self.prefix_prompt_rows = Counter("dlmtrt_prefix_prompt_rows", "Prompt rows looked up in the prefix store",
                                          registry=r)
        self.prefix_bytes = Gauge("dlmtrt_prefix_store_bytes", "Bytes of K/V held by the prefix store", registry=r)
        self.prefix_blocks = Gauge("dlmtrt_prefix_store_blocks", "Blocks held by the prefix store", registry=r)
        self.bicache_hits = Counter("dlmtrt_bicache_hits", "Shared prefixes BiCache found in its store", registry=r)
        self.bicache_misses = Counter("dlmtrt_bicache_misses",
                                      "Shared prefixes BiCache computed alone and stored (one forward each)",
                                      registry=r)
        self.bicache_evictions = Counter("dlmtrt_bicache_evictions", "Prefixes BiCache's store evicted (LRU)",
                                         registry=r)
        self.bicache_tokens = Gauge("dlmtrt_bicache_store_tokens", "Prefix tokens held by BiCache's store", registry=r)
        self.bicache_prefixes = Gauge("dlmtrt_bicache_store_prefixes", "Prefixes held by BiCache's store", registry=r)
        self.bicache_requests = Counter("dlmtrt_bicache_requests",
                                        "Requests by the BiCache depth they ran at (0: without reuse)", ["depth"],
                                        registry=r)
        self.requests = Counter("dlmtrt_requests", "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("dlmtrt_request_latency_seconds", "From acceptance to the answer, per prompt",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("dlmtrt_queue_wait_seconds", "From acceptance to joining a cohort",
                                    buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
