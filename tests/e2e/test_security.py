"""Secure by default: only the user's own processes, or the keys admitted in each role, get an answer.

With no key options the broker, its workers and its clients share the
user's own CURVE key pair; another local user gets no answer, and nothing
is written for it. Across machines, keys are admitted as workers, as
clients or as both, and each may do only what its role allows.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from broker import protocol
from broker.cli import is_loopback
from broker.client import BrokerClient, BrokerError, BrokerUnreachable
from broker.protocol import ErrorCode
from broker.security import SECRET_ENV, SERVER_KEY_ENV, create_keys, user_key_pair
from tests.support.cluster import BROKER, VIRNUCPRO, cluster, free_address
from tests.support.fasta import write_fasta
from virnucpro.client.embed import plan_job
from virnucpro.client.local import LocalCluster
from virnucpro.transfer import wire
from virnucpro.transfer.fileserver import FileServer

# Run as another user: what that user's process hears back from the broker, in plain text and with a key of its
# own (the broker's public key is no secret), within `wait` seconds each. Printed as JSON.
ATTACK = r"""
import json, sys, zmq
from broker import protocol
address, server_key, secret_input, *output_dirs = sys.argv[1:]
heard = {}
for mode in ("plain", "curve"):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if mode == "curve":
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
        dealer.curve_serverkey = server_key.encode()
    dealer.connect(address)
    dealer.send(protocol.encode("status"))
    for output_dir in output_dirs:
        dealer.send(protocol.encode("submit", stage="synthetic", output_dir=output_dir, weighted=False, steal=False,
                                    files=[{"path": secret_input, "output": output_dir + "/secret_synthetic.json",
                                            "sequences": 1, "residues": 40}]))
    heard[mode] = [dealer.recv().hex() for _ in range(3) if dealer.poll(3000)]
print(json.dumps(heard))
"""


@pytest.fixture
def another_user(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """The command prefix that runs as user `nobody`, its environment, and a directory of its own (its state, and
    a world-writable directory)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to act as another local user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this machine has no user nobody")
    base = Path(tempfile.mkdtemp(prefix="virnucpro-other-user-"))  # under /tmp: not inside root's 0700 tmp_path
    base.chmod(0o755)
    (base / "public").mkdir(mode=0o777)
    (base / "public").chmod(0o777)
    (base / "state").mkdir()
    os.chown(base / "state", nobody.pw_uid, nobody.pw_gid)
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    env = {**{k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SERVER_KEY_ENV)},
           "HOME": str(base / "state"), "XDG_STATE_HOME": str(base / "state")}
    try:
        yield prefix, env, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_another_local_user_gets_no_answer_and_nothing_is_written(tmp_path: Path, another_user) -> None:
    prefix, env, base = another_user
    secret_input = write_fasta(tmp_path / "root-only.fa", [40])  # tmp_path is root's, mode 0700
    public, private = base / "public", tmp_path / "private"
    private.mkdir(mode=0o700)
    readable = write_fasta(public / "readable.fa", [40])
    with cluster(tmp_path / "c") as c:
        c.add_worker("root-worker", 1e6)
        c.wait_for_workers(1)
        raw = subprocess.run([*prefix, sys.executable, "-c", ATTACK, c.address, user_key_pair().name, str(secret_input),
                              str(public), str(private)], capture_output=True, text=True, timeout=60, cwd=base, env=env)
        embed = subprocess.run([*prefix, VIRNUCPRO, "embed", "--broker", c.address, "--stage", "synthetic", "-o",
                                str(public / "out"), "--timeout", "3", str(readable)],
                               capture_output=True, text=True, timeout=60, cwd=base, env=env)
        time.sleep(2)  # long enough for the worker to have run any job that was let in
        status = c.status()
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == {"plain": [], "curve": []}
    assert embed.returncode == 1 and "no broker answered" in embed.stderr
    assert status["jobs"] == []
    assert sorted(p.name for p in public.iterdir()) == ["out", "readable.fa"]
    assert list((public / "out").iterdir()) == [] and list(private.iterdir()) == []


@pytest.fixture
def role_keys(tmp_path: Path) -> dict[str, Path]:
    """A broker key pair, a worker key (node1) admitted as a worker, and two client keys (alice, bob) as clients."""
    keys: dict[str, Path] = {}
    keys["broker_public"], keys["broker"] = create_keys(tmp_path / "keys", "broker")
    for role, names in (("workers", ("node1",)), ("clients", ("alice", "bob"))):
        allowed = tmp_path / f"allowed-{role}"
        allowed.mkdir()
        for name in names:
            public, keys[name] = create_keys(tmp_path / "keys", name)
            shutil.copy(public, allowed / public.name)
        keys[f"allowed-{role}"] = allowed
    return keys


