"""The `virnucpro` command line: one group, a subcommand per user task."""

from __future__ import annotations

import logging

import click

from virnucpro import __version__


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


def main() -> None:
    cli()
