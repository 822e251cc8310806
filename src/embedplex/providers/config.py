"""Configuration of remote providers and model routes (``[[providers]]``, ``[[routes]]``).

Plain frozen pydantic models, validated as part of ``Settings``. Secrets are never part of the
configuration: a provider names the environment variable that holds its key (``api_key_env``),
and the key is read when the provider starts.

Every number has an upper bound too: a provider may also come from the admin API, and a value
no upstream could use (``max_batch_size = 10**30``) must be a 422 there, not a provider that
breaks ``GET /api/v1/providers``. Endpoints are absolute http(s) URLs and never a cloud metadata
address (``endpoints.py``; the rules for providers added at run time go further, and such a
provider may not name a ``proxy``: ``check_run_time``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from embedplex.providers.endpoints import (
    EndpointRefused,
    is_metadata,
    literal_address,
    proxy_host,
    url_host,
)

ProviderType = Literal["tei", "openai", "voyage", "cohere"]
Policy = Literal["any", "all"]
RouteKind = Literal["embed", "rerank"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# The largest answer read from an upstream by default: twice the largest that the adapters'
# defaults can ask for (docs/router.md, "Failure handling").
MAX_RESPONSE_BYTES = 64 * 2**20


def _checked(url: str | None, host_of: Callable[[str], tuple[str, int]], role: str) -> str | None:
    """``url`` if ``host_of`` takes it and its host is not a metadata address given literally;
    else ValueError, whose text never holds the URL (a key in its query, a proxy's password)."""
    if url is None:
        return None
    try:
        host, _ = host_of(url)
    except EndpointRefused as exc:
        raise ValueError(str(exc)) from None
    address = literal_address(host)
    if address is not None and is_metadata(address):
        raise ValueError(f"{address} is a cloud metadata address, never {role}")
    return url


class ProviderConfig(BaseModel):
    """One upstream embedding API and how embedplex batches, retries and watches it."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(pattern=NAME_PATTERN, description="Name used in routes and requests.")
    type: ProviderType = Field(description="API dialect: tei, openai, voyage or cohere.")
    endpoint: str | None = Field(
        None,
        max_length=2048,
        description="Base URL or full embeddings URL (default: the vendor's public API; "
        "required for tei).",
    )
    model: str | None = Field(
        None, max_length=256, description="Upstream model name sent with each call."
    )
    rerank_model: str | None = Field(
        None,
        max_length=256,
        description="Upstream model name of rerank calls (default: model, else the vendor's "
        "rerank model: cohere rerank-v3.5, voyage rerank-2.5).",
    )
    rerank_endpoint: str | None = Field(
        None,
        max_length=2048,
        description="Full rerank URL (default: the embeddings URL with its last path segment "
        "replaced by rerank).",
    )
    proxy: str | None = Field(
        None,
        max_length=2048,
        description="HTTP proxy the provider's calls go through, http(s)://[user:password@]"
        "host[:port] (https upstreams through CONNECT); credentials are shown as ***. From the "
        "config file only: a provider added at run time is refused one (docs/security.md).",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="Name of the environment variable that holds the API key (for a provider "
        "added at run time: one of the server's provider_key_envs).",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Texts per upstream call (capped by the provider's own limit).",
    )
    min_batch_size: int = Field(
        1, ge=1, le=100_000, description="AIMD never shrinks a batch below this."
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=0,
        le=100_000_000,
        description="Tokens one upstream call's texts may hold, reckoned from their length "
        "(a third of their UTF-8 bytes); batches are cut by it as well as by count (default: "
        "the vendor's documented cap: openai's own API 300000, voyage 120000-1000000 by model; "
        "none for tei, cohere and other OpenAI-compatible servers; 0: no cap).",
    )
    max_rerank_tokens: int | None = Field(
        None,
        ge=0,
        le=100_000_000,
        description="Tokens one upstream rerank call may hold, the query counted with every "
        "document (reckoned as for max_batch_tokens); rerank batches are cut by it as well as "
        "by count (default: the vendor's documented cap: voyage 300000-600000 by model; none "
        "for the others; 0: no cap).",
    )
    max_wait_ms: float = Field(
        50.0, ge=0, le=60_000, description="How long the first queued text waits for company."
    )
    max_quiet_ms: float = Field(
        10.0,
        ge=0,
        le=60_000,
        description="A lane flushes before max_wait_ms once no text has come for this long "
        "(the burst is over; 0: always wait max_wait_ms).",
    )
    max_concurrency: int = Field(4, ge=1, le=4096, description="Upstream calls in flight at once.")
    max_queued: int = Field(
        4096, ge=1, le=10_000_000, description="Texts waiting per batch lane; then 429."
    )
    queue_timeout_ms: int = Field(
        30_000,
        ge=1,
        le=3_600_000,
        description="A request none of whose texts starts a call for this long gets 503.",
    )
    queue_policy: Literal["fair", "fifo"] = Field(
        "fair",
        description="Order of each batch lane: fair (weighted fair order across API keys, "
        "interactive before batch; docs/scheduling.md) or fifo (arrival order).",
    )
    timeout_s: float = Field(
        15.0, gt=0, le=3600, description="Per-attempt timeout of one upstream call."
    )
    retry_budget_s: float = Field(
        45.0, gt=0, le=3600, description="Cumulative time one call may spend across retries."
    )
    max_attempts: int = Field(8, ge=1, le=100, description="Attempts per call, retries included.")
    backoff_base_ms: float = Field(
        100.0, ge=0, le=60_000, description="First backoff ceiling (doubles)."
    )
    backoff_max_s: float = Field(10.0, ge=0, le=3600, description="Largest backoff ceiling.")
    latency_target_ms: float = Field(
        2000.0, gt=0, le=600_000, description="AIMD grows the batch while calls finish within this."
    )
    aimd_increase: int = Field(
        4, ge=1, le=100_000, description="AIMD additive step (texts per success)."
    )
    breaker_failures: int = Field(
        5, ge=1, le=100_000, description="Consecutive failed attempts that open the circuit."
    )
    breaker_cooldown_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds an open circuit waits before a probe."
    )
    health_window_s: float = Field(
        60.0, gt=0, le=86_400, description="Rolling window of health stats."
    )
    input_type: str | None = Field(
        None,
        max_length=64,
        description="Default input_type (cohere requires one: search_document).",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "base64", description="openai type: how vectors travel (base64 is exact and compact)."
    )
    max_response_bytes: int = Field(
        MAX_RESPONSE_BYTES,
        ge=64 * 1024,
        le=2**30,
        description="Largest answer body read from the upstream; a larger one is a malformed "
        "answer (502, fails over).",
    )
    cache: bool = Field(
        True,
        description="Keep this provider's answers in the embedding cache (and its Redis tier, "
        "with cache_redis); false for vectors that must not be kept (docs/cache.md).",
    )

    @field_validator("endpoint", "rerank_endpoint")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        return _checked(url, url_host, "an upstream")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, url: str | None) -> str | None:
        return _checked(url, proxy_host, "a proxy")

    @model_validator(mode="after")
    def _check(self) -> ProviderConfig:
        if self.type == "tei" and self.endpoint is None:
            raise ValueError("a tei provider needs an endpoint (TEI has no public default)")
        if self.max_batch_size is not None and self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size cannot exceed max_batch_size")
        return self


# Why a provider added at run time may not name a proxy (the admin API's 422, the state
# store's refusal): the endpoint guard checks the addresses the router connects to, and
# through a proxy that is the proxy's address, never the upstream's.
RUN_TIME_PROXY = (
    "proxy is taken from the config file only: a provider added at run time connects "
    "directly, so that the endpoint guard checks the upstream's own addresses"
)


def check_run_time(config: ProviderConfig) -> None:
    """Raise ValueError (its text safe to show) where ``config``, a provider added at run time
    (admin API, state store), sets what only the operator's configuration may: ``proxy``."""
    if config.proxy is not None:
        raise ValueError(RUN_TIME_PROXY)


class RouteConfig(BaseModel):
    """A served model name answered by one provider or an ordered group."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    model: str = Field(min_length=1, max_length=256, description="Model name clients ask for.")
    providers: list[str] = Field(min_length=1, description="Provider names, in order.")
    policy: Policy = Field("any", description="any: first healthy, fail over; all: fan out.")
    kind: RouteKind = Field(
        "embed", description="embed: an embedding model; rerank: a reranker (/rerank routes)."
    )
