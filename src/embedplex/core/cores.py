"""How many cores this process may use: the CPUs it may run on, capped by its CPU quota.

``os.cpu_count()`` is the machine's count. In a container with a CPU limit (a Kubernetes
``limits.cpu``, ``docker run --cpus``) the kernel enforces the limit as a cgroup quota, and a
process that sizes its thread pools to the host's 64 cores on a 2-CPU quota runs 32 times more
inference threads than it gets CPU for: each is throttled in turn, every pass waits on the
slowest. So the inference layout, ONNX Runtime's threads and the tokenizer workers are sized by
``usable_cores``: the CPUs in this process's affinity mask (``taskset``, cpusets), and no more
than the quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``),
rounded down (at least 1): a quota of 2.5 CPUs runs 2 threads rather than 3 throttled ones.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(
    *,
    cgroup_root: Path = CGROUP_ROOT,
    own_cgroup: str | None = None,
    affinity: int | None = None,
) -> int:
    """The cores this process may use (see the module docstring). For tests: ``cgroup_root``
    (where the cgroup file system is), ``own_cgroup`` (the text of /proc/self/cgroup) and
    ``affinity`` (how many CPUs it may run on)."""
    cpus = affinity if affinity is not None else _affinity()
    quota = cgroup_quota(cgroup_root, own_cgroup)
    if quota is None:
        return cpus
    return max(1, min(cpus, int(quota)))


@functools.cache
def process_cores() -> int:
    """``usable_cores()`` of this process, read once."""
    return usable_cores()


def tokenizer_threads(configured: int | None) -> int:
    """The tokenizer threads of a local model: ``tokenization_workers``, else one a core."""
    return configured or process_cores()


def cgroup_quota(root: Path = CGROUP_ROOT, own_cgroup: str | None = None) -> float | None:
    """The CPU quota in CPUs (2.5 for 250000/100000), or None when there is none or none can
    be read (no cgroup file system, an unexpected format: the affinity then decides).

    cgroup v2: the smallest ``cpu.max`` of this process's cgroup and its ancestors (a container
    sees its own cgroup as the root; a systemd service's ``CPUQuota`` sits on its own).
    cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the cpu controller's mount."""
    if own_cgroup is None:
        try:
            own_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            own_cgroup = ""
    found: list[float] = []
    for folder in _v2_folders(root, own_cgroup):
        try:
            fields = (folder / "cpu.max").read_text().split()  # "max 100000", "250000 100000"
        except OSError:
            continue
        try:
            if len(fields) == 2 and fields[0] != "max" and (q := _ratio(*fields)) is not None:
                found.append(q)
        except ValueError:
            continue
    if found:
        return min(found)
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()  # -1: no limit
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        try:
            return None if int(quota) <= 0 else _ratio(quota, period)
        except ValueError:
            return None
    return None


def _v2_folders(root: Path, own_cgroup: str) -> list[Path]:
    """This process's v2 cgroup folder and its ancestors up to ``root`` (``0::/a/b``)."""
    for line in own_cgroup.splitlines():
        if line.startswith("0::"):
            parts = [p for p in line[3:].strip().split("/") if p and p != ".."]
            return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [root]


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
