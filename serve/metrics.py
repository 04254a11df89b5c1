"""Serving metrics, exported through Ray's metrics (Prometheus, on each node's metrics port;
Ray prefixes every name with `ray_`).

Chimera's own names (tag `model`):
    chimera_serve_ttft_seconds              histogram  time to first token (request arrival at
                                                       the model server -> first token)
    chimera_serve_inter_token_seconds       histogram  time between consecutive tokens
    chimera_serve_request_tokens_per_second histogram  per request: completion tokens / time
    chimera_serve_generated_tokens_total    counter    rate() of it = aggregate tokens/s
    chimera_serve_running_requests          gauge      rows in the running batch
    chimera_serve_queued_requests           gauge      requests waiting for a batch row
    chimera_serve_step_seconds              histogram  one engine iteration
    chimera_serve_prefix_cache_queries_total counter   prompt tokens looked up in the prefix
                                                       cache (serve/prefix_cache.py)
    chimera_serve_prefix_cache_hits_total   counter    of them, served from it (hits / queries
                                                       = the hit rate, in tokens as vLLM's)

The same facts under vLLM's names, which serving dashboards (vLLM's Grafana board, Ray Serve
LLM's) query (tag `model_name`, as vLLM's). Ray refuses ':' in names, so vLLM's
`vllm:num_requests_running` is exported as `ray_vllm_num_requests_running` — the name Ray
Serve LLM exports vLLM's metrics under:
    vllm_num_requests_running               gauge      = chimera_serve_running_requests
    vllm_num_requests_waiting               gauge      = chimera_serve_queued_requests
    vllm_prompt_tokens_total                counter    prompt tokens of accepted requests
    vllm_generation_tokens_total            counter    = chimera_serve_generated_tokens_total
    vllm_time_to_first_token_seconds        histogram  = chimera_serve_ttft_seconds
    vllm_inter_token_latency_seconds        histogram  = chimera_serve_inter_token_seconds
    vllm_e2e_request_latency_seconds        histogram  arrival -> last token
    vllm_request_queue_time_seconds         histogram  arrival -> a batch row (admission)
    vllm_request_success_total              counter    finished requests, tag finished_reason
    vllm_prefix_cache_queries_total         counter    = chimera_serve_prefix_cache_queries_total
    vllm_prefix_cache_hits_total            counter    = chimera_serve_prefix_cache_hits_total
Without a Ray replica context (unit tests) they are no-ops (enabled=False).
"""
from __future__ import annotations

LATENCY = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATE = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]

# attribute: (kind, chimera name or None, vLLM name or None, description, buckets)
METRICS = {
    "ttft": ("hist", "chimera_serve_ttft_seconds", "vllm_time_to_first_token_seconds",
             "time to first token", LATENCY),
    "itl": ("hist", "chimera_serve_inter_token_seconds", "vllm_inter_token_latency_seconds",
            "time between tokens", LATENCY),
    "tps": ("hist", "chimera_serve_request_tokens_per_second", None,
            "completion tokens / request time", RATE),
    "step": ("hist", "chimera_serve_step_seconds", None, "one engine iteration", LATENCY),
    "e2e": ("hist", None, "vllm_e2e_request_latency_seconds", "request arrival -> last token",
            LATENCY),
    "queue": ("hist", None, "vllm_request_queue_time_seconds",
              "request arrival -> admitted to the running batch", LATENCY),
    "tokens": ("counter", "chimera_serve_generated_tokens_total", "vllm_generation_tokens_total",
               "generated tokens", None),
    "prompt_tokens": ("counter", None, "vllm_prompt_tokens_total", "prompt tokens", None),
    "prefix_queries": ("counter", "chimera_serve_prefix_cache_queries_total",
                       "vllm_prefix_cache_queries_total",
                       "prompt tokens looked up in the prefix cache", None),
    "prefix_hits": ("counter", "chimera_serve_prefix_cache_hits_total",
                    "vllm_prefix_cache_hits_total",
                    "prompt tokens served from the prefix cache", None),
    "running": ("gauge", "chimera_serve_running_requests", "vllm_num_requests_running",
                "requests in the running batch", None),
    "queued": ("gauge", "chimera_serve_queued_requests", "vllm_num_requests_waiting",
               "requests waiting for a batch row", None),
}


class _Null:
    def observe(self, *a, **k): ...
    def inc(self, *a, **k): ...
    def set(self, *a, **k): ...


class _Both:
    """One fact recorded under each of its names."""
    def __init__(self, metrics):
        self.m = metrics

    def observe(self, v):
        for x in self.m:
            x.observe(v)

    def inc(self, v=1):
        for x in self.m:
            x.inc(v)

    def set(self, v):
        for x in self.m:
            x.set(v)


class ServeMetrics:
    def __init__(self, model: str, enabled: bool = True):
        self._prefix_seen = (0, 0)          # the engine's prefix-cache totals exported so far
        if not enabled:
            for attr in METRICS:
                setattr(self, attr, _Null())
            self.success = None
            return
        from ray.serve import metrics as m

        def make(kind, name, desc, buckets, tag):
            if kind == "hist":
                x = m.Histogram(name, description=desc, boundaries=buckets, tag_keys=(tag,))
            elif kind == "counter":
                x = m.Counter(name, description=desc, tag_keys=(tag,))
            else:
                x = m.Gauge(name, description=desc, tag_keys=(tag,))
            x.set_default_tags({tag: model})        # Serve adds its tags in place: a fresh dict
            return x
        for attr, (kind, ours, vllm, desc, buckets) in METRICS.items():
            made = [make(kind, n, desc, buckets, tag)
                    for n, tag in ((ours, "model"), (vllm, "model_name")) if n]
            setattr(self, attr, _Both(made))
        self.success = m.Counter("vllm_request_success_total", description="finished requests",
                                 tag_keys=("model_name", "finished_reason"))
        self.success.set_default_tags({"model_name": model})

    def on_step(self, engine, seconds: float) -> None:
        self.step.observe(seconds)
        queries, hits = engine.prefix_cache_counts()            # totals: export what is new
        seen_q, seen_h = self._prefix_seen
        if queries > seen_q:
            self.prefix_queries.inc(queries - seen_q)
        if hits > seen_h:
            self.prefix_hits.inc(hits - seen_h)
        self._prefix_seen = (queries, hits)
        self.running.set(engine.num_running)
        self.queued.set(engine.num_waiting)

    def finished(self, reason: str) -> None:
        if self.success is not None:
            self.success.inc(1, tags={"finished_reason": reason})
