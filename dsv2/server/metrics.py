"""Prometheus metrics of the server (prometheus_client, one registry per app)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dsv2.engine.engine import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv2_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.generation_tokens = Counter("dsv2_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("dsv2_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("dsv2_num_requests_waiting", "Sequences waiting for the batch", registry=r)
        self.cache_usage = Gauge("dsv2_kv_cache_usage_ratio", "Share of latent-cache blocks in use", registry=r)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("dsv2_time_per_output_token_seconds", "Time between output tokens",
                              buckets=LATENCY_BUCKETS, registry=r)

    async def track(self, outputs: AsyncIterator[RequestOutput], prompt_tokens: int) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, recording token counts and latencies."""
        start = last = time.monotonic()
        seen = 0
        self.prompt_tokens.inc(prompt_tokens)
        try:
            async for output in outputs:
                now = time.monotonic()
                tokens = sum(len(c.token_ids) for c in output.outputs)
                if tokens > seen:
                    (self.ttft if seen == 0 else self.tpot).observe((now - start) if seen == 0 else
                                                                    (now - last) / (tokens - seen))
                    self.generation_tokens.inc(tokens - seen)
                    seen, last = tokens, now
                yield output
        finally:
            await outputs.aclose()

    def render(self, stats: dict[str, int]) -> bytes:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.cache_usage.set(1 - stats["free_blocks"] / max(stats["total_blocks"], 1))
        return generate_latest(self.registry)
