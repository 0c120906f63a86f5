"""Benchmark: files over the connection between a client's file server and a worker, with both processes' memory.

For each size, a client process runs the real file server (virnucpro.transfer.fileserver)
serving one random file as a job's input, and a worker process runs the real worker side
(virnucpro.transfer.remote): it downloads the file into a private directory, then uploads it
back as the job's output, which the client verifies and publishes. Both run on loopback as
separate processes. Reported per size: download and upload MB/s (1 MB = 10^6 bytes), and each
process's peak resident memory (VmHWM) beside its resident memory before the transfers began,
so the difference is what the transfers cost whatever the file's size.

    python tools/bench_transfer.py [--sizes 1,100,1000] [--curve] [--json results.json]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from virnucpro.transfer.wire import CHUNK, CREDIT, file_digest

MB = 1_000_000


def memory() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MB, and the CPU seconds it has used."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) * 1024 / MB, "peak_mb": int(fields["VmHWM"].split()[0]) * 1024 / MB,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def serve(directory: Path, curve: bool) -> None:
    """The client's side: serve directory/input.bin, print the job's transfer map, then (on stdin's end) figures."""
    from virnucpro.transfer.fileserver import FileServer

    before = memory()
    out = directory / "out"
    out.mkdir()
    from broker.security import user_key_pair

    # Encrypted as by default: only the user's own key (the worker's) gets in.
    server = FileServer(out, "tcp://127.0.0.1:*", [user_key_pair().name] if curve else None, marker=False).start()
    transfer = server.offer([{"path": str(directory / "input.bin"), "output": str(out / "output.bin")}])
    print(json.dumps(transfer), flush=True)
    sys.stdin.read()
    server.close()
    print(json.dumps({"before": before, "after": memory()}), flush=True)


def work(transfer: dict[str, Any], directory: Path) -> None:
    """The worker's side: download the input, upload it back as the output; print the times and memory."""
    from broker.security import credentials
    from virnucpro.transfer.remote import Channel, fetch, store

    before = memory()
    channel = Channel(transfer, credentials(environment=False) if transfer["server_key"] else None)
    local = directory / "output.bin"
    started = time.perf_counter()
    fetch(channel, transfer["token"], "bench:0", local.name, local, lambda: False)
    fetched = time.perf_counter()
    published = store(channel, transfer["token"], "bench:0", local, lambda: False)
    stored = time.perf_counter()
    channel.close()
    print(json.dumps({"download_s": fetched - started, "upload_s": stored - fetched, "published": published,
                      "before": before, "after": memory()}), flush=True)


def write_random(path: Path, size: int) -> None:
    block = 4 << 20
    with open(path, "wb") as handle:
        for start in range(0, size, block):
            handle.write(os.urandom(min(block, size - start)))


def measure(size_mb: float, curve: bool) -> dict[str, Any]:
    size = int(size_mb * MB)
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch:
        root = Path(scratch)
        (root / "client").mkdir()
        (root / "worker").mkdir()
        source = root / "client" / "input.bin"
        write_random(source, size)
        me = [sys.executable, __file__]
        client = subprocess.Popen([*me, "--serve", str(root / "client"), *(["--curve"] if curve else [])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        try:
            transfer = client.stdout.readline()
            worker = subprocess.run([*me, "--work", transfer, str(root / "worker")], capture_output=True, text=True,
                                    timeout=600, check=True)
            client.stdin.close()
            served = json.loads(client.stdout.readline())
            client.wait(60)
        finally:
            client.kill()
        figures = json.loads(worker.stdout)
        output = root / "client" / "out" / "output.bin"
        if not figures["published"] or file_digest(output) != file_digest(source):
            raise RuntimeError(f"{size_mb:g} MB: the output published is not the input sent")
    return {
        "size_mb": size / MB,
        "download_mb_s": size / MB / figures["download_s"],
        "upload_mb_s": size / MB / figures["upload_s"],
        "client_rss_before_mb": served["before"]["rss_mb"], "client_peak_mb": served["after"]["peak_mb"],
        "worker_rss_before_mb": figures["before"]["rss_mb"], "worker_peak_mb": figures["after"]["peak_mb"],
        # CPU seconds per GB moved (down and up): what the transfers cost whatever else runs on the machine.
        "client_cpu_s_per_gb": (served["after"]["cpu_s"] - served["before"]["cpu_s"]) / (2 * size / 1e9),
        "worker_cpu_s_per_gb": (figures["after"]["cpu_s"] - figures["before"]["cpu_s"]) / (2 * size / 1e9),
    }


@click.command()
@click.option("--sizes", default="1,100,1000", show_default=True, help="File sizes in MB, comma-separated.")
@click.option("--curve", is_flag=True, help="Encrypt the channel (CURVE) with your own key, as by default.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
@click.option("--serve", "serve_dir", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--work", "work_args", nargs=2, default=None, hidden=True)
def main(sizes: str, curve: bool, json_path: Path | None, serve_dir: Path | None,
         work_args: tuple[str, str] | None) -> None:
    """Measure transfer throughput and the peak memory of client and worker for files of each size."""
    if serve_dir is not None:
        serve(serve_dir, curve)
        return
    if work_args:
        work(json.loads(work_args[0]), Path(work_args[1]))
        return
    results = []
    click.echo(f"chunk {CHUNK / MB:g} MB x credit {CREDIT}, {'CURVE' if curve else 'plain'} loopback")
    click.echo(f"{'size':>8} {'download':>12} {'upload':>12} {'client RSS':>22} {'worker RSS':>22} "
               f"{'CPU s/GB client, worker':>24}")
    for size_mb in (float(s) for s in sizes.split(",")):
        r = measure(size_mb, curve)
        results.append(r)
        click.echo(f"{r['size_mb']:>6g}MB {r['download_mb_s']:>7,.0f} MB/s {r['upload_mb_s']:>7,.0f} MB/s "
                   f"{r['client_rss_before_mb']:>6.0f} -> peak {r['client_peak_mb']:>4.0f} MB "
                   f"{r['worker_rss_before_mb']:>6.0f} -> peak {r['worker_peak_mb']:>4.0f} MB "
                   f"{r['client_cpu_s_per_gb']:>15.2f}, {r['worker_cpu_s_per_gb']:.2f}")
    if json_path:
        json_path.write_text(json.dumps({"curve": curve, "chunk": CHUNK, "credit": CREDIT, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
