"""Chaos run: every fault the reliability section promises to survive, in one command, as one table.

Each scenario starts a real broker and synthetic workers on loopback, runs
`virnucpro embed` as a user would, breaks something, and then checks the
outcome on disk against a clean run:

- lost: inputs with no complete output while `embed` exited 0 (a silent
  wrong answer; must be 0 everywhere);
- corrupted: outputs present whose bytes differ from a clean run's;
- duplicated: files with more than one `task_done` record in the
  throughput log;
- healthy failed: files reported failed that nothing was wrong with.

Scenarios: a storm of worker kills, broker kills, a hung read (a FIFO), a
worker stopped past its lease, a full disk, 100,000 malformed messages with
10,000 fake registrations, and another local user trying to submit.

    python tools/chaos.py [--only NAME ...] [--json chaos.json]

Exit status 0 when every scenario met its target, 1 otherwise.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import msgpack
import zmq
from rich.console import Console
from rich.table import Table

from broker import protocol
from broker.security import credentials
from virnucpro.backends.synthetic import SyntheticBackend
from virnucpro.client.embed import plan_job, run_job
from virnucpro.client.local import LocalCluster
from virnucpro.processes import command
from virnucpro.stages import is_complete

SPEED = 2000.0  # residues/s of every synthetic worker: files of 500 to 4,000 residues take 0.25 to 2 s
LEASE = ("--heartbeat-interval", "0.25", "--worker-timeout", "1.5")
EMBED_TIMEOUT = 300.0  # seconds any one embed may take before the scenario counts as failed


@dataclass
class Row:
    """One scenario's outcome."""

    scenario: str
    files: int = 0
    lost: int = 0
    corrupted: int = 0
    duplicated: int = 0
    healthy_failed: int = 0
    exit: str = ""
    seconds: float = 0.0
    passed: bool = False
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ helpers


def write_inputs(directory: Path, count: int, seed: int, prefix: str = "file") -> list[Path]:
    """`count` FASTA files of 5 to 40 reads of 100 random bases."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"{prefix}_{i:03d}.fa"
        path.write_text("".join(f">{prefix}{i}_{r}\n{''.join(rng.choice('ACGT') for _ in range(100))}\n"
                                for r in range(rng.randint(5, 40))))
        paths.append(path)
    return paths


def output_of(path: Path, out: Path) -> Path:
    return out / f"{path.stem}_synthetic.json"


def embed(cluster: LocalCluster, inputs: Sequence[Path], out: Path, *extra: str,
          prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """`virnucpro embed` of the synthetic stage as a child process (its output in out.parent/embed.log)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"embed-{out.name}.log", "ab")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [*prefix, *command("virnucpro"), "embed", "--broker", cluster.address, "--stage", "synthetic", "-o", str(out),
         "--weighted", "--steal", *extra, *map(str, inputs)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160", **(env or {})},
    )
    log.close()
    return process


