"""`worker --gpus`: counting GPUs without torch, and the supervisor's restart decisions, with a fake clock."""

from __future__ import annotations

import sys

import pytest

from virnucpro.worker.config import SETUP_ERROR_EXIT
from virnucpro.worker.gpus import (
    STAND_IN_ENV,
    GpuDiscoveryError,
    choose_gpus,
    count_in_nvidia_smi_list,
    visible_count,
)
from virnucpro.worker.supervisor import RestartPolicy, Supervision

NVIDIA_SMI_L = """\
GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-6f3c1a52-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-0b8e3f11-0000-0000-0000-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-1c2d3e4f-0000-0000-0000-000000000000)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-9a7b6c5d-0000-0000-0000-000000000000)
"""


def test_nvidia_smi_list_counts_gpus_and_not_their_mig_instances():
    assert count_in_nvidia_smi_list(NVIDIA_SMI_L) == 3
    assert count_in_nvidia_smi_list("No devices were found\n") == 0


@pytest.mark.parametrize("cuda_visible_devices,shown", [
    (None, 4), ("0,1", 2), ("3", 1), ("2,0", 2), ("", 0), ("-1", 0), ("1,7,2", 1), ("0,-1,2", 1),
    ("GPU-6f3c1a52-0000,GPU-0b8e3f11-0000", 2), ("0,1,2,3,4", 4),
])
def test_cuda_visible_devices_narrows_the_count_as_cuda_does(cuda_visible_devices, shown):
    assert visible_count(4, cuda_visible_devices) == shown


def test_gpus_all_serves_every_gpu_a_slurm_job_was_given(monkeypatch):
    monkeypatch.setenv(STAND_IN_ENV, "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert choose_gpus(None) == [0, 1]  # CUDA numbers a job's GPUs from 0


def test_a_gpu_list_naming_a_gpu_the_node_lacks_says_which_exist(monkeypatch):
    monkeypatch.setenv(STAND_IN_ENV, "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert choose_gpus((1, 0)) == [1, 0]
    with pytest.raises(GpuDiscoveryError, match="shows GPUs 0 to 1.*so not 3"):
        choose_gpus((0, 3))


def test_gpus_all_without_any_gpu_is_an_error_that_points_to_device_cpu(monkeypatch):
    monkeypatch.setenv(STAND_IN_ENV, "0")
    with pytest.raises(GpuDiscoveryError, match="--device cpu"):
        choose_gpus(None)


def test_gpus_all_on_a_machine_without_nvidia_smi_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv(STAND_IN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there: no nvidia-smi
    monkeypatch.setitem(sys.modules, "pynvml", None)  # and no NVML
    with pytest.raises(GpuDiscoveryError, match="nvidia-smi is not installed"):
        choose_gpus(None)


def test_a_malformed_stand_in_count_is_refused(monkeypatch):
    monkeypatch.setenv(STAND_IN_ENV, "two")
    with pytest.raises(GpuDiscoveryError, match=STAND_IN_ENV):
        choose_gpus(None)


# ---------------------------------------------------------------- restarts

POLICY = RestartPolicy(first_delay=1.0, max_delay=60.0, stable_after=120.0)


def test_every_gpu_starts_at_once():
    core = Supervision([0, 1, 2], now=100.0, policy=POLICY)
    assert core.due(100.0) == [0, 1, 2]
    assert core.due(100.0) == []
    assert core.next_start() is None


def test_a_crashing_worker_is_restarted_after_doubling_delays_up_to_the_cap():
    core = Supervision([0], now=0.0, policy=POLICY)
    now = 0.0
    delays = []
    for _ in range(9):
        assert core.due(now) == [0]
        now += 5.0  # crashes 5 s after each start
        verdict = core.exited(0, -9, now)
        delays.append(verdict.restart_in)
        assert core.due(now) == []  # not before its delay
        now = core.next_start()
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_worker_that_ran_a_while_before_crashing_starts_again_from_the_first_delay():
    core = Supervision([0], now=0.0, policy=POLICY)
    core.due(0.0)
    assert core.exited(0, 1, 3.0).restart_in == 1
    core.due(4.0)
    assert core.exited(0, 1, 5.0).restart_in == 2
    core.due(7.0)
    verdict = core.exited(0, 1, 7.0 + 120.0)
    assert verdict.restart_in == 1
    assert "1 crash in a row" in verdict.text


def test_a_worker_that_cannot_start_is_not_restarted_and_the_others_go_on():
    core = Supervision([0, 1], now=0.0, policy=POLICY)
    core.due(0.0)
    verdict = core.exited(1, SETUP_ERROR_EXIT, 2.0)
    assert verdict.restart_in is None
    assert "not restarted" in verdict.text
    assert core.next_start() is None
    assert not core.all_gave_up
    assert core.due(1000.0) == []


def test_the_supervisor_gives_up_when_no_gpu_can_start_a_worker():
    core = Supervision([0, 1], now=0.0, policy=POLICY)
    core.due(0.0)
    core.exited(0, SETUP_ERROR_EXIT, 1.0)
    assert not core.all_gave_up
    core.exited(1, SETUP_ERROR_EXIT, 1.5)
    assert core.all_gave_up


def test_crash_messages_say_whether_a_signal_or_an_exit_code_ended_the_worker():
    core = Supervision([0, 1], now=0.0, policy=POLICY)
    core.due(0.0)
    assert "killed by signal 9" in core.exited(0, -9, 1.0).text
    assert "exited with code 1" in core.exited(1, 1, 1.0).text
