"""The `virnucpro predict` command: split a sample, embed it through the broker, merge, classify.

Orchestration only: the stages themselves live in sequences, embed (through
the broker), merge and outputs. Without --broker this command starts a broker
and its workers on this machine and owns them: they are stopped when it ends,
however it ends, and die with it if it is killed.

Everything under OUT/work is the run's state. A finished output is published
atomically and checked before it is reused, so a rerun with --resume
continues after any interruption and recomputes nothing that finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.server import default_log_path
from virnucpro.atomic import write_text_atomically
from virnucpro.classifier import ClassifierCheckpointError, MLPClassifier, load_classifier
from virnucpro.embed import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    EmbedError,
    make_console,
    Plan,
    plan_job,
    run_job,
    summary_line,
    wait_for_workers,
    worker_table,
    write_report,
)
from virnucpro.merge import merge_files, merged_path
from virnucpro.outputs import RESULTS_NAME, write_predictions
from virnucpro.pipeline.gpu_weights import WeightFileError, load_weight_table
from virnucpro.sequences import EXPECTED_LENGTHS, FilePair, split_into_files
from virnucpro.local import LocalCluster
from virnucpro.stages import is_complete, output_path

EXIT_INTERRUPTED = 130
FAILED_FILES_NAME = "failed_files.txt"
MANIFEST_NAME = "split.json"
TINY_NOTICE = ("[yellow]note:[/yellow] --models tiny runs small random networks: these predictions mean nothing "
               "biologically; they only show that the pipeline runs")

# Stage, the split's subdirectory it reads, and the work subdirectory it writes.
STAGE_DIRS = (("dnabert", "nucleotide", "dnabert"), ("esm", "protein", "esm"))

# Without --sequences-per-file, files are sized so that a sample makes about this
# many (a shorter tail when workers steal), never more than the original's 10,000
# sequences and never so few that per-file overhead dominates.
AUTO_FILES_PER_SAMPLE = 32
MIN_AUTO_SEQUENCES_PER_FILE = 50
MAX_SEQUENCES_PER_FILE = 10000
GZIP_RATIO = 4  # a gzipped FASTA is about a quarter of its text

CLIENT_TIMEOUT = 5.0


class PredictError(RuntimeError):
    """The run cannot go on; the message names the file or option and what to do."""


@dataclass
class PredictOptions:
    """What `virnucpro predict` was asked to do."""

    input_fasta: Path
    output_dir: Path
    expected_length: int = 500
    model_path: Path | None = None
    models: str = "virnucpro"
    dnabert_model: str | None = None
    esm_model: str | None = None
    weighted: bool = False
    steal: bool = False
    broker: str | None = None
    gpus: tuple[int, ...] | None = None
    workers: int | None = None
    gpu_weights: Path | None = None
    throughput_log: Path | None = None
    worker_timeout: float | None = None
    sequences_per_file: int | None = None
    resume: bool = False
    timeout: float = 600.0


# ---------------------------------------------------------------- checks


def check_options(options: PredictOptions) -> None:
    """Reject contradictory options before anything is read or started."""
    if options.expected_length not in EXPECTED_LENGTHS:
        raise PredictError(f"--expected-length {options.expected_length}: must be 300 or 500, the chunk lengths "
                           "the published classifiers were trained on")
    if options.broker is not None:
        local_only = {"--gpus": options.gpus, "--workers": options.workers, "--gpu-weights": options.gpu_weights,
                      "--throughput-log": options.throughput_log, "--worker-timeout": options.worker_timeout,
                      "--dnabert-model": options.dnabert_model, "--esm-model": options.esm_model}
        given = [name for name, value in local_only.items() if value is not None]
        if given:
            raise PredictError(f"{', '.join(given)} configure the broker and workers this command starts; with "
                               "--broker ADDR set them where that broker and its workers run")
    if options.gpus is not None and options.workers is not None:
        raise PredictError("give --gpus (one worker per GPU) or --workers N (CPU workers), not both")
    if options.gpu_weights is not None:
        try:
            load_weight_table(options.gpu_weights)
        except WeightFileError as exc:
            raise PredictError(str(exc)) from None
    path = options.input_fasta
    if not path.exists():
        raise PredictError(f"{path}: file not found; check the path of the input FASTA")
    if not path.is_file():
        raise PredictError(f"{path}: is not a file; give the input FASTA")


def open_classifier(options: PredictOptions) -> MLPClassifier:
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
        return load_classifier(path)
    except ClassifierCheckpointError as exc:
        raise PredictError(str(exc)) from None


def holds_run(output_dir: Path) -> bool:
    """True if `output_dir` has the work or the results of an earlier run."""
    return (output_dir / "work").exists() or (output_dir / RESULTS_NAME).exists()


# ------------------------------------------------------------------ split


def auto_sequences_per_file(input_fasta: Path, expected_length: int) -> int:
    """A file size from the input's size alone.

    Never from the worker count: embeddings are batched within a file, so the
    file size must not change with the hardware for outputs to stay the same.
    A chunk of C bases keeps about one frame, so the text size over C
    estimates the frames.
    """
    size = input_fasta.stat().st_size
    with open(input_fasta, "rb") as handle:
        if handle.read(2) == b"\x1f\x8b":
            size *= GZIP_RATIO
    frames = size // expected_length
    return min(MAX_SEQUENCES_PER_FILE, max(MIN_AUTO_SEQUENCES_PER_FILE, -(-frames // AUTO_FILES_PER_SAMPLE)))


def _split_identity(options: PredictOptions, sequences_per_file: int) -> dict[str, Any]:
    """What the split and its embeddings depend on; a resume must match it."""
    stat = options.input_fasta.stat()
    return {"input": str(options.input_fasta.resolve()), "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns, "expected_length": options.expected_length,
            "sequences_per_file": sequences_per_file, "models": options.models,
            "dnabert_model": options.dnabert_model, "esm_model": options.esm_model}


def split_input(options: PredictOptions, work_dir: Path, console: Console) -> list[FilePair]:
    """The paired files of the run: split now, or on --resume those of the earlier split if it finished.

    The split counts as finished only once its manifest (work/split.json,
    written atomically after the last file) exists: the split writes no
    manifest until then, and the embeddings start only after it.
    """
    manifest_path = work_dir / MANIFEST_NAME
    if options.resume and manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        wanted = _split_identity(options, options.sequences_per_file or manifest["sequences_per_file"])
        changed = [key for key, value in wanted.items() if manifest.get(key) != value]
        if changed:
            raise PredictError(
                f"{manifest_path}: the run there was started with other "
                + ", ".join(f"{key} ({manifest.get(key)!r}, now {wanted[key]!r})" for key in changed)
                + "; resume with the same input and options, or start a new run with another -o"
            )
        pairs = [FilePair(p["index"], work_dir / p["nucleotide"], work_dir / p["protein"], p["sequences"])
                 for p in manifest["files"]]
        if all(p.nucleotide.is_file() and p.protein.is_file() for p in pairs):
            console.print(f"split: reusing the {len(pairs)} file pairs of {manifest_path}", markup=False)
            return pairs
        console.print(f"split: files listed in {manifest_path} are missing; splitting again", markup=False)
    sequences_per_file = options.sequences_per_file or auto_sequences_per_file(
        options.input_fasta, options.expected_length)
    identity = _split_identity(options, sequences_per_file)
    manifest_path.unlink(missing_ok=True)
    pairs = split_into_files(options.input_fasta, work_dir, options.expected_length, sequences_per_file)
    files = [{"index": p.index, "nucleotide": str(p.nucleotide.relative_to(work_dir)),
              "protein": str(p.protein.relative_to(work_dir)), "sequences": p.sequences} for p in pairs]
    write_text_atomically(manifest_path, json.dumps({**identity, "files": files}, indent=2) + "\n")
    console.print(f"split: {sum(p.sequences for p in pairs):,} frames into {len(pairs)} file pairs "
                  f"of up to {sequences_per_file:,} sequences", markup=False)
    return pairs


def _read_manifest(path: Path) -> dict[str, Any]:
    """The split manifest of an earlier run; PredictError if it cannot be used."""
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise PredictError(f"{path}: not a readable split manifest ({exc}); start a new run with another -o") from None
    if not isinstance(manifest, dict) or not {"sequences_per_file", "files"} <= manifest.keys():
        raise PredictError(f"{path}: lacks the list of split files; start a new run with another -o")
    return manifest


# --------------------------------------------------- broker and workers here


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
    return models


class WatchedClient(BrokerClient):
    """A broker client that gives up at once when the local processes can no longer finish the job.

    run_job and wait_for_workers poll through `request`; raising here ends
    them as promptly as a broker error would, instead of waiting forever
    for workers that are gone.
    """

    def __init__(self, cluster: LocalCluster, timeout: float) -> None:
        super().__init__(cluster.address, timeout, curve=cluster.curve)
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
        with BrokerClient(options.broker, CLIENT_TIMEOUT) as client:
            console.print(f"broker: {options.broker}, with the workers that serve it", markup=False)
            yield client
        return
    threads = max(1, _cores() // len(devices))
    cluster = LocalCluster(work_dir / "logs")
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
        with WatchedClient(cluster, CLIENT_TIMEOUT) as client:
            for stage, _, _ in STAGE_DIRS:
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
def _sigterm_as_interrupt() -> Iterator[None]:
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


# ----------------------------------------------------------------- stages


def plan_stages(pairs: Sequence[FilePair], work_dir: Path, console: Console) -> list[Plan]:
    """Each stage's files that still lack a complete output."""
    plans = []
    for stage, input_subdir, output_subdir in STAGE_DIRS:
        (work_dir / output_subdir).mkdir(parents=True, exist_ok=True)
        inputs = [p.nucleotide if input_subdir == "nucleotide" else p.protein for p in pairs]
        plan = plan_job(stage, inputs, work_dir / output_subdir)
        if plan.skipped:
            console.print(f"{stage}: {len(plan.skipped)} of {len(inputs)} files already embedded; skipped")
        plans.append(plan)
    return plans


