"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client), one registry per app.

The figures a diffusion server is judged by, as vLLM's diffusion benchmark prints them: denoising steps per
canvas, tokens accepted per step, time per step and to the first canvas, beside the usual request, token, queue
and slot counts and the prompt cache's hits.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (the route's media type)

STEPS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512)
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dglocal_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("dglocal_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("dglocal_prompt_tokens_cached",
                                     "prompt tokens found in a slot's cache (not encoded again)", registry=r)
        self.generated = Counter("dglocal_generation_tokens", "tokens generated", registry=r)
        self.canvases = Counter("dglocal_canvases", "canvases denoised", registry=r)
        self.steps = Counter("dglocal_denoise_steps", "denoising steps run", registry=r)
        self.steps_per_canvas = Histogram("dglocal_denoise_steps_per_canvas", "denoising steps per canvas",
                                          buckets=STEPS, registry=r)
        self.accepted = Histogram("dglocal_tokens_accepted_per_step", "canvas positions accepted per step",
                                  buckets=STEPS, registry=r)
        self.step_seconds = Histogram("dglocal_step_seconds", "time of one denoising step", buckets=SECONDS,
                                      registry=r)
        self.first_canvas = Histogram("dglocal_time_to_first_canvas_seconds",
                                      "request start to its first committed canvas", buckets=SECONDS, registry=r)
        Gauge("dglocal_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("dglocal_slots_busy", "slots generating", registry=r).set_function(
            lambda: sum(b is not None for b in engine.busy))
        Gauge("dglocal_slots", "slots", registry=r).set_function(lambda: len(engine.busy))

    def event(self, event) -> None:
        """A generation event as it reaches the HTTP side."""
        if event.kind == "step":
            self.steps.inc()
            self.accepted.observe(int(event.accepted.sum()))
            self.step_seconds.observe(event.seconds)

    def finished(self, completion, cached: int) -> None:
        s = completion.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.cached_tokens.inc(cached)
        self.generated.inc(s.generated_tokens)
        self.canvases.inc(s.canvases)
        for n in s.steps_per_canvas:
            self.steps_per_canvas.observe(n)
        self.first_canvas.observe(s.time_to_first_token)

    def text(self) -> bytes:
        return generate_latest(self.registry)
