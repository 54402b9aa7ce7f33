"""torch threads follow the cores this process may use (affinity, cgroup quota), or ALIGNPIPE_THREADS."""

from __future__ import annotations

import pytest
import torch

from alignpipe import AlignpipeError
from alignpipe.threads import available_cores, cgroup_quota_cores, configure_threads


@pytest.mark.parametrize(("text", "expected"), [("max 100000\n", None), ("200000 100000\n", 2),
                                                ("150000 100000\n", 2), ("50000 100000\n", 1)])
def test_cgroup_v2_quota(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_quota_cores(tmp_path) == expected


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota_cores(tmp_path) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota_cores(tmp_path) is None


def test_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert available_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == 8


def test_override_and_bad_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("ALIGNPIPE_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("ALIGNPIPE_THREADS", "two")
        with pytest.raises(AlignpipeError, match="ALIGNPIPE_THREADS"):
            configure_threads()
    finally:
        torch.set_num_threads(before)


def test_busy_share_from_two_proc_stat_readings(tmp_path):
    """cpu0 95% busy, cpu1 idle, cpu2 half busy but not ours: 0.95 + 0 busy cores."""
    line = "cpu{} {} 0 0 {} 0 0 0 0 0 0\n"
    before, after = tmp_path / "a", tmp_path / "b"
    before.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n" + line.format(0, 100, 100) + line.format(1, 100, 100)
                      + line.format(2, 100, 100))
    after.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n" + line.format(0, 195, 105) + line.format(1, 100, 200)
                     + line.format(2, 150, 150))
    from alignpipe.threads import _cpu_times, busy_between

    assert busy_between(_cpu_times(before), _cpu_times(after), {0, 1}) == pytest.approx(0.95)


def test_a_busy_process_takes_its_core_away(monkeypatch):
    """A real spinning process on one of this process's cores: configure_threads leaves that core to it."""
    import subprocess
    import sys
    import time

    cores = available_cores()
    if cores < 2:
        pytest.skip("needs 2 cores")
    monkeypatch.delenv("ALIGNPIPE_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)
        assert configure_threads() <= cores - 1
        monkeypatch.setenv("ALIGNPIPE_LOAD_AWARE", "0")
        assert configure_threads() == cores
    finally:
        spinner.kill()
        torch.set_num_threads(before)
