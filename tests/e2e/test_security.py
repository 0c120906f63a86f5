"""CURVE: an encrypting broker serves the keys it allows and nobody else."""

from __future__ import annotations

import subprocess

import pytest

from broker.cli import is_loopback
from broker.client import BrokerClient, BrokerUnreachable
from broker.security import SECRET_ENV, SERVER_KEY_ENV, SecurityError, create_keys, secure_client
from tests.support.cluster import BROKER, VIRNUCPRO, free_address
from tests.support.fasta import write_fasta
from virnucpro.client.local import LocalCluster


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
    with LocalCluster(tmp_path / "logs", curve=True) as cluster:
        cluster.start_broker("--throughput-log", str(tmp_path / "log.jsonl"),
                             "--curve-secret", str(keys["broker_secret"]), "--allowed-keys", str(keys["allowed"]))
        cluster.start_worker("node1", "--synthetic-speed", "50000", env=allowed_env)
        for name, value in allowed_env.items():
            monkeypatch.setenv(name, value)
        cluster.wait_for_workers(1, "synthetic", timeout=20)
        result = subprocess.run([VIRNUCPRO, "embed", "--broker", cluster.address, "--stage", "synthetic",
                                 "-o", str(tmp_path / "out"), "--timeout", "10", *map(str, files)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        monkeypatch.setenv(SECRET_ENV, str(keys["stranger"]))
        with pytest.raises(BrokerUnreachable), BrokerClient(cluster.address, timeout=1.0) as stranger:
            stranger.request("status")
        monkeypatch.delenv(SECRET_ENV)
        monkeypatch.delenv(SERVER_KEY_ENV)
        with pytest.raises(BrokerUnreachable), BrokerClient(cluster.address, timeout=1.0) as plain:
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


def test_client_with_only_one_key_setting_gets_a_clear_error(monkeypatch, keys):
    import zmq

    monkeypatch.setenv(SECRET_ENV, str(keys["node1"]))
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    try:
        with pytest.raises(SecurityError, match="set both"):
            secure_client(socket)
    finally:
        socket.close(0)


def test_a_public_certificate_is_not_accepted_as_a_secret_one(monkeypatch, keys):
    import zmq

    monkeypatch.setenv(SECRET_ENV, str(keys["broker_public"]))
    monkeypatch.setenv(SERVER_KEY_ENV, str(keys["broker_public"]))
    socket = zmq.Context.instance().socket(zmq.DEALER)
    try:
        with pytest.raises(SecurityError, match="holds no secret key"):
            secure_client(socket)
    finally:
        socket.close(0)


@pytest.mark.parametrize("address,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/b", True), ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.1:5555", False), ("tcp://*:5555", False),
])
def test_loopback_addresses_are_told_apart_from_reachable_ones(address, loopback):
    assert is_loopback(address) is loopback
