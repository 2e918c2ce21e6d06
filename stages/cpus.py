"""The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (a container's CPU limit).

os.cpu_count() counts the host's CPUs: in a container or CI job held to 2 CPUs on a 64-core host it says 64, and a
stage that sizes its worker pools (or DuckDB its threads) by it runs 64 busy workers on 2 CPUs. dask.system.cpu_count
reads the same two limits, but importing dask costs ~150 ms in every stage process (measured), so this is its own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")  # its last line names a cgroup v2 group: "0::/the/group"
V1_CPU_DIRS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """CPUs in this process's affinity mask, no more than its cgroup's quota allows (rounded up), at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time per period that this process's cgroup allows (v2 ``cpu.max``, or v1's CFS quota);
    None when no quota is set or none can be read."""
    for name in V1_CPU_DIRS:
        quota, period = _ints(cgroup_root / name / "cpu.cfs_quota_us"), _ints(cgroup_root / name / "cpu.cfs_period_us")
        if quota and period:
            return quota[0] / period[0] if quota[0] > 0 and period[0] > 0 else None
    try:
        group = self_cgroup.read_text().strip().splitlines()[-1].split(":", 2)[2]
    except (OSError, IndexError):
        group = "/"
    v2 = _ints(cgroup_root / group.lstrip("/") / "cpu.max")  # "max 100000" (no quota) reads as []
    return v2[0] / v2[1] if len(v2) == 2 and min(v2) > 0 else None


def _ints(path: Path) -> list[int]:
    """The file's whitespace-separated integers; [] when it is unreadable or holds a word that is not one."""
    try:
        return [int(word) for word in path.read_text().split()]
    except (OSError, ValueError):
        return []


if __name__ == "__main__":
    print(available_cpus())
