"""Per-key usage counters: who uses what, labelled by key id.

Key ids are issued by the server (``state/keys.py``: 12 hex digits, or ``static``), never
taken from the request, so the label's values are bounded by the keys an operator created;
secrets never reach a label. Anonymous requests are not counted here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class KeyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["key_id"]
        self.requests = Counter(
            "embedplex_key_requests", "API requests per key.", labels, registry=registry
        )
        self.inputs = Counter(
            "embedplex_key_inputs", "Inputs embedded or scored per key.", labels, registry=registry
        )
        self.tokens = Counter(
            "embedplex_key_tokens", "Tokens processed per key.", labels, registry=registry
        )
        self.refusals = Counter(
            "embedplex_key_refusals",
            "Requests of a key refused with 403 (model not allowed) or 429 (limits).",
            labels,
            registry=registry,
        )

    def observe(self, key_id: str, inputs: int, tokens: int, refused: bool) -> None:
        self.requests.labels(key_id).inc()
        if inputs:
            self.inputs.labels(key_id).inc(inputs)
        if tokens:
            self.tokens.labels(key_id).inc(tokens)
        if refused:
            self.refusals.labels(key_id).inc()
