"""Serving metrics, exported through Ray's metrics (Prometheus, on each node's metrics port).

    chimera_serve_ttft_seconds              histogram  time to first token (request arrival at
                                                       the model replica -> first token)
    chimera_serve_inter_token_seconds       histogram  time between consecutive tokens
    chimera_serve_request_tokens_per_second histogram  per request: completion tokens / time
    chimera_serve_generated_tokens_total    counter    rate() of it = aggregate tokens/s
    chimera_serve_running_requests          gauge      rows in the running batch
    chimera_serve_queued_requests           gauge      requests waiting for a row
    chimera_serve_step_seconds              histogram  one engine iteration
Every metric carries a `model` tag (plus Serve's deployment/replica/application tags).
Without a Ray replica context (unit tests) they are no-ops.
"""
from __future__ import annotations

LATENCY = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATE = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


class _Null:
    def observe(self, *a, **k): ...
    def inc(self, *a, **k): ...
    def set(self, *a, **k): ...


class ServeMetrics:
    def __init__(self, model: str, enabled: bool = True):
        tags = {"model": model}
        if not enabled:
            self.ttft = self.itl = self.tps = self.tokens = self.running = self.queued = \
                self.step = _Null()
            return
        from ray.serve import metrics as m

        def hist(name, desc, buckets):
            h = m.Histogram(name, description=desc, boundaries=buckets, tag_keys=("model",))
            h.set_default_tags(dict(tags))     # Serve adds its tags in place
            return h

        def gauge(name, desc):
            g = m.Gauge(name, description=desc, tag_keys=("model",))
            g.set_default_tags(dict(tags))
            return g

        self.ttft = hist("chimera_serve_ttft_seconds", "time to first token", LATENCY)
        self.itl = hist("chimera_serve_inter_token_seconds", "time between tokens", LATENCY)
        self.tps = hist("chimera_serve_request_tokens_per_second",
                        "completion tokens / request time", RATE)
        self.step = hist("chimera_serve_step_seconds", "one engine iteration", LATENCY)
        self.tokens = m.Counter("chimera_serve_generated_tokens_total",
                                description="generated tokens", tag_keys=("model",))
        self.tokens.set_default_tags(dict(tags))
        self.running = gauge("chimera_serve_running_requests", "requests in the running batch")
        self.queued = gauge("chimera_serve_queued_requests", "requests waiting for a batch row")

    def on_step(self, engine, seconds: float) -> None:
        self.step.observe(seconds)
        self.running.set(engine.num_running)
        self.queued.set(engine.num_waiting)
