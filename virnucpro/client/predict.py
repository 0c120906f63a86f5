"""The `virnucpro predict` command: split a sample, embed it through the broker, classify each file pair, assemble.

Orchestration only: the stages themselves live in the pipeline modules and
the broker's workers, the run directory in run_dir, and where the jobs run in
session.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.reports import failure_reasons
from virnucpro.client.embed import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    EmbedError,
    Plan,
    make_console,
    run_job,
    summary_line,
    wait_for_workers,
    worker_table,
    write_report,
)
from virnucpro.client.options import PredictError, PredictOptions, check_options
from virnucpro.client.run_dir import (
    FAILED_FILES_NAME,
    holds_run,
    plan_stages,
    split_input,
    write_failed_files,
)
from virnucpro.client.session import broker_session, check_precision, local_devices, sigterm_as_interrupt
from virnucpro.pipeline.classifier import ClassifierCheckpointError, MLPClassifier, load_classifier
from virnucpro.pipeline.merge import merged_path
from virnucpro.pipeline.outputs import assemble_predictions, classify_pair, pair_predictions_path
from virnucpro.pipeline.sequences import FilePair
from virnucpro.stages import is_complete, output_path

EXIT_INTERRUPTED = 130
TINY_NOTICE = ("[yellow]note:[/yellow] --models tiny runs small random networks: these predictions mean nothing "
               "biologically; they only show that the pipeline runs")


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


def embed_stages(client: BrokerClient, plans: Sequence[Plan], options: PredictOptions,
                 console: Console) -> dict[str, str]:
    """Run each stage's plan as a broker job; the inputs that failed, with their reasons."""
    failures: dict[str, str] = {}
    for plan in plans:
        if not plan.todo:
            continue
        wait_for_workers(client, plan.stage, 1, options.timeout, console)
        report = run_job(client, plan, weighted=options.weighted, steal=options.steal, backup=options.backup,
                         console=console, label=plan.stage, transfer=options.transfer,
                         transfer_address=options.transfer_address)
        console.print(worker_table(report, f"{plan.stage}: per-worker throughput (predicted vs observed weight)"))
        console.print(summary_line(report))
        write_report(plan, report, client.address)
        for failure in report["failures"]:
            failures[failure["file"]] = failure_reasons(failure)
    return failures


def classify_pairs(pairs: Sequence[FilePair], work_dir: Path, classifier: MLPClassifier,
                   keep_features: bool) -> list[Path]:
    """Per-pair predictions of every pair whose two embeddings exist, in order of k.

    Classification is fast next to the embeddings, so it is done again on
    every run rather than trusted from an earlier one with other options.
    """
    done = []
    for pair in pairs:
        dnabert = output_path("dnabert", pair.nucleotide, work_dir / "dnabert")
        esm = output_path("esm", pair.protein, work_dir / "esm")
        if not (is_complete(dnabert) and is_complete(esm)):
            continue
        (work_dir / "classify").mkdir(exist_ok=True)
        if keep_features:
            (work_dir / "merged").mkdir(exist_ok=True)
        done.append(classify_pair(dnabert, esm, classifier, pair_predictions_path(work_dir / "classify", pair.index),
                                  merged_path(work_dir / "merged", pair.index) if keep_features else None).path)
    return done


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
            classified = classify_pairs(pairs, work_dir, classifier, options.keep_features)
            written = assemble_predictions(classified, output_dir)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/yellow] finished outputs are kept; rerun the same command with "
                          "--resume to continue")
            return EXIT_INTERRUPTED
        except (PredictError, ValueError, EmbedError, BrokerError, BrokerUnreachable, OSError) as exc:
            # ValueError covers the input's (FastaError), the feature files' and the outputs' errors.
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
                      f"cover the {len(classified)} of {len(pairs)} file pairs with both embeddings; rerun with --resume "
                      "to retry them")
        return EXIT_PARTIAL
    return EXIT_OK
