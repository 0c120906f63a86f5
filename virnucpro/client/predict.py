"""The `virnucpro predict` command: split a sample, embed and classify it through the broker, assemble.

Orchestration only: the stages themselves live in the pipeline modules and
the broker's workers, the run directory in run_dir, and where the jobs run in
session. The DNABERT-S and ESM-2 jobs are submitted together (they are
independent, so a worker goes on to ESM-2 files the moment its DNABERT-S
queue is empty); a classify job is opened beside them, file pair k is added
to it as soon as both of its feature files exist, and it is sealed once both
embedding jobs have ended. Pairs are thus classified by the workers while
others are still being embedded; the prediction files are assembled from
the per-pair files, in order of k, at the end.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from virnucpro.client.embed import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    POLL_SECONDS,
    EmbedError,
    Plan,
    cancelled_line,
    check_writable,
    file_server,
    make_console,
    print_failures,
    resubmit_notice,
    summary_line,
    wait_for_workers,
    worker_table,
    write_report,
)
from virnucpro.client.jobs import JobLost, JobRun
from virnucpro.client.options import PredictError, PredictOptions, check_options
from virnucpro.client.progress import StageProgress
from virnucpro.client.run_dir import (
    CLASSIFY_DIR,
    FAILED_FILES_NAME,
    MERGED_DIR,
    ClassifyPlan,
    Split,
    classified,
    classify_spec,
    failed_rows,
    feature_paths,
    holds_run,
    plan_classify,
    plan_stages,
    split_input,
    write_failed_files,
    write_summary,
)
from virnucpro.client.session import broker_session, check_precision, local_devices, sigterm_as_interrupt
from virnucpro.pipeline.classifier import ClassifierCheckpointError, load_classifier_with_digest
from virnucpro.pipeline.features import save_features
from virnucpro.pipeline.merge import merge_features, merged_path
from virnucpro.pipeline.outputs import PredictionOutputs, assemble_predictions
from virnucpro.pipeline.sequences import FilePair
from virnucpro.stages import is_complete

EXIT_INTERRUPTED = 130
TINY_NOTICE = ("[yellow]note:[/yellow] --models tiny runs small random networks: these predictions mean nothing "
               "biologically; they only show that the pipeline runs")


@dataclass(frozen=True)
class Classifier:
    """The checkpoint every pair is classified with: where the workers read it, and its digest."""

    path: Path
    sha256: str

    def wire(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def open_classifier(options: PredictOptions) -> Classifier:
    """The classifier the run ends with, loaded now so that a wrong checkpoint fails before any work."""
    path = options.model_path
    if path is None:
        if options.models == "tiny":
            from virnucpro.backends.loading import model_paths

            path = model_paths("tiny", options.dnabert_model, options.esm_model)["classifier"]
        else:
            path = Path(f"{options.expected_length}_model.pth")
            if not path.is_file():
                raise PredictError(
                    f"{path}: not found in the current directory ({Path.cwd()}); download it from "
                    "https://github.com/Li-Jing-1997/VirNucPro or pass --model-path PATH"
                )
    try:
        _, sha256 = load_classifier_with_digest(path)
    except ClassifierCheckpointError as exc:
        raise PredictError(str(exc)) from None
    return Classifier(Path(path).resolve(), sha256)


# ------------------------------------------------------------------ jobs


@dataclass
class Times:
    """When each part of the run began and ended, on the monotonic clock."""

    started: float
    split: float = 0.0  # seconds
    submitted: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    jobs_began: float | None = None  # when the first job was submitted (or would have been)

    def last_embedding(self) -> float:
        """When the last embedding job ended; with none run, when the jobs began."""
        ends = [self.ended[stage] for stage in ("dnabert", "esm") if stage in self.ended]
        return max(ends) if ends else self.jobs_began if self.jobs_began is not None else self.started


class PredictJobs:
    """The jobs of one run at the broker: both embeddings at once, and classify fed as file pairs become ready."""

    def __init__(self, client: BrokerClient, plans: Sequence[Plan], classify: ClassifyPlan, classifier: Classifier,
                 work_dir: Path, options: PredictOptions, console: Console, times: Times,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.plans = [plan for plan in plans if plan.todo]
        self.classify_plan = classify
        self.classifier = classifier
        self.work_dir = work_dir
        self.options = options
        self.console = console
        self.times = times
        self.clock = clock
        self.embeddings: dict[str, JobRun] = {}
        self.classify: JobRun | None = None
        self.waiting: list[FilePair] = list(classify.todo)  # pairs to classify, not yet added
        self._ended_seen = -1

    def runs(self) -> list[JobRun]:
        return [*self.embeddings.values(), *([self.classify] if self.classify is not None else [])]

    def run(self) -> None:
        """Submit the jobs and follow them until the last has ended; Ctrl-C cancels them."""
        stages = [plan.stage for plan in self.plans] + (["classify"] if self.waiting else [])
        for stage in stages:
            wait_for_workers(self.client, stage, 1, self.options.timeout, self.console)
        self.times.jobs_began = self.clock()
        with ExitStack() as servers:
            self._run(servers)

    def _run(self, servers: ExitStack) -> None:
        try:
            for plan in self.plans:
                run = self._job_run(plan.stage, plan.output_dir, servers)
                run.submit(plan.todo)
                self.embeddings[plan.stage] = run
                self.times.submitted[plan.stage] = self.clock()
            if self.waiting:
                self.classify = self._job_run("classify", self.work_dir.resolve() / CLASSIFY_DIR, servers,
                                              classifier=self.classifier.wire())
                self.classify.submit([classify_spec(pair, self.work_dir) for pair in self._take_ready()], open=True)
                self.times.submitted["classify"] = self.clock()
            self.console.print("jobs: " + ", ".join(f"{run.stage} {run.job}" for run in self.runs()), markup=False)
            with StageProgress(self.console) as progress:
                while not self._step(progress):
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            for run in self.runs():
                run.cancel()
            raise

    def _job_run(self, stage: str, output_dir: Path, servers: ExitStack,
                 classifier: dict[str, str] | None = None) -> JobRun:
        """A job of `stage`, with a file server (open until `servers` closes) unless --transfer never."""
        server = servers.enter_context(file_server(self.client, output_dir, self.options.transfer,
                                                   self.options.transfer_address))

        return JobRun(self.client, stage, output_dir, weighted=self.options.weighted, steal=self.options.steal,
                      backup=self.options.backup, classifier=classifier, server=server,
                      on_resubmit=resubmit_notice(self.console, stage), timeout=self.options.timeout)

    def _step(self, progress: StageProgress) -> bool:
        """Poll every job once, feed the classify job, show progress; True once every job has ended."""
        ended = 0
        for stage, run in self.embeddings.items():
            figures = run.poll()
            progress.update(stage, figures)
            ended += figures.done + figures.failed
            if run.report is not None and stage not in self.times.ended:
                self.times.ended[stage] = self.clock()
                self._show_report(run)
        embedded = all(run.ended for run in self.embeddings.values())
        if self.classify is not None and not self.classify.sealed:
            if ended != self._ended_seen or embedded:
                self._ended_seen = ended
                ready = self._take_ready()
                if ready:
                    self.classify.add([classify_spec(pair, self.work_dir) for pair in ready])
            if embedded:
                self.classify.seal()
        if self.classify is not None:
            # Pairs still waiting for their embeddings count in the totals: the line shows the whole stage.
            figures = self.classify.poll()
            progress.update("classify", replace(figures, files=figures.files + len(self.waiting),
                                                amount=figures.amount + sum(p.sequences for p in self.waiting)),
                            unit="frames")
            if self.classify.ended and "classify" not in self.times.ended:
                self.times.ended["classify"] = self.clock()
                self._show_transfers(self.classify)
        return embedded and (self.classify is None or self.classify.ended)

    def _take_ready(self) -> list[FilePair]:
        """The waiting pairs whose two feature files exist now (in the run directory, existing means whole)."""
        ready = [pair for pair in self.waiting if all(path.exists() for path in feature_paths(pair, self.work_dir))]
        if ready:
            taken = {pair.index for pair in ready}
            self.waiting = [pair for pair in self.waiting if pair.index not in taken]
        return ready

    def _show_report(self, run: JobRun) -> None:
        assert run.report is not None
        self.console.print(worker_table(run.report, f"{run.stage}: per-worker throughput (predicted vs observed "
                                                    "weight)"))
        line = summary_line(run.report)
        if len(self.embeddings) > 1:
            line += " (both embedding jobs were submitted together: each makespan includes the other's files)"
        self.console.print(line, markup=False)
        self._show_transfers(run)

    def _show_transfers(self, run: JobRun) -> None:
        if run.server is not None and run.server.summary():
            self.console.print(f"{run.stage} {run.server.summary()}", markup=False)

    def write_reports(self) -> None:
        """Each job's run_report.json in its output directory."""
        for plan in self.plans:
            write_report(plan, self.embeddings[plan.stage].report, self.client.address)
        if self.classify is not None:
            plan = Plan("classify", self.classify.output_dir, todo=self.classify.files,
                        skipped=[classify_spec(pair, self.work_dir)["path"] for pair in self.classify_plan.reused])
            write_report(plan, self.classify.report, self.client.address)

    def failures(self) -> dict[str, str]:
        """Every failed file of every job, with its reasons."""
        reasons: dict[str, str] = {}
        for run in self.runs():
            reasons.update(run.failures())
        return reasons

    def cancelled(self) -> list[str]:
        """For each job that was cancelled, what a client says of it (by whom, what is missing)."""
        lines = []
        for run in self.runs():
            if run.report is not None and run.report["state"] == "cancelled":
                missing = sum(not is_complete(spec["output"]) for spec in run.files)
                lines.append(cancelled_line(run.stage, run.report, missing, len(run.files)))
        return lines

    def job_ids(self) -> dict[str, list[str]]:
        return {run.stage: run.ids for run in self.runs()}


