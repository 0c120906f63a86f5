"""The `virnucpro` command line: one group, a subcommand per user task."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from broker import protocol
from broker.client import broker_address
from virnucpro import __version__
from virnucpro.backends.interface import PRECISIONS
from virnucpro.stages import MODEL_STAGES, STAGES
from virnucpro.weights.cli import weights
from virnucpro.worker.config import INSTALL_MODELS, SETUP_ERROR_EXIT

BROKER_HELP = f"Broker address [default: ${protocol.ADDRESS_ENV} or {protocol.DEFAULT_ADDRESS}]."
PRECISION_DEFAULT = "[default: bf16 on a GPU that has it natively, fp32 elsewhere; the original tool runs fp32]"
TRANSFER_OPTIONS = (
    click.option("--transfer", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
                 help="Send files over the connection to workers that cannot see this machine's files (auto), "
                      "to every worker (always), or to none: a shared file system (never)."),
    click.option("--transfer-address", default=None, metavar="HOST[:PORT]",
                 help="Where workers reach this machine for transfers [default: the local address that reaches "
                      "the broker, on a free port]."),
)


insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Talk to a broker started with --insecure: in the clear, with no key [default: your own key pair, or "
         "the keys in $VIRNUCPRO_CURVE_SECRET and $VIRNUCPRO_CURVE_SERVER_KEY].")


# What --insecure exposes, as the warning of each command says it.
WORKER_EXPOSURE = "submit jobs that this worker runs, reading and writing files as your user"
CLIENT_EXPOSURE = "register as a worker and receive this job's files, or read and cancel the job"


def warn_insecure(address: str, what: str) -> None:
    """The start-up warning of a command run with --insecure."""
    from broker.security import INSECURE_WARNING

    click.echo("warning: " + INSECURE_WARNING.format(address=address, what=what), err=True)


def transfer_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(TRANSFER_OPTIONS):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="virnucpro")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """VirNucPro: find viral reads, with embeddings spread over mixed GPUs by a broker."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class _WorkerSetupExit(click.ClickException):
    """A worker that cannot start: a supervisor must not start it again as if it had crashed."""

    exit_code = SETUP_ERROR_EXIT


