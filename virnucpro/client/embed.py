"""The embed client: plan one stage's files, run them as a broker job, show progress, report per worker."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.paths import output_dir_problem
from broker.reports import failure_lines, living_workers
from broker.security import SecurityError
from virnucpro.atomic import write_text_atomically
from virnucpro.client.jobs import JobLost, JobRun
from virnucpro.client.progress import StageProgress
from virnucpro.fingerprint import fingerprint
from virnucpro.pipeline.fasta import FastaError, fasta_stats
from virnucpro.stages import is_complete, output_path
from virnucpro.transfer.fileserver import FileServer, TransferSetupError, start_file_server, sweep

# 0: every output verified complete on disk; 1: an error stopped the job; 2: some files failed (listed with
# their reasons); 3: the job was cancelled (by whom is said).
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL, EXIT_CANCELLED = 0, 1, 2, 3
POLL_SECONDS = 0.25


class EmbedError(RuntimeError):
    """The job could not run; the message says why and what to do."""


@dataclass
class Plan:
    """The files of a job that still need running, and those already done."""

    stage: str
    output_dir: Path
    todo: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)  # what killed workers and clients had left in output_dir


def plan_job(stage: str, files: Sequence[str | Path], output_dir: str | Path) -> Plan:
    """Make the output directory, measure each input and skip those whose output is already complete.

    First removes what killed workers and clients left in the output
    directory (and no live process holds). Raises FastaError naming the
    first bad input, EmbedError for an output directory no worker may write
    in, or OSError, before anything is submitted.
    """
    output_dir = Path(output_dir).resolve()
    problem = output_dir_problem(str(output_dir))
    if problem:
        raise EmbedError(problem)
    check_writable(output_dir)
    plan = Plan(stage=stage, output_dir=output_dir, swept=sweep(output_dir))
    seen: dict[Path, Path] = {}
    for file in files:
        path = Path(file).resolve()
        output = output_path(stage, path, output_dir)
        if output in seen:
            raise EmbedError(f"{path} and {seen[output]} would both write {output}; give inputs distinct names")
        seen[output] = path
        if is_complete(output):
            plan.skipped.append(str(path))
            continue
        before = os.stat(path)  # measured before reading: a change while it is read shows at the worker
        stats = fasta_stats(path)
        plan.todo.append({"path": str(path), "output": str(output), "sequences": stats.sequences,
                          "residues": stats.residues,
                          "fingerprint": fingerprint(before, stats.sequences)})
    return plan


def check_writable(directory: Path) -> None:
    """Make `directory` if need be; EmbedError naming it unless this process can create a file in it.

    Checked before anything is submitted: the workers of one user's cluster
    write there as this user does, and a directory nobody may write in would
    otherwise fail every file on every worker.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise EmbedError(f"{directory}: the output directory is not writable ({exc.strerror or exc}); choose "
                         "another with -o, or make it writable") from None


def wait_for_workers(client: BrokerClient, stage: str, count: int, timeout: float, console: Console) -> None:
    """Block until `count` living workers serve `stage`; EmbedError after `timeout`."""
    deadline = time.monotonic() + timeout
    status = client.wait_until_up(timeout)
    announced = False
    while True:
        ready = living_workers(status, stage)
        if ready >= count:
            return
        if time.monotonic() >= deadline:
            raise EmbedError(
                f"only {ready} of {count} {stage} workers registered with the broker at {client.address} "
                f"within {timeout:g} s; start more with `virnucpro worker --broker {client.address}`"
            )
        if not announced:
            console.print(f"waiting for {count} {stage} workers ({ready} registered)")
            announced = True
        time.sleep(POLL_SECONDS)
        status = client.request("status")["status"]