def embed_stages(client: BrokerClient, plans: Sequence[Plan], options: PredictOptions,
                 console: Console) -> dict[str, str]:
    """Run each stage's plan as a broker job; the inputs that failed, with their reasons."""
    failures: dict[str, str] = {}
    for plan in plans:
        if not plan.todo:
            continue
        wait_for_workers(client, plan.stage, 1, options.timeout, console)
        report = run_job(client, plan, weighted=options.weighted, steal=options.steal, console=console,
                         label=plan.stage)
        console.print(worker_table(report, f"{plan.stage}: per-worker throughput (predicted vs observed weight)"))
        console.print(summary_line(report))
        write_report(plan, report, client.address)
        for failure in report["failures"]:
            failures[failure["file"]] = "; ".join(f"{a['worker']}: {a['reason']}" for a in failure["attempts"])
    return failures


def write_failed_files(output_dir: Path, pairs: Sequence[FilePair], work_dir: Path,
                       reasons: dict[str, str]) -> list[str]:
    """OUT/failed_files.txt: every input whose output is missing after the run, and why; removed when none is."""
    rows = []
    for stage, input_subdir, output_subdir in STAGE_DIRS:
        for pair in pairs:
            source = (pair.nucleotide if input_subdir == "nucleotide" else pair.protein).resolve()
            if not is_complete(output_path(stage, source, work_dir / output_subdir)):
                reason = reasons.get(str(source), "no output after the job; rerun with --resume")
                rows.append(f"{stage}\t{source}\t{' '.join(reason.split())}")
    path = output_dir / FAILED_FILES_NAME
    if rows:
        write_text_atomically(path, "stage\tfile\treasons\n" + "\n".join(rows) + "\n")
    else:
        path.unlink(missing_ok=True)
    return rows