def client_as(name: str, keys: dict[str, Path], address: str, monkeypatch: pytest.MonkeyPatch) -> BrokerClient:
    """A client that connects with `name`'s key (read once, as it connects)."""
    monkeypatch.setenv(SECRET_ENV, str(keys[name]))
    monkeypatch.setenv(SERVER_KEY_ENV, str(keys["broker_public"]))
    client = BrokerClient(address, timeout=10.0)
    assert client.credentials is not None
    return client


def forbidden(client: BrokerClient, kind: str, **fields: object) -> str:
    with pytest.raises(BrokerError) as refused:
        client.request(kind, **fields)
    assert refused.value.code is ErrorCode.FORBIDDEN
    return str(refused.value)


def test_each_key_may_do_only_what_its_role_allows_and_sees_only_its_own_jobs_paths(
        tmp_path: Path, role_keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    files = [write_fasta(tmp_path / f"in{i}.fa", [100] * 40) for i in range(2)]  # 4,000 residues: 20 s each
    plan = plan_job("synthetic", files, tmp_path / "out")
    worker_env = {SECRET_ENV: str(role_keys["node1"]), SERVER_KEY_ENV: str(role_keys["broker_public"])}
    with LocalCluster(tmp_path / "logs", environment_keys=True) as running:
        running.start_broker("--throughput-log", str(tmp_path / "log.jsonl"), "--curve-secret", str(role_keys["broker"]),
                             "--allowed-workers", str(role_keys["allowed-workers"]),
                             "--allowed-clients", str(role_keys["allowed-clients"]))
        running.start_worker("node1", "--synthetic-speed", "200", env=worker_env)
        alice = client_as("alice", role_keys, running.address, monkeypatch)
        running.wait_for_workers(1, "synthetic", timeout=30)
        job = alice.request("submit", stage="synthetic", output_dir=str(plan.output_dir), files=plan.todo,
                            weighted=False, steal=False)["job"]
        deadline = time.monotonic() + 30
        while not (mine := alice.request("status")["status"])["workers"][0]["running"]:
            assert time.monotonic() < deadline, "the worker never started the job's first file"
            time.sleep(0.1)

        worker_key = client_as("node1", role_keys, running.address, monkeypatch)
        refusals = [forbidden(worker_key, "submit", stage="synthetic", output_dir=str(plan.output_dir),
                              files=plan.todo, weighted=False, steal=False),
                    forbidden(worker_key, "cancel", job=job), forbidden(worker_key, "job", job=job),
                    forbidden(worker_key, "status")]
        bob = client_as("bob", role_keys, running.address, monkeypatch)
        theirs = bob.request("status")["status"]
        bob_refusals = [forbidden(bob, "job", job=job), forbidden(bob, "cancel", job=job)]
        alice_job = alice.request("job", job=job)

        intruder = running.start_worker("intruder", "--synthetic-speed", "200",
                                        env={SECRET_ENV: str(role_keys["alice"]),
                                             SERVER_KEY_ENV: str(role_keys["broker_public"])})
        intruder.process.wait(30)
        cancelled = alice.request("cancel", job=job)
        for client in (alice, worker_key, bob):
            client.close()
    assert all("is not admitted as a client" in reason for reason in refusals)
    assert all(f"job {job} was submitted with another key" in reason for reason in bob_refusals)
    [alices] = mine["jobs"]
    assert alices["yours"] is True and mine["workers"][0]["running"] in {f["path"] for f in plan.todo}
    [bobs_view] = theirs["jobs"]
    assert (bobs_view["job"], bobs_view["yours"], bobs_view["files"]) == (job, False, 2)
    assert theirs["workers"][0]["running"] is None and theirs["workers"][0]["running_job"] == job
    assert alice_job["state"] == "running" and cancelled["state"] == "cancelled"
    assert intruder.process.returncode == 78
    assert "is not admitted as a worker" in intruder.log.read_text()


def test_insecure_keeps_the_open_mode_with_a_warning_at_start_up(tmp_path: Path) -> None:
    files = [write_fasta(tmp_path / f"in{i}.fa", [100] * 5) for i in range(3)]
    with LocalCluster(tmp_path / "logs", insecure=True) as running:
        running.start_broker("--throughput-log", str(tmp_path / "log.jsonl"))
        running.start_worker("open", "--synthetic-speed", "50000")
        running.wait_for_workers(1, "synthetic", timeout=30)
        result = subprocess.run([VIRNUCPRO, "embed", "--insecure", "--broker", running.address, "--stage",
                                 "synthetic", "-o", str(tmp_path / "out"), "--timeout", "20", *map(str, files)],
                                capture_output=True, text=True, timeout=120)
        # Open to anyone: a socket with no key at all is answered.
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(running.address)
        dealer.send(protocol.encode("status"))
        answered = dealer.poll(10_000)
        dealer.close()
        broker_log = running.broker.log.read_text() if running.broker else ""
        worker_log = running.workers["open"].log.read_text()
    assert result.returncode == 0, result.stderr
    assert answered
    for text in (result.stderr, broker_log, worker_log):
        assert "warning: --insecure: nothing is encrypted and nobody is authenticated" in " ".join(text.split())
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == 3


def test_the_file_server_lets_in_only_keys_the_broker_admits_as_workers_even_with_the_token(tmp_path: Path) -> None:
    source = write_fasta(tmp_path / "in.fa", [40])
    out = tmp_path / "out"
    worker_public, worker_secret = zmq.curve_keypair()
    with FileServer(out, "tcp://127.0.0.1:*", [worker_public.decode()], marker=False).start() as server:
        transfer = server.offer([{"path": str(source), "output": str(out / "in_synthetic.json")}])
        heard = {}
        # The admitted key first, waited for as long as a loaded machine needs: the server is then surely up, so
        # the stranger's silence over the next 5 s is the server's refusal, not its slowness.
        for name, (public, secret), wait_ms in (("worker", (worker_public, worker_secret), 60_000),
                                                ("stranger", zmq.curve_keypair(), 5000)):
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.curve_publickey, dealer.curve_secretkey = public, secret
            dealer.curve_serverkey = transfer["server_key"].encode()
            dealer.connect(transfer["address"])
            dealer.send_multipart(wire.encode("stat", token=transfer["token"], task="job:0", output="in_synthetic.json"))
            heard[name] = wire.decode(dealer.recv_multipart(), wire.REPLIES)[0]["type"] if dealer.poll(wait_ms) else None
            dealer.close()
    assert heard == {"stranger": None, "worker": "input"}


@pytest.fixture
def keys(tmp_path):
    allowed = tmp_path / "allowed"
    broker_public, broker_secret = create_keys(tmp_path / "broker", "broker")
    worker_public, worker_secret = create_keys(tmp_path / "node1", "node1")
    _, stranger_secret = create_keys(tmp_path / "stranger", "stranger")
    allowed.mkdir()
    (allowed / "node1.key").write_bytes(worker_public.read_bytes())
    return {"broker_public": broker_public, "broker_secret": broker_secret, "allowed": allowed,
            "node1": worker_secret, "stranger": stranger_secret}


def test_curve_broker_runs_jobs_for_allowed_keys_and_ignores_others(tmp_path, keys, monkeypatch):
    files = [write_fasta(tmp_path / f"in{i}.fa", [100] * 5) for i in range(3)]
    allowed_env = {SECRET_ENV: str(keys["node1"]), SERVER_KEY_ENV: str(keys["broker_public"])}
    with LocalCluster(tmp_path / "logs", environment_keys=True) as running:
        running.start_broker("--throughput-log", str(tmp_path / "log.jsonl"),
                             "--curve-secret", str(keys["broker_secret"]), "--allowed-keys", str(keys["allowed"]))
        running.start_worker("node1", "--synthetic-speed", "50000", env=allowed_env)
        for name, value in allowed_env.items():
            monkeypatch.setenv(name, value)
        running.wait_for_workers(1, "synthetic", timeout=20)
        result = subprocess.run([VIRNUCPRO, "embed", "--broker", running.address, "--stage", "synthetic",
                                 "-o", str(tmp_path / "out"), "--timeout", "10", *map(str, files)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        monkeypatch.setenv(SECRET_ENV, str(keys["stranger"]))
        with pytest.raises(BrokerUnreachable), BrokerClient(running.address, timeout=1.0) as stranger:
            stranger.request("status")
        monkeypatch.delenv(SECRET_ENV)
        monkeypatch.delenv(SERVER_KEY_ENV)
        with pytest.raises(BrokerUnreachable), BrokerClient(running.address, timeout=1.0) as own_key:
            own_key.request("status")  # the user's own key: not admitted by a broker with --curve-secret
        with pytest.raises(BrokerUnreachable), BrokerClient(running.address, timeout=1.0, insecure=True) as plain:
            plain.request("status")
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == 3


def test_broker_refuses_to_start_without_allowed_keys(tmp_path, keys):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([BROKER, "--bind", free_address(), "--throughput-log", str(tmp_path / "log.jsonl"),
                             "--curve-secret", str(keys["broker_secret"]), "--allowed-keys", str(empty)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no public certificates (*.key) to allow" in result.stderr


def test_insecure_and_key_options_together_are_a_usage_error(tmp_path, keys):
    result = subprocess.run([BROKER, "--bind", free_address(), "--insecure", "--allowed-workers", str(keys["allowed"])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--insecure admits everyone: drop it, or drop --allowed-workers" in result.stderr


@pytest.mark.parametrize("address,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/b", True), ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.1:5555", False), ("tcp://*:5555", False),
])
def test_loopback_addresses_are_told_apart_from_reachable_ones(address, loopback):
    assert is_loopback(address) is loopback
