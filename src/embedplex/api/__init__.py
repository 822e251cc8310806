"""HTTP layer: routes and schemas per dialect; it only translates to and from the gateway."""

from embedplex.api.app import create_app

__all__ = ["create_app"]