def merge_complete(pairs: Sequence[FilePair], work_dir: Path) -> list[Path]:
    """Merged features of every pair whose two embeddings exist, in order of k; merges done before are kept."""
    merged_dir = work_dir / "merged"
    todo_dnabert, todo_esm, merged = [], [], []
    for pair in pairs:
        dnabert = output_path("dnabert", pair.nucleotide, work_dir / "dnabert")
        esm = output_path("esm", pair.protein, work_dir / "esm")
        if not (is_complete(dnabert) and is_complete(esm)):
            continue
        merged.append(merged_path(merged_dir, pair.index))
        if not is_complete(merged[-1]):
            todo_dnabert.append(dnabert)
            todo_esm.append(esm)
    merge_files(todo_dnabert, todo_esm, merged_dir)
    return merged


# ---------------------------------------------------------------- command


def predict(options: PredictOptions, console: Console | None = None) -> int:
    """The `virnucpro predict` command; its exit code: 0 done, 2 some files failed, 1 error, 130 interrupted."""
    console = console or make_console()
    output_dir = options.output_dir
    work_dir = output_dir / "work"
    if options.models == "tiny":
        console.print(TINY_NOTICE)
    created = [d for d in (output_dir, work_dir) if not d.exists()]
    split_done = False
    with _sigterm_as_interrupt():
        try:
            check_options(options)
            devices = local_devices(options) if options.broker is None else []
            classifier = open_classifier(options)
            if holds_run(output_dir) and not options.resume:
                raise PredictError(f"{output_dir}: already holds a virnucpro run; pass --resume to continue it, "
                                   "or choose another output directory with -o")
            if options.resume and not holds_run(output_dir):
                console.print(f"{output_dir} holds no earlier run to resume; starting a new one", markup=False)
            try:
                pairs = split_input(options, work_dir, console)
            except ValueError:
                # Bad input (FastaError) leaves nothing behind: remove the directories this run created.
                if created:
                    shutil.rmtree(created[0], ignore_errors=True)
                raise
            split_done = True
            plans = plan_stages(pairs, work_dir, console)
            reasons: dict[str, str] = {}
            if any(plan.todo for plan in plans):
                with broker_session(options, devices, work_dir, console) as client:
                    reasons = embed_stages(client, plans, options, console)
            failed = write_failed_files(output_dir, pairs, work_dir, reasons)
            merged = merge_complete(pairs, work_dir)
            written = write_predictions(merged, classifier, output_dir)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/yellow] finished outputs are kept; rerun the same command with "
                          "--resume to continue")
            return EXIT_INTERRUPTED
        except (PredictError, ValueError, EmbedError, BrokerError, BrokerUnreachable, OSError) as exc:
            # ValueError covers the input's (FastaError) and the merge's and outputs' errors.
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            if split_done:
                console.print(f"finished outputs are kept in {work_dir}; once this is fixed, rerun the same "
                              "command with --resume to continue", markup=False)
            return EXIT_ERROR
    console.print(f"predictions: {written.results} ({written.frames:,} frames), "
                  f"{written.highestscore} ({written.chunks:,} chunks)", markup=False)
    if failed:
        listing = escape(str(output_dir / FAILED_FILES_NAME))
        console.print(f"[red]{len(failed)} files failed[/red] (listed with reasons in {listing}); the predictions "
                      f"cover the {len(merged)} of {len(pairs)} file pairs with both embeddings; rerun with --resume "
                      "to retry them")
        return EXIT_PARTIAL
    return EXIT_OK