def finish(process: subprocess.Popen, timeout: float = EMBED_TIMEOUT) -> int | None:
    """The exit status of an embed, or None if it ran past `timeout` (then it is killed)."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def check(row: Row, inputs: Sequence[Path], out: Path, code: int | None, throughput_log: Path | None,
          sick: Sequence[Path] = ()) -> None:
    """Fill in lost, corrupted, duplicated and healthy failed against a clean run; `sick`: inputs meant to fail."""
    reference = SyntheticBackend(1e12)
    with tempfile.TemporaryDirectory() as scratch:
        expected = Path(scratch) / "expected.json"
        for path in inputs:
            output = output_of(path, out)
            if path in sick:
                continue
            if os.path.lexists(output):
                reference.run(path, expected)
                if not is_complete(output) or output.read_bytes() != expected.read_bytes():
                    row.corrupted += 1
            elif code == 0:
                row.lost += 1
    report_path = out / "run_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        failed = {f["file"] for f in report.get("failures", [])}
        row.healthy_failed = len(failed - {str(p) for p in sick})
    if throughput_log is not None and throughput_log.exists():
        records = [json.loads(line) for line in throughput_log.read_text().splitlines() if line.strip()]
        counts = Counter(r["file"] for r in records if r.get("event") == "task_done")
        row.duplicated = sum(1 for n in counts.values() if n > 1)
    row.files = len(inputs)
    row.exit = "timeout" if code is None else str(code)


def broker_pid_rss_mb(cluster: LocalCluster) -> float:
    assert cluster.broker is not None
    for line in Path(f"/proc/{cluster.broker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- scenarios


def worker_kill_storm(root: Path, kills: int = 50, files: int = 120) -> Row:
    """4 workers; every 0.5 to 2 s one is killed with SIGKILL and a new one started, up to `kills` times.

    The kills stop when the job ends, so the table says how many there were.
    """
    row = Row("worker kill storm")
    slow = str(SPEED / 2)  # 120 files take over a minute: time for all the kills
    inputs = write_inputs(root / "in", files, seed=1)
    log = root / "throughput.jsonl"
    rng = random.Random(1)
    killed = 0
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log), *LEASE)
        for n in range(4):
            cluster.start_worker(f"w{n}", "--synthetic-speed", slow)
        cluster.wait_for_workers(4, "synthetic", timeout=60)
        started = time.monotonic()
        process = embed(cluster, inputs, root / "out")
        generation = 4
        while killed < kills and process.poll() is None:
            time.sleep(rng.uniform(0.5, 2.0))
            alive = sorted(name for name, child in cluster.workers.items() if child.process.poll() is None)
            if not alive:
                continue
            cluster.workers[rng.choice(alive)].process.send_signal(signal.SIGKILL)
            killed += 1
            cluster.start_worker(f"w{generation}", "--synthetic-speed", slow)
            generation += 1
        code = finish(process)
        row.seconds = time.monotonic() - started
    check(row, inputs, root / "out", code, log)
    # Killed workers leave their scratch (what they were writing); the next job planned there removes it.
    swept = len(plan_job("synthetic", inputs, root / "out").swept)
    left = [p.name for p in (root / "out").iterdir() if p.name.startswith(".")]
    row.notes.append(f"{killed} workers killed; {swept} scratch directories swept by the next plan, {len(left)} left")
    row.passed = not left
    row.passed = row.passed and code == 0 and not (row.lost or row.corrupted or row.duplicated or row.healthy_failed)
    return row


def broker_kills(root: Path, kills: int = 10, files: int = 60) -> Row:
    """2 workers; the broker is killed with SIGKILL every 1.5 to 3 s and started again on its address."""
    row = Row("broker kills")
    slow = str(SPEED / 2)  # 60 files take about a minute: time for every kill
    inputs = write_inputs(root / "in", files, seed=2)
    log = root / "throughput.jsonl"
    rng = random.Random(2)
    killed = 0
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log), *LEASE)
        for n in range(2):
            cluster.start_worker(f"w{n}", "--synthetic-speed", slow, "--broker-timeout", "2")
        cluster.wait_for_workers(2, "synthetic", timeout=60)
        started = time.monotonic()
        process = embed(cluster, inputs, root / "out", "--timeout", "120")
        while killed < kills and process.poll() is None:
            time.sleep(rng.uniform(1.5, 3.0))
            assert cluster.broker is not None
            cluster.broker.process.send_signal(signal.SIGKILL)
            cluster.broker.process.wait()
            killed += 1
            time.sleep(0.5)
            cluster.start_broker("--throughput-log", str(log), *LEASE, address=cluster.address)
        code = finish(process)
        row.seconds = time.monotonic() - started
    check(row, inputs, root / "out", code, log)
    row.notes.append(f"{killed} broker kills")
    row.passed = code == 0 and not (row.lost or row.corrupted or row.duplicated or row.healthy_failed)
    return row


def hung_read(root: Path, files: int = 20) -> Row:
    """One input turns into a FIFO nobody writes after submission: its read hangs on the worker. The other files
    must finish, the hung one fail on the task timeout, and the next job run at once.

    Its fingerprint would refuse the FIFO before the read (its size is 0), so the file goes in without one, as
    from a dead network mount that still answers stat from its cache.
    """
    row = Row("hung read (FIFO)")
    hung, *inputs = write_inputs(root / "in", files + 1, seed=3)
    log = root / "throughput.jsonl"
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log), *LEASE, "--task-timeout", "5")
        for n in range(2):
            cluster.start_worker(f"w{n}", "--synthetic-speed", str(SPEED * 2))
        cluster.wait_for_workers(2, "synthetic", timeout=60)
        plan = plan_job("synthetic", [hung, *inputs], root / "out")
        hung.unlink()
        os.mkfifo(hung)
        del next(spec for spec in plan.todo if spec["path"] == str(hung))["fingerprint"]
        started = time.monotonic()
        with cluster.client() as client:
            report = run_job(client, plan, weighted=True, steal=True, console=Console(file=io.StringIO()))
        row.seconds = time.monotonic() - started
        code = 2 if report["failures"] else 0
        after = write_inputs(root / "in-next", 10, seed=4, prefix="next")
        next_started = time.monotonic()
        next_code = finish(embed(cluster, after, root / "out-next"), timeout=120)
        next_seconds = time.monotonic() - next_started
    check(row, [hung, *inputs], root / "out", code, log, sick=[hung])
    row.healthy_failed = len({f["file"] for f in report["failures"]} - {str(hung)})
    reasons = [a["reason"] for f in report["failures"] for a in f["attempts"]]
    row.notes.append(f"the FIFO failed: {reasons[0][:50] if reasons else 'not reported'}")
    row.notes.append(f"next job: exit {next_code} in {next_seconds:.0f} s")
    row.passed = (bool(reasons) and next_code == 0
                  and not (row.lost or row.corrupted or row.duplicated or row.healthy_failed))
    return row


def stopped_worker(root: Path, files: int = 30) -> Row:
    """One of two workers is stopped (SIGSTOP) for three leases mid-job, then continued."""
    row = Row("worker stopped past its lease")
    inputs = write_inputs(root / "in", files, seed=5)
    log = root / "throughput.jsonl"
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log), *LEASE)
        for n in range(2):
            cluster.start_worker(f"w{n}", "--synthetic-speed", str(SPEED))
        cluster.wait_for_workers(2, "synthetic", timeout=60)
        started = time.monotonic()
        process = embed(cluster, inputs, root / "out")
        time.sleep(2.0)
        victim = cluster.workers["w0"].process
        victim.send_signal(signal.SIGSTOP)
        time.sleep(4.5)
        victim.send_signal(signal.SIGCONT)
        code = finish(process)
        row.seconds = time.monotonic() - started
    check(row, inputs, root / "out", code, log)
    row.passed = code == 0 and not (row.lost or row.corrupted or row.duplicated or row.healthy_failed)
    return row


def full_disk(root: Path, files: int = 40) -> Row:
    """The output directory is a 64 KiB tmpfs: it fills part way through. Exit 0 would be a lie."""
    row = Row("full disk (64 KiB tmpfs)")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        row.notes.append("skipped: mounting a tmpfs needs root")
        row.passed = True
        return row
    inputs = write_inputs(root / "in", files, seed=6)
    out = root / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], check=True)
    try:
        with LocalCluster(root / "logs") as cluster:
            cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"), *LEASE)
            for n in range(2):
                cluster.start_worker(f"w{n}", "--synthetic-speed", str(SPEED * 4))
            cluster.wait_for_workers(2, "synthetic", timeout=60)
            started = time.monotonic()
            code = finish(embed(cluster, inputs, out), timeout=120)
            row.seconds = time.monotonic() - started
        complete = sum(1 for path in inputs if is_complete(output_of(path, out)))
        check(row, inputs, out, code, root / "throughput.jsonl")
        row.healthy_failed = 0  # every file that failed here failed for want of space, not by mistake
        said = (root / "embed-out.log").read_text(errors="replace")
        row.notes.append(f"{complete} of {files} outputs fit; the reason shown: "
                         f"{'yes' if 'No space left' in said else 'no'}; traceback: "
                         f"{'yes' if 'Traceback' in said else 'no'}")
        row.passed = code not in (0, None) and not row.corrupted and "Traceback" not in said
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    return row


def malformed_messages(root: Path, messages: int = 100_000, registrations: int = 10_000) -> Row:
    """An admitted key sends `messages` malformed messages and `registrations` fake workers; then a real job."""
    row = Row("malformed messages + fake registrations")
    rng = random.Random(7)
    log = root / "throughput.jsonl"
    keys = credentials(environment=False)
    assert keys is not None
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(log), *LEASE)
        cluster.start_worker("w0", "--synthetic-speed", str(SPEED * 4))
        cluster.wait_for_workers(1, "synthetic", timeout=60)
        started = time.monotonic()
        answered_garbage = _send_garbage(keys, cluster.address, messages, rng)
        _fake_registrations(keys, cluster.address, registrations)
        with cluster.client(timeout=30) as client:
            # The broker drains what it was sent at its own pace: wait until its counters stop moving.
            previous, deadline = -1, time.monotonic() + 300
            while time.monotonic() < deadline:
                reply = client.request("status")
                counted = sum(reply["status"]["counters"].values())
                if counted == previous:
                    break
                previous = counted
                time.sleep(2.0)
            drained_seconds = time.monotonic() - started
        status_bytes = len(protocol.encode("status_report", status=reply["status"]))
        inputs = write_inputs(root / "in", 10, seed=8)
        code = finish(embed(cluster, inputs, root / "out"), timeout=120)
        rss = broker_pid_rss_mb(cluster)
        with cluster.client(timeout=30) as client:
            answered = sum(client.request("status")["status"]["counters"].values())
        alive = cluster.broker is not None and cluster.broker.process.poll() is None
        row.seconds = time.monotonic() - started
    check(row, inputs, root / "out", code, log)
    row.notes.append(f"{answered_garbage:,} of {messages:,} answered, {answered:,} of them refused as malformed or "
                     f"out of place, in {drained_seconds:.0f} s; status reply {status_bytes / 1e3:.0f} kB; broker RSS {rss:.0f} MB")
    row.passed = (alive and code == 0 and rss < 200 and status_bytes < 1_000_000 and answered_garbage == messages
                  and not (row.lost or row.corrupted or row.duplicated))
    return row


# Malformed messages sent and not yet answered, at most (a hundred per connection); and how long to wait in all.
IN_FLIGHT = 800
GARBAGE_PATIENCE = 300.0


def _send_garbage(keys, address: str, count: int, rng: random.Random) -> int:
    """`count` malformed messages over 8 connections; how many the broker answered (it should answer each)."""
    started = time.monotonic()
    context = zmq.Context()
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(0, 64)),
        # Any type with no fields; `bye` is left out, as the one well-formed message nobody waits an answer to.
        lambda: msgpack.packb({"v": protocol.VERSION, "type": rng.choice([t for t in protocol.SCHEMAS if t != "bye"])}),
        lambda: msgpack.packb({"v": 99, "type": "status"}),
        lambda: msgpack.packb({"v": protocol.VERSION, "type": "submit", "stage": "synthetic", "output_dir": "/",
                               "files": [{"path": "/etc/passwd", "output": "/.bashrc", "sequences": 1,
                                          "residues": 1}], "weighted": True, "steal": True}),
        lambda: msgpack.packb({"v": protocol.VERSION, "type": "done", "task": "x:1", "seconds": -1.0,
                               "sequences": 1, "residues": 1, "skipped": False}),
        lambda: b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion entries
    ]
    sockets = []
    for _ in range(8):
        socket = context.socket(zmq.DEALER)
        keys.apply(socket)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 0)  # keep every answer: they are counted
        socket.connect(address)
        sockets.append(socket)

    def answers(wait_ms: int = 0) -> int:
        got = 0
        for socket in sockets:
            while socket.poll(wait_ms if got == 0 else 0):
                socket.recv()
                got += 1
        return got

    answered = 0
    for n in range(count):
        sockets[n % len(sockets)].send(rng.choice(makers)())
        # At most IN_FLIGHT unanswered: the broker's ROUTER drops replies to a peer that lets a thousand pile up
        # unread (ZeroMQ's high-water mark, which bounds its memory), and on a starved machine the reading here can
        # lag that far; this counts what the broker answers, not what a flooding peer fails to read.
        while n + 1 - answered > IN_FLIGHT and time.monotonic() - started < GARBAGE_PATIENCE:
            answered += answers(wait_ms=100)
    quiet_since = time.monotonic()
    while answered < count and time.monotonic() - quiet_since < 10:  # wait for the last answers
        got = answers(wait_ms=100)
        answered += got
        if got:
            quiet_since = time.monotonic()
    for socket in sockets:
        socket.close()
    context.term()
    return answered


def _fake_registrations(keys, address: str, count: int) -> None:
    """`count` workers that register with long names and are never heard of again, 100 connections at a time
    (each batch's context ends once its messages left, so that file descriptors do not pile up)."""
    for start in range(0, count, 100):
        context = zmq.Context()
        for n in range(start, min(count, start + 100)):
            socket = context.socket(zmq.DEALER)
            keys.apply(socket)
            socket.setsockopt(zmq.LINGER, 2000)
            socket.connect(address)
            socket.send(protocol.encode("register", name=f"fake-{n}-" + "x" * 200, host="nowhere", gpu="NVIDIA H100",
                                        device="cuda:0", stages=["synthetic"], pid=n))
            socket.close()
        context.term()


def another_user(root: Path) -> Row:
    """User `nobody` runs embed against this user's broker: it must get no answer and write nothing."""
    row = Row("another local user submits")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        row.notes.append("skipped: needs root and setpriv")
        row.passed = True
        return row
    nobody = pwd.getpwnam("nobody")
    shared = root / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    os.chmod(root, 0o755)
    target = shared / "out"
    bait = shared / "reads.fa"  # readable by nobody, so embed gets as far as asking the broker
    bait.write_text(">r\nACGT\n")
    with LocalCluster(root / "logs") as cluster:
        cluster.start_broker("--throughput-log", str(root / "throughput.jsonl"), *LEASE)
        cluster.start_worker("w0", "--synthetic-speed", str(SPEED))
        cluster.wait_for_workers(1, "synthetic", timeout=60)
        started = time.monotonic()
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        code = finish(embed(cluster, [bait], target, "--timeout", "5", prefix=prefix,
                            env={"HOME": str(shared), "XDG_STATE_HOME": str(shared / "state")}), timeout=120)
        row.seconds = time.monotonic() - started
        with cluster.client() as client:
            jobs = client.request("status")["status"]["jobs"]
    written = list(target.rglob("*_synthetic.json")) if target.exists() else []
    said = (shared / "embed-out.log").read_text(errors="replace")
    row.files, row.exit = 1, "timeout" if code is None else str(code)
    row.notes.append(f"jobs at the broker: {len(jobs)}; outputs written: {len(written)}; "
                     f"{'no broker answered' if 'no broker answered' in said else said.strip()[-80:]}")
    row.passed = code == 1 and "no broker answered" in said and not jobs and not written
    return row


SCENARIOS: dict[str, Callable[[Path], Row]] = {
    "storm": worker_kill_storm,
    "broker": broker_kills,
    "fifo": hung_read,
    "stopped": stopped_worker,
    "disk": full_disk,
    "fuzz": malformed_messages,
    "user": another_user,
}


def table(rows: Sequence[Row]) -> Table:
    out = Table(title="chaos", title_justify="left")
    for column in ("scenario", "files", "lost", "corrupted", "duplicated", "healthy failed", "exit", "seconds",
                   "target met", "notes"):
        out.add_column(column)
    for r in rows:
        out.add_row(r.scenario, str(r.files), str(r.lost), str(r.corrupted), str(r.duplicated),
                    str(r.healthy_failed), r.exit, f"{r.seconds:.0f}", "yes" if r.passed else "[red]NO[/red]",
                    "; ".join(r.notes))
    return out


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown, for the README's reliability section."""
    lines = ["| scenario | files | lost | corrupted | duplicated | healthy failed | exit | seconds | target met | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.scenario} | {r.files} | {r.lost} | {r.corrupted} | {r.duplicated} | {r.healthy_failed} | "
              f"{r.exit} | {r.seconds:.0f} | {'yes' if r.passed else '**no**'} | {'; '.join(r.notes)} |" for r in rows]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--only", multiple=True, type=click.Choice(list(SCENARIOS)), help="Run only these scenarios.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as Markdown.")
def main(only: tuple[str, ...], json_path: Path | None, markdown_path: Path | None) -> None:
    """Run every fault scenario against real processes and print what survived (exit 1 if a target was missed)."""
    console = Console(width=200)
    rows = []
    for name in only or SCENARIOS:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as scratch:
            console.print(f"[bold]{name}[/bold] ...")
            try:
                row = SCENARIOS[name](Path(scratch))
            except Exception as exc:  # a scenario that breaks the harness is a failed row, not a lost table
                row = Row(name, notes=[f"harness error: {exc!r}"])
            rows.append(row)
            console.print(table([row]))
    console.print(table(rows))
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if markdown_path is not None:
        markdown_path.write_text(markdown(rows))
    raise SystemExit(0 if all(r.passed for r in rows) else 1)


if __name__ == "__main__":
    main()