def _worker_gpus(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | str | None:
    return "all" if value == "all" else _gpu_list(ctx, param, value)


def _speed_change(value: str | None) -> tuple[float, float] | None:
    """T:R of --synthetic-speed-change as (T seconds, R residues/s)."""
    if value is None:
        return None
    after, _, speed = value.partition(":")
    try:
        parsed = float(after), float(speed)
    except ValueError:
        parsed = (-1.0, 0.0)
    if not (parsed[0] >= 0 and parsed[1] > 0):
        raise click.BadParameter(f"{value!r}: write T:R, seconds after the first file (>= 0) and the new speed "
                                 "in residues/s (> 0), e.g. 5:1000", param_hint="--synthetic-speed-change")
    return parsed


@cli.command()
@click.option("--broker", "address", default=None, metavar="ADDR", help=BROKER_HELP)
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda:N", help="Device to run models on.")
@click.option("--gpus", callback=_worker_gpus, default=None, metavar="all|0,1",
              help="Run one worker per GPU (all visible ones, or these), restart one that crashes, "
                   "and stop them all on Ctrl-C or SIGTERM.")
@click.option("--gpu-name", default=None, metavar="NAME",
              help="Device name for the weight lookup [default: what torch reports for --device].")
@click.option("--synthetic-speed", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
              help="Be a synthetic device serving the `synthetic` stage at R residues/s (no model, no torch).")
@click.option("--synthetic-speed-change", "synthetic_change", default=None, metavar="T:R",
              callback=lambda ctx, param, value: _speed_change(value),
              help="With --synthetic-speed: run at R residues/s from T seconds after the first file starts.")
@click.option("--name", default=None, help="Name in logs and status [default: host:device; with --gpus, "
                                           "each worker is NAME:cuda:N, NAME defaulting to host].")
@click.option("--stage", "stages", multiple=True, type=click.Choice(list(MODEL_STAGES)),
              help="Stages to serve (repeatable) [default: dnabert, esm and classify].")
@click.option("--models", type=click.Choice(["virnucpro", "tiny"]), default="virnucpro", show_default=True,
              help="`tiny`: small random networks of the real shapes, for trying the pipeline anywhere.")
@click.option("--dnabert-model", default=None, metavar="PATH|NAME", help="DNABERT-S model directory or cached name.")
@click.option("--esm-model", default=None, metavar="PATH|NAME", help="ESM-2 checkpoint (esm2_*.pt) or cached name.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help=f"Precision of the models' forward pass {PRECISION_DEFAULT}.")
@click.option("--broker-timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Seconds of broker silence before reconnecting.")
@insecure_option
@click.pass_context
def worker(ctx: click.Context, address: str | None, device: str, gpus: tuple[int, ...] | str | None,
           gpu_name: str | None, synthetic_speed: float | None, synthetic_change: tuple[float, float] | None,
           name: str | None, stages: tuple[str, ...], models: str, dnabert_model: str | None, esm_model: str | None,
           precision: str | None, broker_timeout: float, insecure: bool) -> None:
    """Run one worker: register with the broker and embed (or classify) the files it is given.

    Start one per GPU, or one command per node with --gpus all. Models are
    loaded once, before registering, and kept across files and jobs; a
    classify job's classifier is loaded at its first file pair, and
    classification always runs on the CPU, on one thread. Ctrl-C or
    SIGTERM leaves cleanly: the broker hands the worker's files to the
    others at once. Exit status 78: the worker could not start (a model, a
    package or a key to fix); it is not worth starting again as it is.

    With no key options it uses your own key pair, as a broker of yours with
    no key options expects; $VIRNUCPRO_CURVE_SECRET and
    $VIRNUCPRO_CURVE_SERVER_KEY name other keys (several machines).
    """
    from broker.security import SecurityError, credentials
    from virnucpro.worker.config import WorkerConfig, WorkerSetupError, open_backends
    from virnucpro.worker.gpus import GpuDiscoveryError
    from virnucpro.worker.process import Worker
    from virnucpro.worker.supervisor import supervise_gpus

    if gpus is not None:
        if ctx.get_parameter_source("device") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("give either --gpus (one worker per GPU) or --device (one worker), not both")
        forwarded = ["--broker", broker_address(address), "--models", models, "--broker-timeout", str(broker_timeout),
                     *(["--insecure"] if insecure else [])]
        change = f"{synthetic_change[0]}:{synthetic_change[1]}" if synthetic_change else None
        for option, value in (("--gpu-name", gpu_name), ("--synthetic-speed", synthetic_speed),
                              ("--synthetic-speed-change", change), ("--dnabert-model", dnabert_model),
                              ("--esm-model", esm_model), ("--precision", precision)):
            if value is not None:
                forwarded += [option, str(value)]
        for stage in stages:
            forwarded += ["--stage", stage]
        try:
            sys.exit(supervise_gpus(gpus if isinstance(gpus, tuple) else None, name, forwarded,
                                    ctx.find_root().params["verbose"]))
        except GpuDiscoveryError as exc:
            raise _WorkerSetupExit(str(exc)) from None

    config = WorkerConfig(
        broker=broker_address(address), device=device, name=name, gpu_name=gpu_name,
        synthetic_speed=synthetic_speed, synthetic_change=synthetic_change, stages=stages or MODEL_STAGES,
        models=models, dnabert_model=dnabert_model, esm_model=esm_model, precision=precision,
        broker_timeout=broker_timeout, insecure=insecure,
    )
    try:
        keys = credentials(insecure=insecure)  # before the models load: a key to fix is found at once
        if keys is None:
            warn_insecure(config.broker, WORKER_EXPOSURE)
        process = Worker(config, open_backends(config), keys)
    except (WorkerSetupError, SecurityError) as exc:
        raise _WorkerSetupExit(str(exc)) from None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: process.stop())
    try:
        process.run()
    except WorkerSetupError as exc:
        raise _WorkerSetupExit(str(exc)) from None


@cli.command()
@click.option("--broker", "address", default=None, metavar="ADDR", help=BROKER_HELP)
@click.option("--stage", required=True, type=click.Choice(sorted(s.name for s in STAGES.values() if s.fasta_input)),
              help="Which embedding stage to run.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where outputs and run_report.json go; complete outputs already there are skipped.")
@click.option("--weighted", is_flag=True, help="Seed queues by the GPU weight table (else all weights 1.0).")
@click.option("--steal", is_flag=True, help="Let idle workers take queued files from slower ones.")
@click.option("--backup/--no-backup", default=True, show_default=True,
              help="With --steal: an idle worker runs a backup copy of a straggling file; the first copy wins.")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Wait for this many workers serving the stage before seeding.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds to wait for --min-workers, and for a silent broker (in all, since it last answered).")
@transfer_options
@insecure_option
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def embed(address: str | None, stage: str, output_dir: Path, weighted: bool, steal: bool, backup: bool,
          min_workers: int, timeout: float, transfer: str, transfer_address: str | None, insecure: bool,
          files: tuple[Path, ...]) -> None:
    """Submit FILES as one job of STAGE to the broker and wait for it.

    Exit status: 0 every output verified complete on disk; 1 an error (bad
    input, an output directory that is not writable, no broker, too few
    workers); 2 some files failed (listed with reasons); 3 the job was
    cancelled (by whom is said); 130 interrupted.
    """
    from virnucpro.client.embed import embed as run_embed

    if insecure:
        warn_insecure(broker_address(address), CLIENT_EXPOSURE)
    sys.exit(run_embed(broker_address(address), stage, files, output_dir, weighted=weighted, steal=steal,
                       backup=backup, min_workers=min_workers, timeout=timeout, transfer=transfer,
                       transfer_address=transfer_address, insecure=insecure))


class _UsageErrorExit1(click.UsageError):
    exit_code = 1


class _PredictCommand(click.Command):
    """A command whose usage errors exit 1, since `predict` gives exit status 2 the meaning "partial"."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageErrorExit1(exc.format_message(), exc.ctx) from None


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        gpus = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of GPU numbers, e.g. 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"{value!r}: give each GPU number (0, 1, ...) once")
    return gpus


@cli.command(cls=_PredictCommand)
@click.argument("input_fasta", metavar="INPUT.fasta", type=click.Path(path_type=Path))
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the predictions go; OUT/work keeps the run's state for --resume.")
@click.option("--expected-length", type=int, default=500, show_default=True, metavar="300|500",
              help="Chunk length; must match the classifier (300_model.pth or 500_model.pth).")
@click.option("--model-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Classifier checkpoint [default: the tiny one with --models tiny, else "
                   "300_model.pth / 500_model.pth in the current directory].")
@click.option("--models", type=click.Choice(["virnucpro", "tiny"]), default="virnucpro", show_default=True,
              help="`tiny`: small random networks, to try the pipeline anywhere (meaningless predictions).")
@click.option("--dnabert-model", default=None, metavar="PATH|NAME", help="DNABERT-S model for workers started here.")
@click.option("--esm-model", default=None, metavar="PATH|NAME", help="ESM-2 checkpoint for workers started here.")
@click.option("--weighted", is_flag=True, help="Seed queues by the GPU weight table (else all weights 1.0).")
@click.option("--steal", is_flag=True, help="Let idle workers take queued files from slower ones.")
@click.option("--backup/--no-backup", default=True, show_default=True,
              help="With --steal: an idle worker runs a backup copy of a straggling file; the first copy wins.")
@click.option("--broker", "address", default=None, metavar="ADDR",
              help="Use the running broker at ADDR and the workers that serve it (several machines) "
                   "[default: start a broker and workers here].")
@click.option("--gpus", callback=_gpu_list, default=None, metavar="0,1",
              help="Start one worker per listed GPU [default: one per visible GPU, else 2 CPU workers].")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Start N CPU workers, each with an equal share of the cores.")
@click.option("--gpu-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML weight file for the broker started here.")
@click.option("--throughput-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Throughput log of the broker started here [default: the per-user log].")
@click.option("--worker-timeout", type=click.FloatRange(min=0.1), default=None, metavar="S",
              help="Seconds of silence after which the broker started here takes a worker for dead [default: 10].")
@click.option("--sequences-per-file", type=click.IntRange(min=1), default=None, metavar="N",
              help="Sequences per split file [default: from the input's size, at most 10000].")
@click.option("--resume", is_flag=True, help="Continue the run in OUT, reusing every finished output.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds to wait for the broker and its workers (they load their models first).")
@click.option("--rename-duplicates", is_flag=True,
              help="Call later reads with an id already used id.2, id.3, ... [default: stop with an error].")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help=f"Precision of the models' forward pass on the workers started here {PRECISION_DEFAULT}.")
@click.option("--keep-features", is_flag=True,
              help="Also keep the merged features of each file pair (OUT/work/merged/output_k_merged.pt).")
@transfer_options
@click.option("--insecure", is_flag=True,
              help="No keys: talk in the clear to a --broker started with --insecure, or start the broker and "
                   "workers here that way [default: your own key pair, or the keys in $VIRNUCPRO_CURVE_SECRET and "
                   "$VIRNUCPRO_CURVE_SERVER_KEY for --broker].")
def predict(input_fasta: Path, output_dir: Path, expected_length: int, model_path: Path | None, models: str,
            dnabert_model: str | None, esm_model: str | None, weighted: bool, steal: bool, backup: bool,
            address: str | None, gpus: tuple[int, ...] | None, workers: int | None, gpu_weights: Path | None,
            throughput_log: Path | None, worker_timeout: float | None, sequences_per_file: int | None,
            resume: bool, timeout: float, rename_duplicates: bool, precision: str | None,
            keep_features: bool, transfer: str, transfer_address: str | None, insecure: bool) -> None:
    """Predict which reads of INPUT.fasta are viral: split, embed through the broker, merge, classify.

    INPUT.fasta is FASTA or FASTQ (qualities are ignored), plain or gzipped.
    Writes OUT/prediction_results.txt and OUT/prediction_results_highestscore.csv.
    Exit status: 0 every output verified complete on disk; 1 error; 2 some
    files failed (listed with reasons at the end and in OUT/failed_files.txt;
    the predictions cover the rest); 3 a job was cancelled (by whom is said);
    130 interrupted. After an interruption or a failure, rerun the same
    command with --resume.
    """
    try:
        from virnucpro.client.predict import PredictOptions
        from virnucpro.client.predict import predict as run_predict
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "torch":
            raise
        raise click.ClickException(f"predict merges and classifies with torch, which is not installed here; "
                                   f"install the models extra: {INSTALL_MODELS}") from None
    if insecure:
        warn_insecure(broker_address(address) if address else "the broker started here", CLIENT_EXPOSURE)

    sys.exit(run_predict(PredictOptions(
        input_fasta=input_fasta, output_dir=output_dir, expected_length=expected_length, model_path=model_path,
        models=models, dnabert_model=dnabert_model, esm_model=esm_model, weighted=weighted, steal=steal,
        backup=backup, broker=address, gpus=gpus, workers=workers, gpu_weights=gpu_weights,
        throughput_log=throughput_log, worker_timeout=worker_timeout, sequences_per_file=sequences_per_file, resume=resume, timeout=timeout,
        rename_duplicates=rename_duplicates, precision=precision, keep_features=keep_features,
        transfer=transfer, transfer_address=transfer_address, insecure=insecure,
    )))


cli.add_command(weights)


def main() -> None:
    cli(prog_name="virnucpro")


if __name__ == "__main__":
    main()
