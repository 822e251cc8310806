"""A local Ray cluster for the modules that serve through one (one cluster per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A 2-CPU Ray started in this process (no dashboard); its GCS address."""
    ray = pytest.importorskip("ray")
    # Ray waits a fixed 30 s for its raylet to register; on a CPU loaded by other tests that
    # can run out, so a start that timed out is tried again (at most three times).
    for attempt in range(3):
        try:
            context = ray.init(
                # Always a cluster of its own: without this, ray.init joins one already
                # running on the machine (`ray start`, RAY_ADDRESS) and refuses num_cpus.
                address="local",
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=100 * 1024 * 1024,
                log_to_driver=False,
                namespace="embedplex-tests",
            )
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2 or "timed out" not in str(exc):
                raise
    try:
        yield str(context.address_info["gcs_address"])
    finally:
        ray.shutdown()
