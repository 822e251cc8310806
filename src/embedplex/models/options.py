"""``LocalModelOptions``: the serving knobs of one local model, decided from its resolved
``[[models]]`` table and the process-wide settings (``from_settings``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from embedplex.backends.model_files import ModelSpec
from embedplex.batching import (
    DEFAULT_AGING,
    BatchPolicy,
    BatchQueue,
    QueuePolicy,
    TokenBudget,
    make_queue,
)
from embedplex.config import Settings
from embedplex.models.config import ModelConfig
from embedplex.models.layout import inference_layout

T = TypeVar("T")


def resolved(value: T | None) -> T:
    """A key of a resolved model config: the top-level settings give it a value."""
    if value is None:
        raise ValueError("model config not resolved (use Settings.local_models)")
    return value


@dataclass(frozen=True, kw_only=True)
class LocalModelOptions:
    """The serving knobs of one local model (its resolved ``[[models]]`` table and the
    process-wide settings)."""

    name: str
    auto_truncate: bool = True  # as Settings.auto_truncate (TEI 1.9)
    default_prompt: str | None = None
    max_client_batch_size: int = 2048
    max_concurrent_requests: int = 512
    tokenization_workers: int | None = None
    tokenize_inline_chars: int = 512
    max_request_tokens: int = 262_144  # as Settings.max_request_tokens: /tokenize's answer
    streams: int = 1  # batches run at once, each from its own inference thread
    worker_nice: int = 0  # inference and tokenizer threads run this far below the event loop
    queue_policy: QueuePolicy = "fair"  # batching/fair.py; "fifo": oldest first, whoever sent
    priority_aging: float = DEFAULT_AGING  # seconds before batch work is served as interactive
    policy: BatchPolicy = field(default_factory=lambda: BatchPolicy(max_items=128, max_cost=16384))

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        spec: ModelSpec,
        *,
        run_tokens: int | None,
        model: ModelConfig | None = None,
    ) -> LocalModelOptions:
        """``run_tokens``: the backend's pass limit (``Backend.run_tokens``); the batch budget is
        decided from it and the model's settings (``TokenBudget.decide``). ``model``: the
        resolved table of the model (default: the flat settings' one model)."""
        m = model or settings.flat_model()
        prompt = m.default_prompt
        name = m.default_prompt_name or spec.default_prompt_name
        if prompt is None and name is not None:
            if name not in spec.prompts:
                raise ValueError(
                    f"default prompt name {name!r} is not among {sorted(spec.prompts)}"
                )
            prompt = spec.prompts[name]
        streams = inference_layout(settings, model=m).streams
        budget = TokenBudget.decide(
            max_batch_tokens=resolved(m.max_batch_tokens),
            max_batch_requests=resolved(m.max_batch_requests),
            run_tokens=run_tokens,
        )
        return cls(
            name=m.name,
            auto_truncate=resolved(m.auto_truncate),
            default_prompt=prompt,
            max_client_batch_size=resolved(m.max_client_batch_size),
            max_concurrent_requests=resolved(m.max_concurrent_requests),
            tokenization_workers=settings.tokenization_workers,
            tokenize_inline_chars=settings.tokenize_inline_chars,
            max_request_tokens=settings.max_request_tokens,
            streams=streams,
            worker_nice=settings.inference_nice,
            queue_policy=resolved(m.queue_policy),
            priority_aging=settings.priority_aging_ms / 1000,
            policy=BatchPolicy(
                max_items=budget.items,
                max_cost=budget.tokens,
                max_wait=0.0,
                max_concurrency=streams,
                max_queued=resolved(m.max_queue_size),
                queue_timeout=resolved(m.queue_timeout_ms) / 1000,
                run_timeout=settings.inference_timeout_s or None,  # the hung-pass watchdog
            ),
        )

    def new_queue(self, device: str) -> BatchQueue:
        """The model's queue, by ``queue_policy`` (a fresh one per batcher). On a CPU a pass
        costs its padded tokens, so a fair batch is not filled with other keys' inputs
        (``batching/fair.py``)."""
        fill = device != "cpu"
        return make_queue(self.queue_policy, lengths=True, aging=self.priority_aging, fill=fill)
