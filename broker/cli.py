"""The `virnucpro-broker` command: run the broker, or show a running broker's status."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import click
from rich.live import Live

from broker import protocol
from broker.client import BrokerClient, BrokerError, BrokerUnreachable, broker_address
from broker.scheduler import Scheduler
from broker.security import INSECURE_WARNING, SecurityError, admission, create_keys, user_key_directory
from broker.server import BrokerServer, ThroughputLog, default_log_path
from broker.status import render_status, status_view
from virnucpro.pipeline.gpu_weights import WeightFileError, load_weight_table


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bind", default=None, metavar="ADDR",
              help=f"ZeroMQ address to listen on [default: ${protocol.ADDRESS_ENV} or {protocol.DEFAULT_ADDRESS}].")
@click.option("--throughput-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"JSON Lines log appended per finished file [default: {default_log_path()}].")
@click.option("--gpu-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML weight file ([weights] table) overriding the built-in GPU weights.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between heartbeats and lease checks.")
@click.option("--worker-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds of silence after which a worker is dead and its files go to others.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Failed attempts (stage errors) before a file is reported failed.")
@click.option("--max-deaths", type=click.IntRange(min=1), default=5, show_default=True,
              help="Different workers that may die (or leave) while running a file before it is reported failed; "
                   "deaths are not counted as failed attempts.")
@click.option("--task-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Seconds a running file may show no progress (its worker's heartbeats count batches) before it "
                   "fails on that worker, which abandons it (or restarts itself if it cannot) while the files "
                   "queued for it go to other workers [default: 1800 for model stages; for the synthetic stage "
                   "10x the file's predicted time, at least 30].")
@click.option("--forget-after", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              metavar="S", help="Seconds after which a dead worker's record is forgotten (once no job the broker "
                                "keeps counts files it ran).")
@click.option("--max-queued-tasks", type=click.IntRange(min=1), default=1_000_000, show_default=True, metavar="N",
              help="Unfinished files of running jobs the broker holds at most; a submission or chunk past it gets an error.")
@click.option("--curve-secret", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The broker's secret certificate (NAME.key_secret), instead of your own key; then only the "
                   "keys in the --allowed-* directories are admitted.")
@click.option("--allowed-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of public certificates (*.key) admitted both as workers and as clients.")
@click.option("--allowed-workers", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of public certificates (*.key) admitted as workers only.")
@click.option("--allowed-clients", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of public certificates (*.key) admitted as clients only.")
@click.option("--insecure", is_flag=True,
              help="Neither encrypt nor authenticate: anyone who reaches ADDR may submit jobs and serve them.")
@click.option("-v", "--verbose", is_flag=True, help="Log every dropped message.")
@click.pass_context
def cli(ctx: click.Context, bind: str | None, throughput_log: Path | None, gpu_weights: Path | None,
        heartbeat_interval: float, worker_timeout: float, max_attempts: int, max_deaths: int,
        task_timeout: float | None, forget_after: float, max_queued_tasks: int, curve_secret: Path | None,
        allowed_keys: Path | None, allowed_workers: Path | None, allowed_clients: Path | None, insecure: bool,
        verbose: bool) -> None:
    """Run the virnucpro broker: it seeds GPU workers' queues by weight and lets idle ones steal.

    Workers (`virnucpro worker --broker ADDR`) and clients (`virnucpro embed`,
    `virnucpro predict --broker ADDR`) connect to ADDR. With no key options
    the traffic is encrypted (CURVE) with your own key pair, kept in your
    private state directory and made on first use, and only your own
    processes are admitted: nothing to configure on one machine, or on
    machines that share your home directory. Across machines, see
    `virnucpro-broker keys --help`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if task_timeout is not None and task_timeout <= 2 * heartbeat_interval:
        raise click.UsageError(f"--task-timeout must exceed two heartbeat intervals ({2 * heartbeat_interval:g} s): "
                               "progress is seen only at heartbeats")
    key_options = {"--curve-secret": curve_secret, "--allowed-keys": allowed_keys,
                   "--allowed-workers": allowed_workers, "--allowed-clients": allowed_clients}
    if insecure and any(key_options.values()):
        given = ", ".join(name for name, value in key_options.items() if value)
        raise click.UsageError(f"--insecure admits everyone: drop it, or drop {given}")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        weights = load_weight_table(gpu_weights)
    except WeightFileError as exc:
        raise click.ClickException(str(exc)) from None
    log_path = throughput_log or default_log_path()
    try:
        log = ThroughputLog(log_path)
    except OSError as exc:
        raise click.ClickException(f"{log_path}: cannot open the throughput log ({exc.strerror})") from None
    address = broker_address(bind)
    try:
        admitted = None if insecure else admission(curve_secret, allowed_keys, allowed_workers, allowed_clients)
        scheduler = Scheduler(worker_timeout=worker_timeout, max_attempts=max_attempts, max_deaths=max_deaths,
                              task_timeout=task_timeout, forget_after=forget_after, max_queued_tasks=max_queued_tasks)
        server = BrokerServer(address, scheduler, weights, log, heartbeat_interval=heartbeat_interval,
                              admission=admitted)
    except SecurityError as exc:
        log.close()
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # zmq raises ZMQError for a bad or busy address
        log.close()
        raise click.ClickException(f"cannot listen on {address}: {exc}") from None
    if admitted is None:
        reach = server.address if is_loopback(address) else f"{server.address} (from other machines too)"
        click.echo("warning: " + INSECURE_WARNING.format(address=reach, what="submit jobs that read and write "
                   "files as this user, and register as a worker to receive every job's files"), err=True)
    elif curve_secret is None:
        click.echo(f"admitting only your own key ({user_key_directory()})"
                   + (", and the keys in the --allowed-* directories" if any(key_options.values()) else ""), err=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"virnucpro-broker listening on {server.address}", err=True)
    click.echo(f"throughput log: {log_path}", err=True)
    server.serve(stop)
    click.echo("virnucpro-broker stopped", err=True)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