# --------------------------------------------------------------- results


def keep_features(pairs: Sequence[FilePair], work_dir: Path, console: Console) -> None:
    """--keep-features: the merged features of every pair with both feature files, written here, pair by pair."""
    (work_dir / MERGED_DIR).mkdir(exist_ok=True)
    written = 0
    for pair in pairs:
        target = merged_path(work_dir / MERGED_DIR, pair.index)
        dnabert, esm = feature_paths(pair, work_dir)
        if target.exists() or not (dnabert.exists() and esm.exists()):
            continue
        merged = merge_features(dnabert, esm)
        save_features(target, "merged", merged.ids, merged.data, merged.precision)
        written += 1
    if written:
        console.print(f"--keep-features: merged features of {written} file pairs in {work_dir / MERGED_DIR}",
                      markup=False)


def summary(options: PredictOptions, split: Split, classifier: Classifier, times: Times, now: float,
            jobs: dict[str, list[str]], rows: Sequence[tuple[str, str, str]], written: PredictionOutputs | None,
            exit_status: int) -> dict[str, Any]:
    """What summary.json holds: the input, the options, the counts, where the time went, the jobs, the failures."""
    def seconds(stage: str) -> float:
        if stage not in times.submitted or stage not in times.ended:
            return 0.0
        return round(times.ended[stage] - times.submitted[stage], 3)

    chosen = {name: str(value) if isinstance(value, Path) else value for name, value in vars(options).items()
              if name not in ("input_fasta", "output_dir")}
    return {
        "input": str(options.input_fasta.resolve()),
        "output_dir": str(options.output_dir.resolve()),
        "options": chosen,
        "classifier": {"path": str(classifier.path), "sha256": classifier.sha256},
        "reads": split.reads,
        "frames": split.frames,
        "file_pairs": len(split.pairs),
        "stage_seconds": {
            "split": round(times.split, 3),
            "dnabert": seconds("dnabert"),
            "esm": seconds("esm"),
            # From the end of the last embedding job to the predictions written: what classification adds.
            "classify": round(now - times.last_embedding(), 3),
            "total": round(now - times.started, 3),
        },
        "jobs": jobs,
        "predictions": None if written is None else {"frames": written.frames, "chunks": written.chunks},
        "failures": [{"stage": stage, "file": file, "reasons": reasons} for stage, file, reasons in rows],
        "exit_status": exit_status,
    }


