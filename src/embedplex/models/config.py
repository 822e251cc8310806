"""One served local model's configuration: a ``[[models]]`` table.

Every key but ``name``, ``model_id``, ``revision``, ``kind`` and ``load`` may be left out; an
unset key takes the top-level setting of the same name (``Settings.local_models`` fills them
in), so the flat keys of a config file are the defaults of its tables. Without any table, the
flat keys describe the one model served (``Settings.flat_model``).

The CPU layout (``inference_threads``, ``inference_solo_threads``) stays process-wide on
purpose: every local model's passes share the same cores (``models/layout.py``).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from embedplex.backends.model_files import ModelKind

if TYPE_CHECKING:
    from embedplex.config import Settings

Dtype = Literal["float32", "float16", "bfloat16", "int8"]
PoolingName = Literal["cls", "mean", "last-token"]
KindName = Literal["embed", "rerank"]

KINDS: dict[str, ModelKind] = {"embed": ModelKind.EMBEDDING, "rerank": ModelKind.RERANKER}

# Keys a table may leave unset: they take the top-level setting of the same name.
INHERITED = (
    "backend",
    "device",
    "dtype",
    "pooling",
    "max_input_length",
    "auto_truncate",
    "default_prompt_name",
    "default_prompt",
    "int8_min_cosine",
    "inference_streams",
    "max_batch_tokens",
    "max_batch_requests",
    "max_concurrent_requests",
    "max_queue_size",
    "queue_timeout_ms",
    "max_client_batch_size",
    "queue_policy",
)


# The default prompt: a name from the model's prompts, or a literal one; never both (TEI's
# flags conflict too).
_PROMPTS = ("default_prompt_name", "default_prompt")

# Keys that only mean something for a model run as Ray Serve replicas (docs/ray.md).
RAY_KEYS = (
    "replicas",
    "autoscaling",
    "ray_address",
    "num_cpus",
    "num_gpus",
    "ray_delete_on_close",
    "ray_start_timeout_s",
)

RAY_MISSING = "runtime = \"ray\" needs Ray Serve: pip install 'embedplex[ray]'"


class RayAutoscaling(BaseModel):
    """Serve's autoscaling for a ``runtime = "ray"`` model: replicas between min and max, sized so
    that each replica has about ``target_ongoing_requests`` requests in flight."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(
        64, gt=0, description="Requests in flight per replica that Serve scales toward."
    )

    @model_validator(mode="after")
    def _check(self) -> RayAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling: min_replicas exceeds max_replicas")
        return self


class ModelConfig(BaseModel):
    """A local model served under ``name`` (what clients send as ``model``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(
        "", description="Name clients use for the model (default: the model id); unique."
    )
    model_id: str = Field(min_length=1, description="Local directory or Hugging Face repo id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    kind: KindName | None = Field(
        None,
        description="embed or rerank (default: read from the model's files; required with "
        'load = "lazy", whose files are not read before its first request).',
    )
    load: Literal["eager", "lazy"] = Field(
        "eager", description="eager: load at start; lazy: on the first request that names it."
    )
    backend: Literal["onnx", "torch"] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    dtype: Dtype | None = None
    pooling: PoolingName | None = None
    max_input_length: int | None = Field(None, ge=1)
    auto_truncate: bool | None = None
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    int8_min_cosine: float | None = Field(None, ge=0, le=1)
    inference_streams: int | None = Field(
        None, ge=1, description="Batches of this model in flight at once (see the layout)."
    )
    max_batch_tokens: int | None = Field(None, ge=1)
    max_batch_requests: int | None = Field(None, ge=1)
    max_concurrent_requests: int | None = Field(None, ge=1)
    max_queue_size: int | None = Field(None, ge=1)
    queue_timeout_ms: int | None = Field(None, ge=1)
    max_client_batch_size: int | None = Field(None, ge=1)
    queue_policy: Literal["fair", "fifo"] | None = None
    runtime: Literal["local", "ray"] = Field(
        "local",
        description="local: in this process; ray: Ray Serve replicas behind this gateway "
        "(docs/ray.md; needs the embedplex[ray] extra).",
    )
    replicas: int | None = Field(
        None, ge=1, description='runtime = "ray": a fixed number of replicas (default 1).'
    )
    autoscaling: RayAutoscaling | None = Field(
        None, description='runtime = "ray": Serve autoscaling instead of a fixed count.'
    )
    ray_address: str | None = Field(
        None,
        description='runtime = "ray": "auto" (RAY_ADDRESS or the cluster on this node, the '
        'default), "local" (start a private Ray in this process) or a cluster address.',
    )
    num_cpus: float | None = Field(
        None, gt=0, description='runtime = "ray": CPUs per replica (its inference threads).'
    )
    num_gpus: float | None = Field(None, ge=0, description='runtime = "ray": GPUs per replica.')
    ray_delete_on_close: bool | None = Field(
        None,
        description='runtime = "ray": delete the Serve application when this gateway stops, '
        "if it deployed it (default false: other gateways may share its replicas).",
    )

    ray_start_timeout_s: float | None = Field(
        None,
        gt=0,
        description='runtime = "ray": how long the application may take to start (its '
        "replicas placed and loaded) before the start fails with Serve's reason (default 300).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and data.get("model_id"):
            return {**data, "name": data["model_id"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.load == "lazy" and self.kind is None:
            raise ValueError(
                f'model {self.name!r}: load = "lazy" needs kind ("embed" or "rerank"): '
                "its files are not read before its first request"
            )
        if self.default_prompt is not None and self.default_prompt_name is not None:
            raise ValueError(
                f"model {self.name!r}: default_prompt and default_prompt_name are one choice "
                "(as in TEI): give one"
            )
        if self.runtime == "ray":
            self._check_ray()
        else:
            given = [k for k in RAY_KEYS if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f'model {self.name!r}: {", ".join(given)} only apply with runtime = "ray"'
                )
        return self

    def _check_ray(self) -> None:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError(f"model {self.name!r}: give replicas or autoscaling, not both")
        if self.load == "lazy":
            raise ValueError(
                f'model {self.name!r}: runtime = "ray" deploys at start; load = "lazy" is for '
                "in-process models"
            )
        if importlib.util.find_spec("ray") is None:
            raise ValueError(f"model {self.name!r}: {RAY_MISSING}")

    @property
    def model_kind(self) -> ModelKind | None:
        return KINDS[self.kind] if self.kind is not None else None

    def resolved(self, settings: Settings) -> ModelConfig:
        """This table with every unset key taken from the top-level settings.

        The two default prompts are one choice: a table that makes it (either key) takes
        neither from the top level, so its own prompt is never joined by the other kind."""
        unset = [k for k in INHERITED if getattr(self, k) is None]
        if self.default_prompt is not None or self.default_prompt_name is not None:
            unset = [k for k in unset if k not in _PROMPTS]
        return self.model_copy(update={k: getattr(settings, k) for k in unset})

    def check_limits(self) -> None:
        """The cross-key rules of a resolved table (the same as the top level's)."""
        if (
            self.max_client_batch_size is not None
            and self.max_queue_size is not None
            and self.max_client_batch_size > self.max_queue_size
        ):
            raise ValueError(f"model {self.name!r}: max_client_batch_size exceeds max_queue_size")
        if (
            self.max_input_length is not None
            and self.max_batch_tokens is not None
            and self.max_input_length > self.max_batch_tokens
        ):
            raise ValueError(
                f"model {self.name!r}: max_batch_tokens must be at least max_input_length"
            )