def keys(directory: Path, name: str) -> None:
    """Make a CURVE key pair DIRECTORY/NAME.key (public) and NAME.key_secret (keep private).

    Needed only across machines that do not share your home directory. Make
    one for the broker and one per worker or client machine. The broker gets
    --curve-secret broker.key_secret and the machines' NAME.key files in
    --allowed-workers DIR (workers only), --allowed-clients DIR (clients
    only) or --allowed-keys DIR (both); each worker and client sets
    VIRNUCPRO_CURVE_SECRET=NAME.key_secret and VIRNUCPRO_CURVE_SERVER_KEY=broker.key.
    """
    public, secret = create_keys(directory, name)
    click.echo(f"public key (share): {public}\nsecret key (keep):  {secret}")


@cli.command()
@click.option("--broker", "address", default=None, metavar="ADDR",
              help=f"Broker address [default: ${protocol.ADDRESS_ENV} or {protocol.DEFAULT_ADDRESS}].")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for the broker's answer.")
@click.option("--watch", is_flag=True, help="Keep the tables on screen, refreshed, until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.5, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--insecure", is_flag=True, help="Talk in the clear, to a broker started with --insecure.")
@click.option("--all", "every", is_flag=True,
              help="List every worker and job the broker keeps, a page at a time [default: the living workers "
                   "and most recent jobs, 50 of each, and summaries].")
def status(address: str | None, as_json: bool, timeout: float, watch: bool, interval: float, insecure: bool,
           every: bool) -> None:
    """Show the workers, queues, jobs and counters of a running broker.

    Every job is listed; file paths and reports only of the jobs submitted
    with this process's key (all of them on an --insecure broker).
    """
    address = broker_address(address)
    try:
        with BrokerClient(address, timeout=timeout, insecure=insecure) as client:
            snapshot = all_pages(client) if every else client.request("status")["status"]
            if watch:
                with Live(status_view(snapshot), refresh_per_second=4, screen=False) as live:
                    while True:
                        time.sleep(interval)
                        live.update(status_view(client.request("status")["status"]))
    except (BrokerUnreachable, BrokerError, SecurityError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        return
    if as_json:
        click.echo(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        render_status(snapshot)


def all_pages(client: BrokerClient) -> dict:
    """Every page of the broker's status as one snapshot: workers as listed, jobs oldest first."""
    first = client.request("status")["status"]
    pages = [first] + [client.request("status", page=page)["status"] for page in range(1, first["pages"])]
    return {**first, "workers": [w for p in pages for w in p["workers"]],
            "jobs": [j for p in reversed(pages) for j in p["jobs"]], "page": None}


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on 127.0.0.0/8, ::1 or localhost."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def main() -> None:
    cli(prog_name="virnucpro-broker")


if __name__ == "__main__":
    main()
