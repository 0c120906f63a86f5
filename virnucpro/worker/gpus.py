"""Which GPUs a process on this node can use, as CUDA numbers them, found without importing torch.

The count comes from NVML (the `nvml` extra) when it is installed, else from
`nvidia-smi -L`; CUDA_VISIBLE_DEVICES then narrows it the way CUDA does (a
Slurm job sees only the GPUs it was given, numbered from 0).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

# A testing aid, not a setting: pretend NVML and nvidia-smi report this many GPUs, and run
# the workers `--gpus` starts on the CPU, so that scripts can be tried on a machine without GPUs.
STAND_IN_ENV = "VIRNUCPRO_STAND_IN_GPUS"
NVIDIA_SMI_TIMEOUT = 30.0
_NO_DEVICES = 6  # nvidia-smi's exit status for "No devices were found"


class GpuDiscoveryError(RuntimeError):
    """The GPUs asked for are not there, or cannot be counted; says what to do instead."""


def stand_in_count() -> int | None:
    """The number of stand-in GPUs $VIRNUCPRO_STAND_IN_GPUS asks for, or None when it is not set."""
    value = os.environ.get(STAND_IN_ENV, "")
    if not value:
        return None
    if not value.isdigit():
        raise GpuDiscoveryError(f"${STAND_IN_ENV}={value!r}: give a number of stand-in GPUs, e.g. 2")
    return int(value)


def count_in_nvidia_smi_list(text: str) -> int:
    """The number of GPUs in the output of `nvidia-smi -L` (one `GPU N: NAME (UUID: ...)` line each)."""
    return sum(1 for line in text.splitlines() if re.match(r"GPU \d+:", line.strip()))


def visible_count(physical: int, cuda_visible_devices: str | None) -> int:
    """How many of `physical` GPUs CUDA shows a process given this CUDA_VISIBLE_DEVICES.

    As in CUDA: unset shows all; otherwise the entries (indices or GPU-/MIG-
    UUIDs) up to the first invalid one, so "" and "-1" show none.
    """
    if cuda_visible_devices is None:
        return physical
    shown = 0
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        valid = (entry.isdigit() and int(entry) < physical) or entry.startswith(("GPU-", "MIG-"))
        if not valid:
            break
        shown += 1
    return min(shown, physical)


def physical_count() -> int:
    """The GPUs this node's driver reports, from NVML or `nvidia-smi -L`; GpuDiscoveryError if neither answers."""
    stand_in = stand_in_count()
    if stand_in is not None:
        return stand_in
    count = _nvml_count()
    if count is not None:
        return count
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise GpuDiscoveryError("no NVIDIA GPU found: nvidia-smi is not installed here (nor the nvml extra); "
                                "on a machine without GPUs run `virnucpro worker --device cpu` instead of --gpus")
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuDiscoveryError(f"could not run `{smi} -L` to count the GPUs: {exc}") from None
    if result.returncode not in (0, _NO_DEVICES):
        said = (result.stdout + result.stderr).strip()
        raise GpuDiscoveryError(f"`{smi} -L` failed (exit {result.returncode}) while counting the GPUs: {said}")
    return count_in_nvidia_smi_list(result.stdout)


def _nvml_count() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None  # no driver loaded: let nvidia-smi say why


def choose_gpus(requested: tuple[int, ...] | None) -> list[int]:
    """The CUDA numbers of the GPUs to serve: `requested`, or every visible one (None, for `--gpus all`)."""
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_count(physical_count(), cuda_visible)
    hidden = f" (CUDA_VISIBLE_DEVICES={cuda_visible!r})" if cuda_visible is not None else ""
    if visible == 0:
        raise GpuDiscoveryError(f"no GPU is visible here{hidden}; run `virnucpro worker --device cpu` "
                                "on a machine without GPUs")
    if requested is None:
        return list(range(visible))
    absent = [g for g in requested if g >= visible]
    if absent:
        raise GpuDiscoveryError(f"--gpus {','.join(map(str, requested))}: this node shows GPUs 0 to {visible - 1}"
                                f"{hidden}, so not {absent[0]}; list GPUs it has, or pass --gpus all")
    return list(requested)
