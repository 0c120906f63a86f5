"""The `virnucpro weights` commands: show the GPU weight table in force, refine it from throughput logs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from broker.records import TaskDone, WorkerSummary
from virnucpro.pipeline.gpu_weights import BUILT_IN, WEIGHTS_ENV, WeightFileError, WeightTable, load_weight_table
from virnucpro.weights.logs import ThroughputLog, ThroughputLogError, read_throughput_logs
from virnucpro.weights.refine import (
    DEFAULT_BASELINE,
    RESULT_COLUMNS,
    STAGES,
    Refinement,
    refine_weights,
    result_rows,
    write_weight_file,
)

# Enough lines to locate a damaged region of a log without flooding the terminal.
MAX_SKIPPED_SHOWN = 10


def _console() -> Console:
    # Rich wraps at 80 columns when output is not a terminal; file paths in the
    # tables would then break across lines in logs and pipes. No markup: paths
    # and device names are printed as they are, brackets included.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False, markup=False)


def _table(path: Path | None) -> WeightTable:
    try:
        return load_weight_table(path)
    except WeightFileError as exc:
        raise click.ClickException(str(exc)) from None


_weight_file = click.Path(dir_okay=False, path_type=Path)


@click.group("weights")
def weights() -> None:
    """Show the GPU weight table, or refine it from the broker's throughput logs."""


@weights.command("show")
@click.option(
    "--gpu-weights", type=_weight_file, default=None,
    help=f"TOML weight file that overrides and extends the built-in table (default: ${WEIGHTS_ENV}).",
)
def show(gpu_weights: Path | None) -> None:
    """Print the weight table in force and where each entry came from."""
    table = _table(gpu_weights)
    console = _console()
    if gpu_weights is not None:
        console.print(f"Weight file: {gpu_weights} (--gpu-weights)")
    elif os.environ.get(WEIGHTS_ENV):
        console.print(f"Weight file: {os.environ[WEIGHTS_ENV]} (${WEIGHTS_ENV})")
    else:
        console.print(f"Weight file: none (built-in table only; set ${WEIGHTS_ENV} or pass --gpu-weights)")
    out = Table("model", "weight", "source", title="GPU weight table")
    out.columns[1].justify = "right"
    for model in sorted(table.weights, key=lambda m: (-table.weights[m], m)):
        source = table.sources[model]
        out.add_row(model, f"{table.weights[model]:.2f}", source, style=None if source == BUILT_IN else "bold")
    console.print(out)
    console.print("A weight is a GPU model's embedding throughput relative to an RTX 3090.")


def _print_log_report(console: Console, log: ThroughputLog, paths: tuple[Path, ...]) -> None:
    console.print(
        f"Read {len(log.tasks)} {TaskDone.EVENT} and {len(log.summaries)} {WorkerSummary.EVENT} records "
        f"from {len(paths)} log file(s); ignored {log.other_records} record(s) of other types."
    )
    if log.skipped:
        console.print(f"Skipped {len(log.skipped)} corrupt or truncated line(s):", style="yellow")
        for line in log.skipped[:MAX_SKIPPED_SHOWN]:
            console.print(f"  {line}")
        if len(log.skipped) > MAX_SKIPPED_SHOWN:
            console.print(f"  ... and {len(log.skipped) - MAX_SKIPPED_SHOWN} more")
    else:
        console.print("Skipped 0 corrupt or truncated lines.")


def _print_refinement(console: Console, refinement: Refinement, stage: str) -> None:
    left_out = f", {refinement.jobs_other_stage} left out by --stage {stage}" if stage != "all" else ""
    console.print(
        f"Jobs: {refinement.jobs_used} used, {refinement.jobs_single_model} skipped "
        f"(a single GPU model gives no ratio){left_out}."
    )
    out = Table(*RESULT_COLUMNS, title="Refined GPU weights")
    for column in out.columns[1:]:
        column.justify = "right"
    for model, row in zip(refinement.models, result_rows(refinement), strict=True):
        out.add_row(*row, style=None if model.jobs else "dim")
    console.print(out)
    if not refinement.jobs_used:
        console.print("No job ran two GPU models side by side: every weight keeps its current value.", style="yellow")
        return
    if refinement.baseline_observed:
        console.print(f"Scale: {refinement.baseline} = 1.00 (the baseline was observed).")
    else:
        console.print(
            f"Scale: baseline {refinement.baseline} not observed beside another model; the observed "
            "models keep the current table's scale (same geometric mean)."
        )
    console.print("Spread: standard error of each refined weight, relative; unobserved models (dim) keep their weight.")


@weights.command("refine")
@click.argument(
    "logs", nargs=-1, required=True, metavar="LOG.jsonl...",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--baseline", default=DEFAULT_BASELINE, show_default=True,
    help="GPU model whose weight is 1.00 when it was observed.",
)
@click.option(
    "--current", type=_weight_file, default=None,
    help=f"Weight file whose table is the current one (default: built-in plus ${WEIGHTS_ENV}).",
)
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True,
              help="Use only this stage's jobs; 'all' includes synthetic jobs.")
@click.option("--out", type=_weight_file, default=None, help="Write the refined table to this TOML file.")
def refine(logs: tuple[Path, ...], baseline: str, current: Path | None, stage: str, out: Path | None) -> None:
    """Fit GPU weights to the speeds observed in throughput logs (LOG.jsonl ...)."""
    table = _table(current)
    try:
        log = read_throughput_logs(logs)
    except ThroughputLogError as exc:
        raise click.ClickException(str(exc)) from None
    refinement = refine_weights(log, table, baseline=baseline, stage=stage)  # type: ignore[arg-type]
    console = _console()
    _print_log_report(console, log, logs)
    _print_refinement(console, refinement, stage)
    if out is None:
        console.print("Pass --out FILE to write the refined table.")
        return
    header = [
        "GPU weights refined from throughput logs by `virnucpro weights refine`",
        f"logs: {', '.join(str(p) for p in logs)}; stage: {stage}; baseline: {refinement.baseline}",
    ]
    try:
        write_weight_file(out, refinement.weights, header=header)
    except OSError as exc:
        raise click.ClickException(
            f"{out}: cannot write the weight file ({exc.strerror}); choose another --out"
        ) from None
    console.print(f"Wrote {out}; use it with --gpu-weights {out} or {WEIGHTS_ENV}={out}.")
