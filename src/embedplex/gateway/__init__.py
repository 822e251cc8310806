"""The served names -> local model or remote route, their lifecycle and readiness."""

from embedplex.gateway.gateway import Gateway

__all__ = ["Gateway"]