def run_job(
    client: BrokerClient,
    plan: Plan,
    *,
    weighted: bool,
    steal: bool,
    console: Console,
    label: str | None = None,
    transfer: str = "auto",
    transfer_address: str | None = None,
    backup: bool = True,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Submit the plan (in chunks), show progress until it ends, and return the broker's report.

    `backup`: with `steal`, let idle workers run backup copies of straggling files. `timeout`: the longest
    wait, in seconds, for a broker that went silent.

    If the broker restarts mid-job (it forgets the job), what is still
    missing on disk is submitted again. Unless `transfer` is "never", a file
    server runs meanwhile for workers that cannot see this machine's files
    (virnucpro.transfer).
    """
    with file_server(client, plan.output_dir, transfer, transfer_address) as server:
        run = JobRun(client, plan.stage, plan.output_dir, weighted=weighted, steal=steal, backup=backup, server=server,
                     on_resubmit=resubmit_notice(console, plan.stage), timeout=timeout)
        try:
            run.submit(plan.todo)
            with StageProgress(console) as progress:
                while True:
                    progress.update(label or plan.stage, run.poll())
                    if run.report is not None:
                        break
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            run.cancel()
            raise
        if server is not None and server.summary():
            console.print(server.summary(), markup=False)
        return run.report


def resubmit_notice(console: Console, stage: str) -> Callable[[str | None], None]:
    """What a JobRun calls when the broker lost its job: say what became of it."""

    def notice(job: str | None) -> None:
        if job is None:
            console.print(f"[yellow]the broker lost the {stage} job (restarted?); every output is complete on disk, "
                          "so the job is finished here[/yellow]")
        else:
            console.print(f"[yellow]the broker lost the {stage} job (restarted?); submitted what is not done yet as "
                          f"{job}[/yellow]")

    return notice


@contextmanager
def file_server(client: BrokerClient, output_dir: Path, transfer: str,
                address: str | None) -> Iterator[FileServer | None]:
    """While open, a file server for one job's files (None with --transfer never); EmbedError if it cannot start."""
    try:
        # Without --insecure the file server lets in only the keys the broker admits as workers.
        workers = client.request("keys")["keys"] if client.credentials is not None and transfer != "never" else None
        server = start_file_server(client.address, workers, output_dir, transfer, address)
    except TransferSetupError as exc:
        raise EmbedError(str(exc)) from None
    if server is None:
        yield None
        return
    with server:
        yield server


def make_console() -> Console:
    """Rich output on stderr; 120 columns when it goes to a file, so the tables stay whole."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def worker_table(report: dict[str, Any], title: str) -> Table:
    """Per worker: GPU, predicted vs observed weight, files, throughput, steals."""
    table = Table(title=title, title_justify="left")
    for column in ("worker", "gpu", "predicted", "observed", "files", "stolen", "residues", "busy s", "residues/s"):
        table.add_column(column, justify="left" if column in ("worker", "gpu") else "right")
    for row in report["workers"]:
        observed = row["observed_weight"]
        table.add_row(row["worker"], row["gpu"], f"{row['predicted_weight']:.2f}",
                      "n/a" if observed is None else f"{observed:.2f}", str(row["files"]),
                      str(row["stolen_files"]), f"{row['residues']:,}", f"{row['busy_seconds']:.1f}",
                      f"{row['residues_per_s']:,.0f}")
    return table


def unverified(plan: Plan, report: dict[str, Any]) -> list[dict[str, Any]]:
    """A failure, in the report's form, for each file that did not fail but lacks a complete output on disk.

    What the broker counts done is checked here: a worker that said `done`
    without writing, or an output removed or damaged since, is not done.
    """
    failed = {failure["file"] for failure in report.get("failures", [])}
    return [{"file": spec["path"], "attempts": [{
        "worker": "client", "reason": f"the job ended without this file failing, but {spec['output']} is not a "
                                      "complete output on disk"}]}
            for spec in plan.todo if spec["path"] not in failed and not is_complete(spec["output"])]


def print_failures(console: Console, failures: Sequence[tuple[str, Sequence[str]]]) -> None:
    """The failed files, each with the reason of every attempt, one per line and never wrapped."""
    if not failures:
        return
    console.print(f"[red]{len(failures)} files failed[/red]; the reason of each attempt:")
    for file, reasons in failures:
        console.print(f"  {file}", markup=False, soft_wrap=True)
        for reason in reasons:
            console.print(f"      {' '.join(reason.split())}", markup=False, soft_wrap=True)


def cancelled_line(stage: str, report: dict[str, Any], missing: int, files: int) -> str:
    """What a client says of a job that was cancelled, and by whom."""
    return (f"the {stage} job {report['job']} was cancelled by {report.get('cancelled_by') or 'an unknown client'}; "
            f"{missing} of {files} outputs are missing; rerun the same command to finish them")


def summary_line(report: dict[str, Any]) -> str:
    line = f"makespan {report['makespan']:.1f} s, {report['steals']} steals"
    if report.get("backups"):
        line += (f", {report['backups']} backup copies ({report['backups_won']} finished first, "
                 f"{report['wasted_seconds']:.1f} s wasted)")
    if report.get("lower_bound"):
        line += f", lower bound {report['lower_bound']:.1f} s (ratio {report['makespan'] / report['lower_bound']:.2f})"
    return line


def write_report(plan: Plan, report: dict[str, Any] | None, address: str) -> Path:
    """run_report.json in the output directory, written atomically.

    For the embedding stages, `precision` counts the files this job wrote in
    each precision (bf16, fp32), as each feature file records it.
    """
    document: dict[str, Any] = {"address": address, "stage": plan.stage, "output_dir": str(plan.output_dir),
                                "skipped_complete": len(plan.skipped)}
    outputs = [Path(f["output"]) for f in plan.todo]
    if outputs and all(path.suffix == ".pt" for path in outputs):
        from virnucpro.pipeline.features import count_precisions

        document["precision"] = count_precisions(outputs)
    document.update(report or {})
    return write_text_atomically(plan.output_dir / "run_report.json", json.dumps(document, indent=2) + "\n")


def embed(
    address: str,
    stage: str,
    files: Sequence[str | Path],
    output_dir: str | Path,
    *,
    weighted: bool = False,
    steal: bool = False,
    backup: bool = True,
    min_workers: int = 1,
    timeout: float = 600.0,
    transfer: str = "auto",
    transfer_address: str | None = None,
    insecure: bool = False,
    console: Console | None = None,
) -> int:
    """The `virnucpro embed` command; returns its exit code."""
    console = console or make_console()
    try:
        plan = plan_job(stage, files, output_dir)
    except (FastaError, EmbedError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_ERROR
    if plan.swept:
        console.print(f"removed {len(plan.swept)} temporary files or directories that killed workers or clients "
                      f"had left in {plan.output_dir}", markup=False)
    if plan.skipped:
        console.print(f"{len(plan.skipped)} of {len(files)} files already have complete outputs; skipped")
    report: dict[str, Any] | None = None
    if plan.todo:
        try:
            with BrokerClient(address, insecure=insecure) as client:
                wait_for_workers(client, stage, min_workers, timeout, console)
                report = run_job(client, plan, weighted=weighted, steal=steal, backup=backup, console=console, transfer=transfer,
                                 transfer_address=transfer_address, timeout=timeout)
        except (BrokerUnreachable, BrokerError, EmbedError, JobLost, SecurityError, OSError) as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            return EXIT_ERROR
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: job cancelled; finished outputs are kept, rerun to continue")
            return 130
        console.print(worker_table(report, f"{stage}: per-worker throughput"))
        console.print(summary_line(report))
        if report.get("finished_here"):
            console.print(report["finished_here"], markup=False)
        if report["state"] == "cancelled":
            missing = sum(not is_complete(spec["output"]) for spec in plan.todo)
            console.print(f"[red]cancelled:[/red] {escape(cancelled_line(stage, report, missing, len(plan.todo)))}")
            report_written(plan, report, address, console)
            return EXIT_CANCELLED
        lacking = unverified(plan, report)
        if lacking:
            report = {**report, "failures": report["failures"] + lacking, "done": report["done"] - len(lacking),
                      "failed": report["failed"] + len(lacking)}
    failures = (report or {}).get("failures", [])
    print_failures(console, [(failure["file"], failure_lines(failure)) for failure in failures])
    written = report_written(plan, report, address, console)
    return EXIT_PARTIAL if failures else EXIT_OK if written else EXIT_ERROR


def report_written(plan: Plan, report: dict[str, Any] | None, address: str, console: Console) -> bool:
    """Write run_report.json and say where; if it cannot be written (a full disk), say why instead."""
    try:
        path = write_report(plan, report, address)
    except OSError as exc:
        console.print(f"[red]error:[/red] {escape(str(plan.output_dir / 'run_report.json'))} could not be written "
                      f"({escape(exc.strerror or str(exc))}); free space or fix the directory, then rerun the same "
                      "command: complete outputs are kept")
        return False
    console.print(f"report: {path}")
    return True
