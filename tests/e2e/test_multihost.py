"""Two hosts built from network namespaces: a CURVE broker on one, a worker on the other."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest

from broker.security import SECRET_ENV, SERVER_KEY_ENV, create_keys
from tests.support.cluster import BROKER, VIRNUCPRO
from tests.support.fasta import write_fasta

HEAD, NODE = "10.213.7.1", "10.213.7.2"  # exist only inside the namespaces this test creates


def spawn(argv: list[str], log) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build network namespaces")
    tag = uuid.uuid4().hex[:6]
    head, node = f"vnp-head-{tag}", f"vnp-node-{tag}"
    try:
        ip("netns", "add", head)
        ip("netns", "add", node)
        ip("link", "add", f"vh{tag}", "type", "veth", "peer", "name", f"vn{tag}")
        ip("link", "set", f"vh{tag}", "netns", head)
        ip("link", "set", f"vn{tag}", "netns", node)
        for namespace, device, address in ((head, f"vh{tag}", HEAD), (node, f"vn{tag}", NODE)):
            ip("-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for namespace in (head, node):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"network namespaces unavailable here: {exc.stderr.decode().strip()}")
    try:
        yield head, node
    finally:
        for namespace in (head, node):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def test_worker_on_another_host_serves_an_encrypting_broker(tmp_path, two_hosts):
    head, node = two_hosts
    broker_public, broker_secret = create_keys(tmp_path / "keys", "broker")
    node_public, node_secret = create_keys(tmp_path / "keys", "node")
    head_public, head_secret = create_keys(tmp_path / "keys", "head")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for public in (node_public, head_public):
        (allowed / public.name).write_bytes(public.read_bytes())
    files = [write_fasta(tmp_path / f"shared_{i}.fa", [100] * 8) for i in range(4)]
    address = f"tcp://{HEAD}:5555"
    processes = []
    try:
        processes.append(spawn(
            ["ip", "netns", "exec", head, BROKER, "--bind", address, "--throughput-log", str(tmp_path / "log.jsonl"),
             "--curve-secret", str(broker_secret), "--allowed-keys", str(allowed)], tmp_path / "broker.log"))
        processes.append(spawn(
            ["ip", "netns", "exec", node, "env", f"{SECRET_ENV}={node_secret}", f"{SERVER_KEY_ENV}={broker_public}",
             VIRNUCPRO, "worker", "--broker", address, "--synthetic-speed", "20000", "--name", "remote"],
            tmp_path / "worker.log"))
        result = subprocess.run(
            ["ip", "netns", "exec", head, "env", f"{SECRET_ENV}={head_secret}", f"{SERVER_KEY_ENV}={broker_public}",
             VIRNUCPRO, "embed", "--broker", address, "--stage", "synthetic", "-o", str(tmp_path / "out"),
             "--timeout", "20", *map(str, files)],
            capture_output=True, text=True, timeout=90,
        )
    finally:
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 5
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
    assert result.returncode == 0, result.stderr + (tmp_path / "worker.log").read_text()
    assert len(list((tmp_path / "out").glob("*_synthetic.json"))) == 4
    assert "remote" in result.stderr
