"""Configuration: one frozen object, read in one place.

Precedence, lowest first: defaults < TOML file (``--config`` or ``EMBEDPLEX_CONFIG``) < environment
(``EMBEDPLEX_`` prefix; any other ``EMBEDPLEX_*`` name is refused: ``config_env.py``) <
command-line flags. Every scalar field below is also an ``embedplex serve`` flag (``model_id`` ->
``--model-id``); the CLI builds its flags from this class, so an option is declared once. Lists
of tables (``providers``, ``routes``) come only from TOML or from JSON in the environment
(``EMBEDPLEX_PROVIDERS='[{...}]'``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from embedplex.backends.hub import HUB_TIMEOUT_S
from embedplex.backends.model_files import DEFAULT_MODEL_ID
from embedplex.config_env import ENV_PREFIX, check_env_names
from embedplex.config_file import unknown_settings, unreadable
from embedplex.config_tei import TEI_ENV
from embedplex.core.redact import redact_url
from embedplex.core.tenant import Priority
from embedplex.models.config import Dtype, ModelConfig, PoolingName
from embedplex.providers.config import ProviderConfig, RouteConfig
from embedplex.providers.endpoints import redact_provider
from embedplex.state.url import DEFAULT_TIMEOUT_S, parse_state_url

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("embedplex_config_file", default=None)

__all__ = ["Dtype", "ModelConfig", "PoolingName", "Settings"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The flat keys that name the one model served without [[models]] tables.
_FLAT_MODEL_KEYS = ("model_id", "revision", "served_model_name")


# The list settings that take one string from the environment or a flag: comma-separated
# values, or a JSON list (``split_list``). The allowed lists are FastEmbed's
# INFERENCE_ALLOWED_* form ("a,b" or "*").
LIST_FIELDS = (
    "cors_allow_origins",
    "ignore_tei_env",
    "provider_key_envs",
    "provider_allowed_networks",
    "allowed_embedding_models",
    "allowed_rerank_models",
)


def split_list(value: str) -> list[str]:
    """``'["a", "b"]'`` or ``"a, b"`` as ``["a", "b"]``; empty items are dropped.

    A value that starts with ``[`` but is no JSON list of strings (a pattern such as
    ``[ab]-*``) is read as comma-separated."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return parsed
    return [v.strip() for v in text.split(",") if v.strip()]


# Shortest admin secret, and [[api_keys]] key, accepted (docs/security.md).
MIN_SECRET_CHARS = 16
# What every managed key starts with (state/keys.py): the auth stage sends such a token to the
# key store, so a static key that starts with it would never authenticate.
MANAGED_KEY_PREFIX = "ep_"


class StaticKeyConfig(BaseModel):
    """One static API key and its tenant (an ``[[api_keys]]`` table): for a few callers that
    need their own priority or share without a key store (managed keys: docs/keys.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
        description="The key's id: in logs, metrics and traces (never the key itself).",
    )
    key: SecretStr = Field(description="The secret callers send as Authorization: Bearer.")
    priority: Priority = Field(
        Priority.INTERACTIVE, description="interactive or batch (a request may lower it)."
    )
    weight: int = Field(1, ge=1, le=1000, description="Share of a model under fair queuing.")

    @field_validator("key")
    @classmethod
    def _long_enough(cls, key: SecretStr) -> SecretStr:
        if len(key.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"an API key needs at least {MIN_SECRET_CHARS} characters")
        return key


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        # No nested delimiter: no setting is a table of its own (lists of tables take JSON),
        # and config_env.py refuses every EMBEDPLEX_* name that is not a field.
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
        # A rejected value may be a secret (api_key, a key in an endpoint): the message names
        # the field and the reason, never the value (every nested table model does the same).
        hide_input_in_errors=True,
    )

    # -- server ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port.")
    api_key: SecretStr | None = Field(
        None,
        description="Static API key; when set, every route but the probes, docs and admin API "
        "needs it (/metrics too, unless metrics_public).",
    )
    payload_limit: int = Field(2_000_000, ge=1024, description="Largest request body, in bytes.")
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (empty: CORS off)."
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM); serves HTTPS.")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM).")
    ssl_ca_certs: Path | None = Field(
        None, description="CA bundle (PEM) that client certificates must chain to (mTLS)."
    )
    ssl_client_cert: Literal["none", "optional", "required"] = Field(
        "none",
        description="Client certificates (mTLS): none, optional (verified when sent) or "
        "required (a client without one is refused in the handshake); needs ssl_ca_certs.",
    )
    docs_enabled: bool = Field(
        True, description="Serve /docs, /redoc and /openapi.json (off: 404)."
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="Seconds SIGTERM waits for queued work before exiting."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["pretty", "json"] = Field("pretty", description="Log line format.")
    log_requests: bool = Field(True, description="Log one structured line per API request.")
    ignore_tei_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="TEI variables (API_KEY, MODEL_ID, ...) set for another program: serve "
        "neither refuses to start nor warns for them (comma-separated; docs/configuration.md, "
        "Coming from TEI).",
    )

    # -- connections: limits every connection meets before any route (serve/edge.py) ----
    http_max_connections: int = Field(
        1024,
        ge=1,
        description="Open client connections; past it, a new one gets 503 and is closed.",
    )
    http_max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="Request line plus headers, in bytes; past it, 431 and the connection "
        "is closed.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds from a request's first byte until its headers are complete; "
        "past it, 408 and the connection is closed.",
    )
    http_body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds from a request's headers until its whole body has arrived; past "
        "it, 408 and the connection is closed.",
    )
    http_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a connection may wait for its first request, or for the next one "
        "on keep-alive; then it is closed (keep it above a load balancer's idle timeout).",
    )

    # -- observability --------------------------------------------------------------------
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port only (a separate small server; 0 picks one); "
        "the main port then answers 404 there.",
    )
    metrics_host: str | None = Field(
        None,
        description="Address the metrics_port server binds (default: host; 127.0.0.1 keeps "
        "/metrics, which has no authentication there, off the network).",
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics on the main port without the API key (default: with an "
        "api_key set, /metrics needs it too).",
    )
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry collector to export spans to (e.g. http://otel:4317)."
    )
    otlp_protocol: Literal["grpc", "http"] = Field(
        "grpc", description="OTLP transport: grpc (port 4317) or http/protobuf (port 4318)."
    )
    otlp_service_name: str = Field("embedplex", description="service.name of exported spans.")
    disable_spans: bool = Field(
        False,
        description="Leave the request's trace_id and span_id out of the access log lines "
        "(as TEI's flag leaves spans out of its log lines); spans are still exported to "
        "otlp_endpoint (without one, none are made).",
    )

    admin_secret: SecretStr | None = Field(
        None,
        description="Secret for the admin API (/api/v1/status, /api/v1/providers, "
        "/api/v1/keys); without it the admin API is off (403). At least 16 characters; never "
        "the api_key; set it with EMBEDPLEX_ADMIN_SECRET.",
    )
    provider_key_envs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Environment variables a provider added at run time (admin API) may take "
        "its API key from (comma-separated in flags; empty: none may have a key).",
    )
    provider_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Non-public networks (CIDR, e.g. 10.0.0.0/8) that providers added at run "
        "time may reach; public addresses always may, cloud metadata addresses never.",
    )

    # -- state store and managed API keys (docs/keys.md) ---------------------------------
    state_url: str | None = Field(
        None,
        description="Where keys, run-time providers and usage are kept: sqlite:///path or "
        "postgresql://user@host/db (default: SQLite file state.db in data_dir).",
    )
    data_dir: Path | None = Field(
        None,
        description="Directory of the default SQLite state store "
        "(default: $XDG_DATA_HOME/embedplex or ~/.local/share/embedplex).",
    )
    require_api_key: bool = Field(
        False,
        description="Refuse requests without a managed key even before the first key exists "
        "(keys are required anyway once the store holds one).",
    )
    state_poll_s: float = Field(
        1.0,
        gt=0,
        le=2.0,
        description="How often each replica checks the store for key and provider changes "
        "(revocations take effect within about twice this).",
    )
    usage_flush_s: float = Field(
        10.0, gt=0, description="How often per-key usage counts are written to the store."
    )
    state_timeout_s: float = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        description="A state store call unanswered this long fails: a new key's lookup is "
        "answered 503, an admin change 503, the change poll logs a warning and retries; also "
        "the store's connect and per-statement timeout (migrations included).",
    )

    # -- model ----------------------------------------------------------------------------
    local_model: bool = Field(
        True, description="Serve the local model(s) (false: remote providers only)."
    )
    model_id: str = Field(
        DEFAULT_MODEL_ID, description="Local model directory or Hugging Face repo id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    served_model_name: str | None = Field(
        None, description="Name clients use for the model (default: the model id)."
    )
    backend: Literal["onnx", "torch"] = Field("onnx", description="Inference engine.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where inference runs.")
    dtype: Dtype = Field("float32", description="Weights precision (int8: onnx, dynamic quant).")
    pooling: PoolingName | None = Field(
        None, description="Override the model's pooling (cls, mean, last-token)."
    )
    max_input_length: int | None = Field(
        None, ge=1, description="Tokens per input (default: the model's max_seq_length)."
    )
    auto_truncate: bool = Field(
        True,
        description="Truncate long inputs when a request does not say (off: 422, 400 on the "
        "OpenAI routes).",
    )
    default_prompt_name: str | None = Field(
        None,
        description="Prompt (from the model's prompts) applied when a request names none "
        "(not with default_prompt).",
    )
    default_prompt: str | None = Field(
        None,
        description="Literal prompt prepended when a request names none (not with "
        "default_prompt_name).",
    )
    cache_dir: Path | None = Field(
        None, description="Where ONNX exports are cached (default: ~/.cache/embedplex)."
    )
    hub_timeout_s: float = Field(
        HUB_TIMEOUT_S,
        gt=0,
        description="The longest a model's hub download may take; then its load fails (a "
        "copy in huggingface_hub's cache serves instead, with a warning). A hub that stops "
        "answering fails sooner, at HF_HUB_DOWNLOAD_TIMEOUT (10 s) per request.",
    )
    inference_streams: int | None = Field(
        None,
        ge=1,
        description="Batches run at once, each from its own thread (default: 2 for ONNX on a "
        "CPU with 2 or more cores, else 1).",
    )
    inference_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads per forward pass (default: cores / inference_streams).",
    )
    inference_solo_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of a forward pass with no other in flight (ONNX, CPU; "
        "default: every core when inference_streams > 1; at most inference_threads: off).",
    )
    inference_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="How far below the event loop the inference and tokenizer threads run "
        "(Linux nice; 0: the same priority).",
    )
    int8_min_cosine: float = Field(
        0.97, ge=0, le=1, description="Refuse an int8 export whose min cosine vs fp32 is lower."
    )

    # -- failures inside (docs/reliability.md) ------------------------------------------
    inference_timeout_s: float = Field(
        60.0,
        ge=0,
        description="A local forward pass running longer is declared hung: its callers get 503 "
        "and the model is marked dead (0: no watchdog).",
    )
    liveness_grace_s: float = Field(
        30.0,
        ge=0,
        description="Seconds a dead backend keeps /health/live at 200 before it answers 503 "
        "(so an orchestrator restarts the process).",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, seconds readiness is already false while the listener still "
        "serves (load balancers stop sending first), before the drain.",
    )
    overload_refusal_hold_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="Past 200 overload refusals (429) a second, each further one is held this "
        "long before it is sent, so clients retrying at once cannot starve accepted work "
        "(0: off).",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a request waits for remote providers and Ray replicas (retries "
        "included); a client may shorten it with the X-Request-Timeout header (seconds).",
    )

    # -- batching and admission -----------------------------------------------------------
    tokenization_workers: int | None = Field(
        None, ge=1, description="Tokenizer threads (default: number of cores)."
    )
    tokenize_inline_chars: int = Field(
        512,
        ge=0,
        description="Requests of at most this many characters queue untokenized and are "
        "tokenized with their batch in the inference thread; longer ones in the tokenizer "
        "pool first; 0 sends every request to the pool.",
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Padded tokens per batch (longest input x inputs)."
    )
    max_batch_requests: int = Field(128, ge=1, description="Inputs per batch.")
    max_concurrent_requests: int = Field(
        512, ge=1, description="Requests in flight per model; past it, 429 at once."
    )
    max_queue_size: int = Field(
        4096, ge=1, description="Inputs waiting per model; past it, 429 at once."
    )
    queue_timeout_ms: int = Field(
        30_000,
        ge=1,
        description="A request none of whose inputs starts a batch for this long gets 503.",
    )
    max_client_batch_size: int = Field(
        2048,
        ge=1,
        description="Inputs in one request; more is 422 (400 on the OpenAI routes).",
    )
    max_request_tokens: int = Field(
        262_144,
        ge=1,
        description="Token ids one request may send (token-id inputs, /decode) or get back "
        "(/tokenize); more is 422 (400 on the OpenAI routes).",
    )
    queue_policy: Literal["fair", "fifo"] = Field(
        "fair",
        description="Order of a model's queue: fair (weighted fair order across API keys, "
        "interactive before batch; docs/scheduling.md) or fifo (oldest first, whoever sent it).",
    )
    priority_aging_ms: int = Field(
        2000,
        ge=0,
        description="A batch-priority input waiting this long is served as interactive "
        "(fair queues), so batch work always moves.",
    )

    # -- which served models clients may use ---------------------------------------------
    allowed_embedding_models: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Embedding model names clients may use; * and ? patterns, comma-separated "
        "in env and flags (default: every served one).",
    )
    allowed_rerank_models: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Reranker names clients may use; * and ? patterns, comma-separated in env "
        "and flags (default: every served one).",
    )

    # -- remote providers ----------------------------------------------------------------
    router_idle_ttl_s: float = Field(
        300.0, gt=0, description="A provider batch lane idle this long is closed."
    )
    router_probe_interval_s: float = Field(
        5.0, gt=0, description="How often half-open providers get a health probe."
    )

    # -- per-key rate limits (docs/limits.md) ---------------------------------------------
    redis_url: SecretStr | None = Field(
        None,
        description="Share per-key rate limits across replicas through this Redis "
        "(redis://[:password@]host:6379/0; unset: each process limits alone).",
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, description="A Redis call slower than this falls back to per-process limits."
    )
    redis_probe_interval_s: float = Field(
        5.0, gt=0, description="While Redis is away, how often it is probed to share again."
    )

    # -- the embedding cache (docs/cache.md) ----------------------------------------------
    cache_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Bytes of local models' results kept in this process, shared by all "
        "models; least recently used go first (0: no cache; identical inputs in flight are "
        "still computed once).",
    )
    cache_redis: bool = Field(
        False,
        description="Share the embedding cache across replicas through cache_redis_url, else "
        "redis_url (looked up for inputs this process misses; written in the background).",
    )
    cache_redis_url: SecretStr | None = Field(
        None,
        description="A Redis of the cache's own for cache_redis (unset: redis_url's): one "
        "with maxmemory and allkeys-lru, whose evictions never touch the rate limits' state.",
    )
    cache_ttl_s: int = Field(
        86400, ge=1, description="Seconds an entry lives in the Redis tier of the cache."
    )

    # Tables last: in TOML, top-level keys must come before [[tables]]. No flags for these.
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="Local models served side by side ([[models]]: name, model_id, kind, load; "
        "unset keys take the top-level value).",
    )
    providers: list[ProviderConfig] = Field(
        default_factory=list, description="Remote embedding providers ([[providers]] tables)."
    )
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description="Model names served by providers ([[routes]]: model, providers, policy).",
    )
    api_keys: list[StaticKeyConfig] = Field(
        default_factory=list,
        description="Static API keys, each its own tenant ([[api_keys]]: id, key, priority, "
        "weight); api_key, when set too, keeps working.",
    )

    @field_validator(*LIST_FIELDS, mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        """A string (environment, flag) is a JSON list or comma-separated values: both forms
        work for every list setting (NoDecode keeps pydantic-settings from reading every
        EMBEDPLEX_* list as JSON, which refused ``https://a.example``)."""
        return split_list(value) if isinstance(value, str) else value

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str | None) -> str | None:
        """Checked at load, so ``config show`` and ``keys`` refuse it too (not at first use)."""
        if value is not None:
            parse_state_url(value)
        return value

    @field_validator("api_key", "admin_secret")
    @classmethod
    def _real_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """An empty secret would match an empty or missing header: refuse to start instead."""
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError(
                f"{info.field_name} is set but empty (or only whitespace): set a real secret, "
                "or unset it"
            )
        if secret != secret.strip():
            raise ValueError(
                f"{info.field_name} starts or ends with whitespace, which no Authorization "
                "header can carry: remove it"
            )
        return value

    @field_validator("admin_secret")
    @classmethod
    def _long_admin_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """The admin API changes what the server serves and where it sends data: a secret
        short enough to guess is refused at start (wrong guesses are also throttled per client
        address, ``limits/failures.py``, but that alone does not stop many addresses)."""
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(
                f"admin_secret needs at least {MIN_SECRET_CHARS} characters (for example: "
                "openssl rand -hex 32)"
            )
        return value

    @field_validator("provider_key_envs")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(f"provider_key_envs: {name!r} is not an environment variable name")
            if name.upper().startswith("EMBEDPLEX_"):
                # The server's own secrets live there: never hand one to an upstream.
                raise ValueError(f"provider_key_envs: {name!r} is one of embedplex's own")
        return names

    @field_validator("provider_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"provider_allowed_networks: {net!r} is not a network") from exc
        return networks

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_client_batch_size > self.max_queue_size:
            raise ValueError("max_client_batch_size cannot exceed max_queue_size")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        if self.ssl_ca_certs is not None and self.ssl_certfile is None:
            raise ValueError(
                "ssl_ca_certs (client certificates) needs ssl_certfile and ssl_keyfile"
            )
        if self.ssl_client_cert != "none" and self.ssl_ca_certs is None:
            raise ValueError(f"ssl_client_cert = {self.ssl_client_cert!r} needs ssl_ca_certs")
        if (
            self.admin_secret is not None
            and self.api_key is not None
            and self.admin_secret.get_secret_value() == self.api_key.get_secret_value()
        ):
            raise ValueError("admin_secret must differ from api_key (every client has the key)")
        if self.default_prompt is not None and self.default_prompt_name is not None:
            raise ValueError(
                "default_prompt and default_prompt_name are one choice (as in TEI): give one"
            )
        self._check_tei_names()
        if self.cache_redis and self.redis_url is None and self.cache_redis_url is None:
            raise ValueError("cache_redis needs cache_redis_url or redis_url")
        if self.cache_redis_url is not None and not self.cache_redis:
            raise ValueError("cache_redis_url is read only with cache_redis = true: set both")
        if self.max_input_length is not None and self.max_input_length > self.max_batch_tokens:
            raise ValueError("max_batch_tokens must be at least max_input_length")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        for route in self.routes:
            unknown = [n for n in route.providers if n not in names]
            if unknown:
                raise ValueError(f"route {route.model!r} names unknown providers {unknown}")
        if self.models:
            flat = [k for k in _FLAT_MODEL_KEYS if k in self.model_fields_set]
            if flat:
                raise ValueError(
                    f"{', '.join(flat)} describe the one model served without [[models]] "
                    "tables; with [[models]], give each table its own name and model_id"
                )
        for model in self.local_models():
            model.check_limits()
        self._check_api_keys()
        self._check_names()
        if not self.local_model and not self.routes:
            raise ValueError("with local_model = false, configure at least one [[routes]] entry")
        return self

    def _check_tei_names(self) -> None:
        unknown = [n for n in self.ignore_tei_env if n not in TEI_ENV]
        if unknown:
            raise ValueError(
                f"ignore_tei_env: {', '.join(unknown)} is no TEI variable embedplex checks "
                "(docs/configuration.md, Coming from TEI)"
            )

    def _check_api_keys(self) -> None:
        ids = [k.id for k in self.api_keys]
        secrets = [k.key.get_secret_value() for k in self.api_keys]
        if self.api_key is not None:
            ids.append("static")  # the id of api_key's tenant (core/tenant.py: STATIC_KEY)
            secrets.append(self.api_key.get_secret_value())
        if len(set(ids)) != len(ids):
            raise ValueError('api_keys ids must be unique (and not "static", api_key\'s id)')
        if len(set(secrets)) != len(secrets):
            raise ValueError("two api_keys (or api_key) share one secret")
        if any(secret.startswith(MANAGED_KEY_PREFIX) for secret in secrets):
            raise ValueError(
                f"api_key and api_keys keys must not start with {MANAGED_KEY_PREFIX!r}: that "
                "prefix is the managed keys' (embedplex keys create), and such a key would "
                "never authenticate"
            )
        if self.admin_secret is not None and self.admin_secret.get_secret_value() in secrets:
            raise ValueError("admin_secret must differ from every API key (clients have those)")

    def _check_names(self) -> None:
        """Local models and remote routes share one namespace: a name is served once."""
        owners: dict[str, str] = {}
        served = [(m.name, "[[models]]") for m in self.local_models()]
        served += [(r.model, "[[routes]]") for r in self.routes]
        for name, where in served:
            if name in owners:
                raise ValueError(
                    f"model name {name!r} is served twice ({owners[name]} and {where}): "
                    "served names must be unique (local models and routes share one namespace)"
                )
            owners[name] = where

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build the effective settings; ``overrides`` are flags (highest precedence).

        An ``EMBEDPLEX_*`` variable that names no setting is refused (``UnknownEnvNames``, a
        ``ValueError``) before anything is read: pydantic-settings would skip it silently.
        A file that is no TOML, or a key that no setting has (in the file or in a table's
        variable), is ``ConfigFileError`` (a ``ValueError``): one line each, with the place
        and the closest known name (``config_file.py``).
        """
        check_env_names(os.environ, cls.model_fields)
        if config_file is None and os.environ.get("EMBEDPLEX_CONFIG"):
            config_file = Path(os.environ["EMBEDPLEX_CONFIG"])
        if config_file is not None and not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            unknown = unknown_settings(exc, cls, config_file, os.environ)
            if unknown is None:
                raise
            raise unknown from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            if config_file is None:  # only the file is read as bytes, or as TOML
                raise
            raise unreadable(config_file, exc) from None
        finally:
            _CONFIG_FILE.reset(token)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_id

    def flat_model(self) -> ModelConfig:
        """The one model the flat keys describe, every key resolved."""
        return ModelConfig(
            name=self.model_name, model_id=self.model_id, revision=self.revision
        ).resolved(self)

    def local_models(self) -> list[ModelConfig]:
        """The local models to serve, in order, every unset key taken from the top level."""
        if not self.local_model:
            return []
        if not self.models:
            return [self.flat_model()]
        return [m.resolved(self) for m in self.models]

    def redacted(self) -> dict[str, Any]:
        """Effective settings safe to print or log: secrets become '***'.

        Provider keys are never in the settings at all (only the names of the environment
        variables that hold them), so there is nothing else to hide.
        """
        data = self.model_dump(mode="json")
        if self.state_url:  # user:password@ or ?password=: the password goes
            data["state_url"] = redact_url(self.state_url)
        for name, field in type(self).model_fields.items():
            if field.annotation is not None and "SecretStr" in str(field.annotation):
                data[name] = "***" if getattr(self, name) is not None else None
        for key in data.get("api_keys", ()):
            key["key"] = "***"
        for provider in data.get("providers", ()):  # a key in an endpoint's query
            redact_provider(provider)
        return data