# ---------------------------------------------------------------- command


def predict(options: PredictOptions, console: Console | None = None) -> int:
    """The `virnucpro predict` command; its exit code: 0 every output verified, 1 error, 2 some files failed,
    3 a job was cancelled, 130 interrupted."""
    console = console or make_console()
    times = Times(time.monotonic())
    output_dir = options.output_dir
    work_dir = output_dir / "work"
    if options.models == "tiny":
        console.print(TINY_NOTICE)
    created = [d for d in (output_dir, work_dir) if not d.exists()]
    split: Split | None = None
    classifier: Classifier | None = None
    jobs: PredictJobs | None = None
    rows: list[tuple[str, str, str]] = []
    written: PredictionOutputs | None = None
    status = EXIT_ERROR
    with sigterm_as_interrupt():
        try:
            check_options(options)
            devices = local_devices(options) if options.broker is None else []
            check_precision(options, devices)
            classifier = open_classifier(options)
            if holds_run(output_dir) and not options.resume:
                raise PredictError(f"{output_dir}: already holds a virnucpro run; pass --resume to continue it, "
                                   "or choose another output directory with -o")
            if options.resume and not holds_run(output_dir):
                console.print(f"{output_dir} holds no earlier run to resume; starting a new one", markup=False)
            check_writable(output_dir.resolve())
            try:
                split = split_input(options, work_dir, console)
            except ValueError:
                # Bad input (FastaError) leaves nothing behind: remove the directories this run created.
                if created:
                    shutil.rmtree(created[0], ignore_errors=True)
                raise
            times.split = time.monotonic() - times.started
            plans = plan_stages(split.pairs, work_dir, console)
            classify_plan = plan_classify(split.pairs, work_dir, classifier.sha256, console)
            if any(plan.todo for plan in plans) or classify_plan.todo:
                with broker_session(options, devices, work_dir, console) as client:
                    jobs = PredictJobs(client, plans, classify_plan, classifier, work_dir, options, console, times)
                    jobs.run()
                    jobs.write_reports()
            rows = failed_rows(split.pairs, work_dir, jobs.failures() if jobs else {}, classifier.sha256)
            write_failed_files(output_dir, rows)
            done = [pair for pair in split.pairs if classified(pair, work_dir, classifier.sha256)]
            written = assemble_predictions([classify_spec(pair, work_dir)["output"] for pair in done], output_dir)
            if options.keep_features:
                keep_features(split.pairs, work_dir, console)
            cancelled = jobs.cancelled() if jobs else []
            for line in cancelled:
                console.print(f"[red]cancelled:[/red] {escape(line)}")
            status = EXIT_CANCELLED if cancelled else EXIT_PARTIAL if rows else EXIT_OK
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/yellow] finished outputs are kept; rerun the same command with "
                          "--resume to continue")
            status = EXIT_INTERRUPTED
        except (PredictError, ValueError, EmbedError, JobLost, BrokerError, BrokerUnreachable, OSError) as exc:
            # ValueError covers the input's (FastaError), the feature files' and the outputs' errors.
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            if split is not None:
                console.print(f"finished outputs are kept in {work_dir}; once this is fixed, rerun the same "
                              "command with --resume to continue", markup=False)
            status = EXIT_ERROR
        finally:
            if split is not None and classifier is not None:
                try:
                    write_summary(output_dir, summary(options, split, classifier, times, time.monotonic(),
                                                      jobs.job_ids() if jobs else {}, rows, written, status))
                except OSError as exc:
                    console.print(f"[yellow]warning:[/yellow] {escape(str(output_dir))}/summary.json could not be "
                                  f"written ({escape(exc.strerror or str(exc))})")
    if status not in (EXIT_OK, EXIT_PARTIAL, EXIT_CANCELLED):
        return status
    assert split is not None and written is not None
    console.print(f"predictions: {written.results} ({written.frames:,} frames), "
                  f"{written.highestscore} ({written.chunks:,} chunks)", markup=False)
    if rows:
        print_failures(console, [(f"{stage} {file}", reasons.split("; ")) for stage, file, reasons in rows])
        listing = escape(str(output_dir / FAILED_FILES_NAME))
        console.print(f"[red]{len(rows)} files failed[/red] (listed with reasons in {listing}); the predictions "
                      f"cover the {len(done)} of {len(split.pairs)} file pairs that were classified; rerun with "
                      "--resume to retry them")
    console.print(f"summary: {output_dir / 'summary.json'}", markup=False)
    return status

