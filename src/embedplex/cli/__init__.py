"""The ``embedplex`` command: serve, providers, status, health, bench."""

from embedplex.cli.main import app, main

__all__ = ["app", "main"]
