"""Models served as Ray Serve replicas (docs/ray.md).

``embedplex.ray:app`` is a Serve application builder for Ray's own tooling::

    serve run embedplex.ray:app config=examples/ray.toml model=minilm --name embedplex-minilm

Ray is imported only when an application is built, so that importing this package (the gateway
reads ``wire``) never needs the ``embedplex[ray]`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.serve import Application


def app(args: dict[str, str]) -> Application:
    """The application builder ``serve run embedplex.ray:app key=value ...`` calls."""
    from embedplex.ray.application import build

    return build(args)


__all__ = ["app"]
