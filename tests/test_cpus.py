"""The CPUs a stage sizes its pools by: the affinity mask and the cgroup quota, not the host's core count."""

import os
import shutil
import subprocess
import sys

import pytest

from stages.cpus import available_cpus, cgroup_cpu_quota
from tests.conftest import REPO

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_tree(tmp_path, files: dict[str, str]):
    """A cgroup mount under tmp_path holding ``files``, and a /proc/self/cgroup naming its root group."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self").write_text("0::/\n")
    return tmp_path, tmp_path / "self"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({}, None),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),
        ({"cpu.max": "50000 0\n"}, None),  # unreadable as a quota, not a division by zero
    ],
)
def test_the_cgroup_quota_is_read_from_v1_and_v2(tmp_path, files, quota):
    assert cgroup_cpu_quota(*cgroup_tree(tmp_path, files)) == quota


def test_a_quota_below_the_affinity_caps_the_cpus_rounding_up(tmp_path):
    assert available_cpus(*cgroup_tree(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert available_cpus(*cgroup_tree(tmp_path / "none", {"cpu.max": "max 100000"})) == AFFINITY
    many = available_cpus(*cgroup_tree(tmp_path / "many", {"cpu.max": f"{100000 * (AFFINITY + 3)} 100000"}))
    assert many == AFFINITY


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_a_process_pinned_to_one_cpu_counts_one():
    cmd = [sys.executable, "-m", "stages.cpus"]
    pinned = subprocess.run(["taskset", "-c", "0", *cmd], cwd=REPO, capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "1"
    free = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert int(free.stdout) == available_cpus()
