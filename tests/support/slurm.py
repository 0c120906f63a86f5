"""A one-node Slurm cluster in a temporary directory, for end-to-end tests of the Slurm kit.

It installs nothing: it runs the `munged`, `slurmctld` and `slurmd` already
on PATH (Debian's `munge` and `slurm-wlm`; `.ci/run` installs them), as
root, with every file they write (keys, state, spool, logs, sockets) under
the directory given. The node declares two GPUs whose device files stand
in for real ones, so that jobs ask for GPUs as on a cluster and Slurm sets
CUDA_VISIBLE_DEVICES for them. Every wait is bounded; `stop` cancels every
job, waits for the queue to empty, and ends the daemons.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")
GPUS = 2


def unavailable() -> str | None:
    """Why this machine cannot run the test cluster, or None if it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurm-wlm munge, as .ci/run does")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """munged, slurmctld and slurmd for one node named after this host; `env` is what clients need."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.node = socket.gethostname().split(".")[0]
        self.conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------- start

    def start(self) -> None:
        for sub in ("state", "spool", "log", "munge", "dev"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        munge = self.directory / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        socket_path = munge / "socket"
        self._daemon("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                                f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'seed'}",
                                f"--log-file={self.directory / 'log' / 'munged.log'}"])
        self._wait(lambda: socket_path.exists(), "munged to create its socket")
        self._daemon("slurmctld", ["slurmctld", "-D", "-c", "-i"])
        self._wait(lambda: self._run("scontrol", "ping", check=False).returncode == 0, "slurmctld to answer")
        self._daemon("slurmd", ["slurmd", "-D"])
        self._wait(lambda: self._run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                   "the node to be idle")

    def _write_config(self) -> None:
        d = self.directory
        devices = []
        for index in range(GPUS):  # character devices, as gres.conf requires, whose number gives the GPU index
            device = d / "dev" / f"nvidia{index}"
            if not device.exists():
                device.symlink_to("/dev/null")
            devices.append(device)
        (d / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={d / 'dev'}/nvidia[0-{GPUS - 1}]\n")
        self.conf.write_text(f"""\
ClusterName=virnucpro-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge' / 'socket'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(self.directory / "log" / f"{name}.out", "wb") as log:
            self.daemons[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def _wait(self, condition, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            exited = [name for name, p in self.daemons.items() if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                problem = f"{exited[0]} exited" if exited else f"waited {timeout:g} s"
                raise RuntimeError(f"test Slurm: {problem} for {what}; logs in {self.directory / 'log'}")
            time.sleep(0.2)

    # --------------------------------------------------------- clients

    def _run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                env=env or self.env, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict[str, str],
               cwd: Path) -> str:
        """Submit `script` with `env` exported to the job; the job id."""
        out = self._run("sbatch", "--parsable", *options, str(script), *args, env={**env, **self._slurm_env()},
                        cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def _slurm_env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def job(self, job: str) -> dict[str, str]:
        """The fields `scontrol show job` prints, for the job (or array task) given."""
        text = self._run("scontrol", "show", "job", "--oneliner", job).stdout.splitlines()[0]
        fields = {}
        for item in text.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def jobs(self) -> list[str]:
        """Every job and array task in the queue, pending, running or finishing."""
        return self._run("squeue", "-h", "-r", "-o", "%i").stdout.split()

    def ended(self, job: str) -> bool:
        """True once the job has ended (passing states such as CONFIGURING or COMPLETING are not an end)."""
        return self.job(job)["JobState"] in ENDED

    def wait_ended(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until the job has ended; its fields."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if fields["JobState"] in ENDED:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {fields['JobState']} after {timeout:g} s")
            time.sleep(0.5)

    def requeue(self, job: str) -> None:
        self._run("scontrol", "requeue", job)

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Cancel every job, wait for the queue to empty, then end slurmd, slurmctld and munged (in that order)."""
        try:
            if self.daemons.get("slurmctld") is not None and self.daemons["slurmctld"].poll() is None:
                jobs = self.jobs()
                if jobs:
                    self._run("scancel", *jobs, check=False)
                deadline = time.monotonic() + STOP_TIMEOUT
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        finally:
            for name in reversed(DAEMONS):
                process = self.daemons.pop(name, None)
                if process is None:
                    continue
                if process.poll() is None:
                    process.terminate()
                try:
                    process.wait(STOP_TIMEOUT / 4)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
