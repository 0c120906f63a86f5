"""Where `virnucpro predict` runs its jobs: the broker at --broker, or a broker and workers started here.

A broker and workers started here belong to this command: they are stopped
when it ends, however it ends, and die with it if it is killed. Signal
handling while they run lives here too.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from broker.client import BrokerClient, BrokerError
from broker.server import default_log_path
from virnucpro.client.embed import wait_for_workers
from virnucpro.client.local import LocalCluster
from virnucpro.client.options import PredictError, PredictOptions
from virnucpro.client.run_dir import RUN_STAGES

CLIENT_TIMEOUT = 5.0


def broker_options(options: PredictOptions) -> list[str]:
    """The self-started broker's command-line options."""
    extra: list[str] = []
    if options.gpu_weights is not None:
        extra += ["--gpu-weights", str(options.gpu_weights)]
    if options.throughput_log is not None:
        extra += ["--throughput-log", str(options.throughput_log)]
    if options.worker_timeout is not None:
        # Heartbeats must come several times per timeout, or a busy worker is taken for dead.
        extra += ["--worker-timeout", str(options.worker_timeout),
                  "--heartbeat-interval", str(min(1.0, max(0.05, options.worker_timeout / 4)))]
    return extra


def worker_options(options: PredictOptions) -> list[str]:
    """The self-started workers' model options."""
    models = ["--models", options.models]
    if options.dnabert_model:
        models += ["--dnabert-model", options.dnabert_model]
    if options.esm_model:
        models += ["--esm-model", options.esm_model]
    if options.precision:
        models += ["--precision", options.precision]
    return models


class WatchedClient(BrokerClient):
    """A broker client that gives up at once when the local processes can no longer finish the job.

    run_job and wait_for_workers poll through `request`; raising here ends
    them as promptly as a broker error would, instead of waiting forever
    for workers that are gone.
    """

    def __init__(self, cluster: LocalCluster, timeout: float) -> None:
        super().__init__(cluster.address, timeout, insecure=cluster.insecure, environment_keys=cluster.environment_keys)
        self.cluster = cluster
        self.starting = True

    def request(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        problem = self.cluster.failure(self.starting)
        if problem is not None:
            raise BrokerError(problem)
        return super().request(kind, timeout, **fields)


def local_devices(options: PredictOptions) -> list[str]:
    """The device of each worker to start: --gpus, --workers N CPU workers, else every GPU, else two CPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if options.gpus is not None:
        absent = [g for g in options.gpus if g >= gpus]
        if absent:
            have = f"GPUs 0 to {gpus - 1}" if gpus else "no GPU that torch can use"
            raise PredictError(f"--gpus {','.join(map(str, options.gpus))}: this machine has {have}, so not "
                               f"{absent[0]}; pass GPUs it has, or --workers N for CPU workers")
        return [f"cuda:{g}" for g in options.gpus]
    if options.workers is not None:
        return ["cpu"] * options.workers
    return [f"cuda:{g}" for g in range(gpus)] or ["cpu", "cpu"]


def check_precision(options: PredictOptions, devices: Sequence[str]) -> None:
    """Refuse a --precision that a local device lacks now, rather than as a worker that fails to start."""
    if options.precision is None:
        return
    import torch

    from virnucpro.backends.common import PrecisionError, resolve_precision

    for device in dict.fromkeys(devices):
        try:
            resolve_precision(torch.device(device), options.precision)
        except PrecisionError as exc:
            raise PredictError(f"--precision {options.precision}: {exc}") from None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def broker_session(options: PredictOptions, devices: Sequence[str], work_dir: Path,
                   console: Console) -> Iterator[BrokerClient]:
    """A client of --broker ADDR, or of a broker and workers started here and stopped on the way out.

    Local workers are all waited for, so that the first job is seeded over
    all of them rather than over the first to finish loading its models.
    """
    if options.broker is not None:
        with BrokerClient(options.broker, CLIENT_TIMEOUT, insecure=options.insecure) as client:
            console.print(f"broker: {options.broker}, with the workers that serve it", markup=False)
            yield client
        return
    threads = max(1, _cores() // len(devices))
    # Zero configuration: the broker and workers started here admit only this user's own key.
    cluster = LocalCluster(work_dir / "logs", insecure=options.insecure)
    try:
        try:
            cluster.start_broker(*broker_options(options))
        except RuntimeError as exc:
            raise PredictError(str(exc)) from None
        # Torch sizes its thread pool from these: a fair share of the cores each, not all of them each.
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        for number, device in enumerate(devices, start=1):
            name = device if device.startswith("cuda") else f"cpu-{number}"
            cluster.start_worker(name, "--device", device, *worker_options(options), env=env)
        console.print(f"broker: {cluster.address}, started here with {len(devices)} workers "
                      f"({', '.join(devices)}; {threads} CPU thread(s) each); logs in {cluster.log_dir}",
                      markup=False)
        console.print(f"throughput log: {options.throughput_log or default_log_path()}", markup=False)
        client = WatchedClient(cluster, CLIENT_TIMEOUT)
        with client:
            for stage in RUN_STAGES:
                wait_for_workers(client, stage, len(devices), options.timeout, console)
            client.starting = False
            yield client
        for worker in cluster.workers.values():
            if worker.process.poll() is not None:
                console.print(f"[yellow]warning:[/yellow] {worker.name} exited with code "
                              f"{worker.process.returncode} during the run; the broker gave its files to the others "
                              f"(log: {escape(str(worker.log))})")
    finally:
        with _signals_ignored():
            cluster.close()


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """While open, Ctrl-C and SIGTERM are ignored, so that they cannot cut a shutdown short."""
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While open, SIGTERM unwinds like Ctrl-C, so that the processes this command started are stopped too."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
