"""The cores a process may use: its CPU affinity, capped by a cgroup CPU quota (core/cores.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedplex.core.cores import cgroup_quota, usable_cores
from embedplex.models.layout import inference_layout


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "cores"),
    [
        ("max 100000\n", 8, 8),  # no limit: the affinity
        ("200000 100000\n", 64, 2),  # docker --cpus 2 on a 64-core host
        ("250000 100000\n", 64, 2),  # 2.5 CPUs: 2 threads, not 3 throttled ones
        ("50000 100000\n", 64, 1),  # half a CPU: still one
        ("800000 100000\n", 4, 4),  # a quota above the CPUs it may run on: those
        ("garbage\n", 6, 6),  # unreadable: the affinity
    ],
)
def test_a_container_quota_caps_the_cores(
    tmp_path: Path, cpu_max: str, affinity: int, cores: int
) -> None:
    write(tmp_path, "cpu.max", cpu_max)
    assert usable_cores(cgroup_root=tmp_path, own_cgroup="0::/\n", affinity=affinity) == cores


def test_the_smallest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    """A systemd service's CPUQuota on its own cgroup, a looser one on its slice."""
    write(tmp_path, "system.slice/cpu.max", "400000 100000\n")
    write(tmp_path, "system.slice/embedplex.service/cpu.max", "150000 100000\n")
    own = "0::/system.slice/embedplex.service\n"
    assert cgroup_quota(tmp_path, own) == 1.5
    assert usable_cores(cgroup_root=tmp_path, own_cgroup=own, affinity=16) == 1
    assert cgroup_quota(tmp_path, "0::/system.slice\n") == 4.0


def test_cgroup_v1(tmp_path: Path) -> None:
    write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "300000\n")
    write(tmp_path, "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert usable_cores(cgroup_root=tmp_path, own_cgroup="", affinity=32) == 3
    write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    assert usable_cores(cgroup_root=tmp_path, own_cgroup="", affinity=32) == 32


def test_no_cgroup_file_system(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path / "missing", "0::/\n") is None
    assert usable_cores(cgroup_root=tmp_path / "missing", own_cgroup="", affinity=3) == 3


def test_this_process_gets_at_least_one_and_at_most_its_cpus() -> None:
    import os

    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)


def test_the_layout_follows_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the server sizes its inference threads by (models/layout.py)."""
    from embedplex.config import Settings
    from embedplex.models import layout

    monkeypatch.setattr(layout, "process_cores", lambda: 1)
    assert inference_layout(Settings(backend="torch")).threads == 1
    monkeypatch.setattr(layout, "process_cores", lambda: 6)
    assert inference_layout(Settings(backend="torch")).threads == 6
