"""The `virnucpro` command line: one group, a subcommand per user task."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from broker import protocol
from broker.client import broker_address
from virnucpro import __version__
from virnucpro.stages import STAGES
from virnucpro.weights_cli import weights

BROKER_HELP = f"Broker address [default: ${protocol.ADDRESS_ENV} or {protocol.DEFAULT_ADDRESS}]."


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


@cli.command()
@click.option("--broker", "address", default=None, metavar="ADDR", help=BROKER_HELP)
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda:N", help="Device to run models on.")
@click.option("--gpu-name", default=None, metavar="NAME",
              help="Device name for the weight lookup [default: what torch reports for --device].")
@click.option("--synthetic-speed", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
              help="Be a synthetic device serving the `synthetic` stage at R residues/s (no model, no torch).")
@click.option("--name", default=None, help="Name in logs and status [default: host:device].")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["dnabert", "esm"]),
              help="Stages to serve (repeatable) [default: both].")
@click.option("--models", type=click.Choice(["virnucpro", "tiny"]), default="virnucpro", show_default=True,
              help="`tiny`: small random networks of the real shapes, for trying the pipeline anywhere.")
@click.option("--dnabert-model", default=None, metavar="PATH|NAME", help="DNABERT-S model directory or cached name.")
@click.option("--esm-model", default=None, metavar="PATH|NAME", help="ESM-2 checkpoint (esm2_*.pt) or cached name.")
@click.option("--broker-timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="Seconds of broker silence before reconnecting.")
def worker(address: str | None, device: str, gpu_name: str | None, synthetic_speed: float | None, name: str | None,
           stages: tuple[str, ...], models: str, dnabert_model: str | None, esm_model: str | None,
           broker_timeout: float) -> None:
    """Run one worker: register with the broker and embed the files it is given.

    Start one per GPU. Models are loaded once, before registering, and kept
    across files and jobs. Ctrl-C or SIGTERM leaves cleanly: the broker hands
    the worker's files to the others at once.
    """
    from virnucpro.worker import Worker, WorkerConfig, WorkerSetupError, open_backends

    config = WorkerConfig(
        broker=broker_address(address), device=device, name=name, gpu_name=gpu_name,
        synthetic_speed=synthetic_speed, stages=stages or ("dnabert", "esm"), models=models,
        dnabert_model=dnabert_model, esm_model=esm_model, broker_timeout=broker_timeout,
    )
    try:
        backends = open_backends(config)
        process = Worker(config, backends)
    except WorkerSetupError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    process.run(stop)


@cli.command()
@click.option("--broker", "address", default=None, metavar="ADDR", help=BROKER_HELP)
@click.option("--stage", required=True, type=click.Choice(sorted(STAGES)), help="Which embedding stage to run.")
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where outputs and run_report.json go; complete outputs already there are skipped.")
@click.option("--weighted", is_flag=True, help="Seed queues by the GPU weight table (else all weights 1.0).")
@click.option("--steal", is_flag=True, help="Let idle workers take queued files from slower ones.")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Wait for this many workers serving the stage before seeding.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds to wait for the broker and for --min-workers before giving up.")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def embed(address: str | None, stage: str, output_dir: Path, weighted: bool, steal: bool, min_workers: int,
          timeout: float, files: tuple[Path, ...]) -> None:
    """Submit FILES as one job of STAGE to the broker and wait for it.

    Exit status: 0 all files done, 2 some failed (listed with reasons), 1 the
    job could not run (bad input, no broker, too few workers).
    """
    from virnucpro.embed import embed as run_embed

    sys.exit(run_embed(broker_address(address), stage, files, output_dir, weighted=weighted, steal=steal,
                       min_workers=min_workers, timeout=timeout))


cli.add_command(weights)


def main() -> None:
    cli(prog_name="virnucpro")
