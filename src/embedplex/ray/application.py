"""The Serve application of one model: the replica deployment with its Serve options.

Both ways of running replicas build it here: the gateway deploys it for a ``runtime = "ray"``
table (``models/ray.py``), and ``serve run embedplex.ray:app`` (or a Serve config file naming
``embedplex.ray:app``) deploys the same thing with Ray's own tooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedplex.config import Settings
from embedplex.models.config import ModelConfig
from embedplex.ray.replica import EmbedplexReplica
from embedplex.ray.wire import DEPLOYMENT

if TYPE_CHECKING:
    from ray.serve import Application

# The process-wide settings a replica needs to load and batch its model; nothing else (no
# secret) is shipped to the cluster, where deployment arguments are stored in the GCS.
REPLICA_SETTINGS = (
    "cache_dir",
    "cache_max_bytes",
    "tokenization_workers",
    "tokenize_inline_chars",
    "max_request_tokens",
    "inference_nice",
    "priority_aging_ms",
    "inference_timeout_s",
)

# Keys of a table that only the gateway reads: not shipped, so that replicas of an older
# release (whose ModelConfig forbids unknown keys) still load a table of a newer gateway.
GATEWAY_KEYS = frozenset({"ray_delete_on_close", "ray_start_timeout_s"})

# Seconds a replica that Serve stops (scale-down, delete) may take to finish its requests.
GRACEFUL_SHUTDOWN_S = 5.0


def max_ongoing_requests(model: ModelConfig) -> int:
    """Serve's cap of requests in flight on one replica.

    Serve never sends a replica more than this at once, so a cap below a batch would keep
    every batch short (ray-project/ray#43288). The replica's own admission
    (``max_concurrent_requests``, 429 beyond it) is the real limit; Serve's cap is that, and
    at least two full batches (two streams) so that the next batch queues while one runs.
    """
    requests = model.max_concurrent_requests or 512
    batch = model.max_batch_requests or 128
    return max(requests, 2 * batch)


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """The Serve options of ``model``'s deployment (a resolved ``runtime = "ray"`` table)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": max_ongoing_requests(model),
        "ray_actor_options": {"num_cpus": model.num_cpus or 1, "num_gpus": model.num_gpus or 0},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": 5.0,
    }
    if model.autoscaling is not None:
        a = model.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = model.replicas or 1
    return options


def application(settings: Settings, model: ModelConfig) -> Application:
    """``model``'s replicas as a Serve application (not yet deployed)."""
    from ray import serve

    shipped = settings.model_dump(mode="json", include=set(REPLICA_SETTINGS))
    deployment = serve.deployment(**deployment_options(model))(EmbedplexReplica)
    table = model.model_dump(mode="json", exclude=set(GATEWAY_KEYS))
    bound: Application = deployment.bind(shipped, table)
    return bound


def build(args: dict[str, str]) -> Application:
    """``serve run embedplex.ray:app config=examples/ray.toml model=minilm``, or the keys of a
    ``[[models]]`` table as arguments: ``serve run embedplex.ray:app model_id=... replicas=2``.

    ``config``: an embedplex config file; ``model``: the name of its table to deploy (default:
    the first ``runtime = "ray"`` table, else the first). Without ``config``, every other
    argument is a key of one table (top-level settings come from the environment).
    """
    args = dict(args)
    path = args.pop("config", None)
    if path is not None:
        settings = Settings.load(Path(path))
        name = args.pop("model", None)
        tables = settings.local_models()
        if name is not None:
            found = [m for m in tables if m.name == name]
            if not found:
                raise ValueError(f"{path} has no [[models]] table named {name!r}")
            model = found[0]
        else:
            model = next((m for m in tables if m.runtime == "ray"), tables[0])
        if args:
            raise ValueError(f"unknown arguments with config: {sorted(args)}")
    else:
        settings = Settings.load()
        model = ModelConfig.model_validate({"runtime": "ray", **args}).resolved(settings)
    if model.runtime != "ray":
        model = model.model_copy(update={"runtime": "ray"})
    model.check_limits()
    return application(settings, model)
