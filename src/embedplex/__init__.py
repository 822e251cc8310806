"""embedplex: an embedding server and batching gateway."""

__version__ = "0.1.0"
