"""Build the gateway from the settings: every local model, the provider router, the routes.

Blocking (models load here): the app calls it in a thread at the inference threads' priority.
Local models are loaded in config order and all share one core gate (``models/layout.py``);
a model outside the allowed lists is neither loaded nor served; a lazy model is only described
here and loads on its first request (``lazy.py``); a ``runtime = "ray"`` model is deployed as
Ray Serve replicas (``models/ray.py``) and takes no local cores.
"""

from __future__ import annotations

import logging

from embedplex.backends.passes import PassGate
from embedplex.cache import EmbeddingCache
from embedplex.config import ModelConfig, Settings
from embedplex.core.types import ModelInfo, ServedModel
from embedplex.gateway.allowed import AllowedModels
from embedplex.gateway.gateway import Gateway
from embedplex.gateway.lazy import LazyModel
from embedplex.models.config import KINDS
from embedplex.models.layout import core_gate, inference_layout

logger = logging.getLogger(__name__)


def build_gateway(settings: Settings) -> Gateway:
    """Load the configured local models and build the provider router.

    The router exists even with no providers configured, so that providers can be added at
    run time through the admin API.
    """
    from embedplex.providers.router import Router, remote_model

    allowed = AllowedModels.from_settings(settings)
    # One byte bound for every local model and remote provider (docs/cache.md).
    cache = EmbeddingCache.from_settings(settings)
    configs = settings.local_models()
    gate = core_gate(inference_layout(settings, model=m) for m in configs if m.runtime == "local")
    models: list[ServedModel] = []
    for config in configs:
        model = _local(settings, config, gate, allowed, cache)
        if model is not None:
            models.append(model)
    router = Router(
        settings.providers,
        idle_ttl=settings.router_idle_ttl_s,
        probe_interval=settings.router_probe_interval_s,
        max_client_batch_size=settings.max_client_batch_size,
        allowed_networks=settings.provider_allowed_networks,
        cache=cache,
    )
    for route in settings.routes:
        remote = remote_model(router, route)
        if allowed.allows(route.model, remote.info.kind):
            models.append(remote)
        else:
            logger.warning("route %s is outside the allowed lists: not served", route.model)
    return Gateway(models, router=router, allowed=allowed, cache=cache)


def _local(
    settings: Settings,
    config: ModelConfig,
    gate: PassGate,
    allowed: AllowedModels,
    cache: EmbeddingCache,
) -> ServedModel | None:
    from embedplex.models.loading import load_local_model

    kind = config.model_kind
    if kind is not None and not allowed.allows(config.name, kind.value):
        logger.warning("model %s is outside the allowed lists: not loaded", config.name)
        return None
    if config.runtime == "ray":
        from embedplex.models.ray import RayModel

        return RayModel.deploy(settings, config)
    if config.load == "lazy":
        return LazyModel(
            placeholder(config),
            lambda: load_local_model(settings, config, gate=gate, cache=cache),
            nice=settings.inference_nice,
            wait_s=(config.queue_timeout_ms or settings.queue_timeout_ms) / 1000,
        )
    model = load_local_model(settings, config, gate=gate, cache=cache)
    if not allowed.allows(config.name, model.info.kind):  # its kind was read from its files
        logger.warning("model %s is outside the allowed lists: not served", config.name)
        model.backend.close()
        return None
    return model


def placeholder(config: ModelConfig) -> ModelInfo:
    """What a lazy model says about itself before it loads: its config."""
    kind = KINDS[config.kind or "embed"]
    return ModelInfo(
        name=config.name,
        model_id=config.model_id,
        sha=None,
        backend=config.backend or "onnx",
        device=config.device or "auto",
        dtype=config.dtype or "float32",
        dim=0,  # unknown until loaded
        pooling=config.pooling or "",
        max_input_length=config.max_input_length or 0,
        prompts={},
        kind=kind.value,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_requests,
        max_concurrent_requests=config.max_concurrent_requests,
        max_client_batch_size=config.max_client_batch_size,
        auto_truncate=config.auto_truncate,
    )
