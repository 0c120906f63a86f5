"""Workers that cannot see the client's files: inputs and outputs travel over the connection.

Each such worker runs in its own mount namespace with an empty tmpfs mounted
over the directory that holds the client's files, so the paths the client
submits do not exist for it; it finds no marker, and gets transfers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.security import SECRET_ENV, SERVER_KEY_ENV, create_keys, credentials, user_key_pair
from tests.support.cluster import cluster
from tests.support.fasta import write_fasta
from virnucpro.client.local import Child, LocalCluster
from virnucpro.processes import command
from virnucpro.scratch import LOCK_SUFFIX, TASK, UPLOADS
from virnucpro.stages import output_path
from virnucpro.transfer.fileserver import MARKER_PREFIX, FileServer
from virnucpro.transfer.remote import Channel, TransferError, fetch, store

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ("prediction_results.txt", "prediction_results_highestscore.csv")
PREDICT = ["--models", "tiny", "--expected-length", "500", "--sequences-per-file", "12", "--timeout", "90"]
RUN_TIMEOUT = 240


def hiding_unavailable(directory: Path) -> str | None:
    """Why a worker cannot be given a mount namespace that hides `directory` here, or None if it can."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && test -z "$(ls -A "$0")"',
                            str(directory)], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a new mount namespace: {probe.stderr.strip() or probe.returncode}"
    return None


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    """The directory that holds the client's inputs and outputs; hidden workers cannot see into it."""
    directory = tmp_path / "client"
    directory.mkdir()
    (directory / "present").write_text("the client sees this\n")
    reason = hiding_unavailable(directory)
    if reason:
        pytest.skip(reason)
    return directory


def start_hidden_worker(running: LocalCluster, name: str, hidden: Path, *options: str,
                        env: dict[str, str] | None = None) -> Child:
    """A worker in its own mount namespace, where `hidden` is an empty tmpfs."""
    log = running.log_dir / f"worker-{name}.log"
    argv = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden),
            *command("virnucpro"), "worker", "--broker", running.address, "--name", name, "--broker-timeout", "5",
            *options]
    with open(log, "ab") as handle:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    child = Child(f"worker {name}", process, log)
    running.workers[name] = child
    return child


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return found


