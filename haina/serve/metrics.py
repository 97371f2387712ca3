"""Prometheus metrics of one server, in a registry of its own (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

# Latency buckets from 1 ms to 2 min: a tiny CPU model answers in milliseconds, a loaded GPU queue in seconds.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0)
_TOKEN_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServeMetrics:
    """The server's counters, gauges and histograms (prefix `haina_`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("haina_time_to_first_token_seconds", "Time from request arrival to its first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("haina_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=_TOKEN_LATENCY, registry=r)
        self.e2e = Histogram("haina_e2e_request_latency_seconds", "Time from request arrival to its last token",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("haina_request_queue_time_seconds",
                                    "Time a sequence waited before the engine admitted it (its prefill began)",
                                    buckets=_LATENCY, registry=r)
        self.running = Gauge("haina_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("haina_num_requests_waiting", "Sequences queued, not yet admitted", registry=r)
        self.prompt_tokens = Counter("haina_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("haina_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("haina_requests", "Finished generation sequences by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("haina_request_errors", "HTTP responses with an error status", ["status"], registry=r)
        self.timeouts = Counter("haina_request_timeouts", "Requests cut off by --request-timeout", registry=r)
        self.in_flight = Gauge("haina_num_http_requests_in_flight",
                               "API requests being answered (a drain waits for these)", registry=r)
        self.draining = Gauge("haina_draining", "1 while the server drains before exiting (new requests get 503)",
                              registry=r)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