def leftovers(directory: Path) -> list[str]:
    """Names in an output directory that are neither outputs nor the run report: markers, uploads, temporaries."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------ predict, hidden


@pytest.fixture(scope="module")
def models_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private model cache holding the tiny models, outside any hidden directory, and a private log.

    The private state directory holds a copy of this user's key pair, as on machines that share a home
    directory: the clusters started here (with the user's own state directory) admit these processes.
    """
    home = tmp_path_factory.mktemp("home")
    from virnucpro.backends.tiny import ensure_tiny_models

    ensure_tiny_models(home / "cache" / "virnucpro" / "tiny-models")
    (home / "state" / "virnucpro").mkdir(mode=0o700, parents=True)
    shutil.copytree(user_key_pair().source.parent, home / "state" / "virnucpro" / "keys")
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRNUCPRO_BROKER", "VIRNUCPRO_GPU_WEIGHTS")}
    environment.update(XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"), COLUMNS="160",
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return environment


def make_reads(path: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_example_reads.py"), str(path), "--reads", "60"],
                   check=True, capture_output=True, timeout=60)
    return path


def predict(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command("virnucpro"), "predict", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def test_predict_with_workers_that_cannot_see_the_clients_files_gives_identical_predictions(
        tmp_path: Path, client_dir: Path, models_env: dict[str, str]) -> None:
    shared = predict(models_env, make_reads(tmp_path / "reads.fa"), "-o", tmp_path / "shared", "--workers", "2",
                     *PREDICT)
    assert shared.returncode == 0, shared.stderr
    assert "transfers:" not in shared.stderr  # the workers it started see its files: nothing travels

    reads = make_reads(client_dir / "reads.fa")
    with cluster(tmp_path / "cluster", worker_timeout=10.0) as running:
        for name in ("hidden-1", "hidden-2"):
            start_hidden_worker(running, name, client_dir, "--device", "cpu", "--models", "tiny", env=models_env)
        running.wait_for_workers(2, stage="esm", timeout=120)
        run = predict(models_env, reads, "-o", client_dir / "out", "--broker", running.address, *PREDICT)
        logs = {name: child.log.read_text() for name, child in running.workers.items()}
    assert run.returncode == 0, run.stderr + "\n".join(logs.values())
    for stage in ("dnabert", "esm"):
        files = len(list((client_dir / "out" / "work" / stage).glob("output_*.pt")))
        assert f"{stage} transfers: {files} inputs sent" in run.stderr
        assert f"{files} outputs received and verified" in run.stderr
        assert leftovers(client_dir / "out" / "work" / stage) == []
    # Classify fetched both feature files of every pair, and the classifier.
    pairs = len(list((client_dir / "out" / "work" / "classify").glob("output_*_predictions.tsv")))
    assert f"classify transfers: {2 * pairs + 1} inputs sent" in run.stderr
    assert f"{pairs} outputs received and verified" in run.stderr
    assert leftovers(client_dir / "out" / "work" / "classify") == []
    assert {name: (client_dir / "out" / name).read_bytes() for name in RESULTS} == \
        {name: (tmp_path / "shared" / name).read_bytes() for name in RESULTS}
    # Each worker really could not see the client's files, and both took part.
    for log in logs.values():
        assert " over tcp://" in log


def test_auto_leaves_workers_that_see_the_clients_files_on_the_shared_paths(tmp_path: Path, client_dir: Path) -> None:
    files = [write_fasta(client_dir / f"in_{i}.fa", [200] * 10) for i in range(6)]
    with cluster(tmp_path / "cluster") as running:
        running.add_worker("sees", 50_000)
        start_hidden_worker(running, "hidden", client_dir, "--synthetic-speed", "50000")
        running.wait_for_workers(2)
        result = running.embed(client_dir / "out", files, "--min-workers", "2", "--steal")
        sees, hidden = (running.workers[n].log.read_text() for n in ("sees", "hidden"))
    assert result.returncode == 0, result.stderr + sees + hidden
    assert " over tcp://" in hidden and " over tcp://" not in sees
    assert "-> in_" in sees  # the worker that sees the files ran some itself, on the shared paths
    assert sorted(p.name for p in (client_dir / "out").glob("*.json")) == sorted(
        [f"in_{i}_synthetic.json" for i in range(6)] + ["run_report.json"])
    assert leftovers(client_dir / "out") == []


# ------------------------------------------------------- killed mid-transfer


def big_inputs(directory: Path, phase: str) -> list[Path]:
    """A large file whose download (long records) or upload (many records: a large output) takes a while,
    and small ones."""
    big = directory / "big.fa"
    with open(big, "w") as handle:
        if phase == "download":
            line = "ACGT" * 15 + "\n"
            for n in range(96):  # 96 records of 2.4 Mbases: 245 MB in, a few kB out
                handle.write(f">long{n}\n" + line * 40_000)
        else:
            for n in range(700_000):  # 700,000 records of 40 bases: 36 MB in, 80 MB out
                handle.write(f">r{n}\n{'ACGT' * 10}\n")
    return [big, *(write_fasta(directory / f"small_{i}.fa", [300] * 20) for i in range(4))]


def partial(paths: list[Path], full: int) -> bool:
    return any(0 < p.stat().st_size < full for p in paths if p.exists())


@pytest.mark.parametrize("phase", ["download", "upload"])
def test_a_worker_killed_mid_transfer_leaves_no_partial_output_and_another_redoes_the_file(
        tmp_path: Path, client_dir: Path, phase: str) -> None:
    files = big_inputs(client_dir, phase)
    big_output = output_path("synthetic", files[0], client_dir / "out")
    with cluster(tmp_path / "cluster", worker_timeout=1.5) as running:
        shared = running.add_worker("shared", 1e9)
        running.wait_for_workers(1)
        reference = running.embed(tmp_path / "reference", files, "--transfer", "never")
        assert reference.returncode == 0, reference.stderr
        shared.terminate()
        shared.wait(10)
        del running.workers["shared"]  # it left by design: not a failure of the run below
        temporaries = {}
        for name in ("hidden-1", "hidden-2"):
            temporaries[name] = tmp_path / f"tmp-{name}"
            temporaries[name].mkdir()
            start_hidden_worker(running, name, client_dir, "--synthetic-speed", "1e9",
                                env={"TMPDIR": str(temporaries[name])})
        running.wait_for_workers(2)
        embed = running.start_embed(client_dir / "out", files, "--min-workers", "2")

        def holding_big_input() -> list[Path]:
            return list(tmp_path.glob(f"tmp-hidden-*/{TASK}*/input/big.fa"))

        if phase == "download":
            wait_for(lambda: partial(holding_big_input(), files[0].stat().st_size), 120,
                     "a partial download of big.fa", every=0.002)
        else:
            final = (tmp_path / "reference" / big_output.name).stat().st_size
            wait_for(lambda: partial(list((client_dir / "out").glob(f"{UPLOADS}*/*-{big_output.name}")), final),
                     120, "a partial upload of the big output", every=0.002)
        [holder] = {path.parents[2].name.removeprefix("tmp-") for path in holding_big_input()}
        os.kill(running.workers[holder].process.pid, signal.SIGKILL)
        try:
            stdout, stderr = embed.communicate(timeout=RUN_TIMEOUT)
        finally:
            embed.kill()
    assert embed.returncode == 0, stderr
    assert "transfers:" in stderr
    outputs = sorted(p.name for p in (tmp_path / "reference").glob("*_synthetic.json"))
    assert sorted(p.name for p in (client_dir / "out").glob("*_synthetic.json")) == outputs
    for name in outputs:
        assert (client_dir / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert leftovers(client_dir / "out") == []  # no marker, no upload directory, no temporary output
    redone = [r for r in running.records("task_done") if r["file"] == str(files[0]) and r["worker"] != "shared"]
    assert len(redone) == 1 and redone[0]["worker"] != holder


# ---------------------------------------------------------- the shells alone


def test_the_file_server_serves_only_with_the_token_and_publishes_verified_outputs_once(tmp_path: Path) -> None:
    content = os.urandom(5 * 1024 * 1024 + 17)
    source = tmp_path / "in.fa"
    source.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    final = out / "in_synthetic.json"
    server = FileServer(out, "tcp://127.0.0.1:*", [user_key_pair().name], marker=True).start()
    try:
        transfer = server.offer([{"path": str(source), "output": str(final)}])
        assert transfer["server_key"] and transfer["marker"] and Path(transfer["marker"]).parent == out
        channel = Channel(transfer, credentials(environment=False))
        try:
            assert fetch(channel, transfer["token"], "job:0", final.name, tmp_path / "copy", lambda: False) is False
            assert (tmp_path / "copy").read_bytes() == content
            with pytest.raises(TransferError, match=r"\(token\)"):
                fetch(channel, "x" * 43, "job:0", final.name, tmp_path / "stolen", lambda: False)
            with pytest.raises(TransferError, match=r"\(unknown\)"):
                fetch(channel, transfer["token"], "job:1", final.name, tmp_path / "other", lambda: False)
            produced = tmp_path / final.name
            produced.write_text('{"records": []}')
            assert store(channel, transfer["token"], "job:0", produced, lambda: False) is True
            assert final.read_text() == '{"records": []}'
            produced.write_text('{"records": [1]}')
            assert store(channel, transfer["token"], "job:0", produced, lambda: False) is False
            assert final.read_text() == '{"records": []}'
            # A complete output already there: a worker is told so before it fetches anything.
            assert fetch(channel, transfer["token"], "job:0", final.name, tmp_path / "again", lambda: False) is True
        finally:
            channel.close()
    finally:
        server.close()
    assert sorted(p.name for p in out.iterdir()) == [final.name]  # marker and upload directory gone


class DroppingProxy:
    """A TCP proxy to `target` that cuts its connections once, after `after` bytes came back from the target."""

    def __init__(self, target: str, after: int) -> None:
        self.target = target.removeprefix("tcp://").rsplit(":", 1)
        self.after = after
        self.returned = 0  # bytes from the target to the client, over every connection
        self.drops = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, returning: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if returning:
                    self.returned += len(data)
                    if self.returned >= self.after and not self.drops:
                        self.drops += 1
                        for end in self._open:
                            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for end in self._open:
            end.close()


def test_a_download_resumes_from_the_offset_it_holds_after_the_connection_drops(tmp_path: Path) -> None:
    content = os.urandom(64 << 20)
    (tmp_path / "in.fa").write_bytes(content)
    with FileServer(tmp_path / "out", "tcp://127.0.0.1:*", None, marker=False).start() as server:
        transfer = server.offer([{"path": str(tmp_path / "in.fa"), "output": str(tmp_path / "out" / "in.json")}])
        proxy = DroppingProxy(server.address, after=48 << 20)
        channel = Channel({**transfer, "address": proxy.address}, None)
        try:
            fetch(channel, transfer["token"], "job:0", "in.json", tmp_path / "copy", lambda: False)
        finally:
            channel.close()
            proxy.close()
    assert (tmp_path / "copy").read_bytes() == content
    # Resumed from about 48 MiB, not started over (that would have sent 112 MiB).
    assert proxy.drops == 1 and proxy.returned < 1.25 * len(content)


def test_a_new_file_server_sweeps_what_dead_ones_left_and_spares_live_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / f"{UPLOADS}dead").mkdir(parents=True)
    (out / f"{UPLOADS}dead" / "3-a_ESM.pt").write_bytes(b"partial")
    (out / f"{MARKER_PREFIX}dead").write_bytes(b"x" * 32)
    (out / "a_ESM.pt").write_bytes(b"an output")
    with FileServer(out, "tcp://127.0.0.1:*", None, marker=True).start() as live:
        assert live.marker is not None and not (out / f"{UPLOADS}dead").exists()
        assert not (out / f"{MARKER_PREFIX}dead").exists()
        with FileServer(out, "tcp://127.0.0.1:*", None, marker=True).start():
            assert live.upload_dir.is_dir() and live.marker.exists()
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["a_ESM.pt", live.upload_dir.name, live.upload_dir.name + LOCK_SUFFIX, live.marker.name])
    assert [p.name for p in out.iterdir()] == ["a_ESM.pt"]


def test_transfers_with_the_keys_of_a_broker_across_machines_are_encrypted(tmp_path: Path, client_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    broker_public, broker_secret = create_keys(keys, "broker")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = {}
    for name in ("client", "worker"):
        public, secret[name] = create_keys(keys, name)
        (allowed / public.name).write_bytes(public.read_bytes())
    monkeypatch.setenv(SECRET_ENV, str(secret["client"]))
    monkeypatch.setenv(SERVER_KEY_ENV, str(broker_public))
    files = [write_fasta(client_dir / f"in_{i}.fa", [100] * 8) for i in range(3)]
    with LocalCluster(tmp_path / "logs", environment_keys=True) as running:
        running.start_broker("--throughput-log", str(tmp_path / "log.jsonl"), "--curve-secret", str(broker_secret),
                             "--allowed-keys", str(allowed))
        start_hidden_worker(running, "hidden", client_dir, "--synthetic-speed", "1e6",
                            env={SECRET_ENV: str(secret["worker"])})
        running.wait_for_workers(1, "synthetic", timeout=20)
        result = subprocess.run(
            [*command("virnucpro"), "embed", "--broker", running.address, "--stage", "synthetic", "-o",
             str(client_dir / "out"), "--timeout", "30", *map(str, files)], capture_output=True, text=True, timeout=120)
        log = running.workers["hidden"].log.read_text()
    assert result.returncode == 0, result.stderr + log
    assert "transfers: 3 inputs sent" in result.stderr
    assert log.count(" over tcp://") == 3 and log.count("(CURVE)") == 3
