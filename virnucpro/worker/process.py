"""The worker process: registers with the broker, heartbeats, runs assigned files, reports results.

One worker drives one device. Its models are loaded once, before it
registers, and kept across files and jobs. The broker talks to it over a
DEALER socket; the file itself runs on a second thread so that heartbeats
keep flowing while a GPU works for minutes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from broker import protocol
from broker.protocol import ProtocolError
from broker.security import secure_client
from virnucpro.backends.interface import Backend, Cancelled
from virnucpro.stages import is_complete
from virnucpro.worker.config import WorkerConfig, WorkerSetupError, device_name
from virnucpro.worker.gauges import nvml_gauges_for
from virnucpro.worker.publish import publish

logger = logging.getLogger("virnucpro.worker")

MAX_REASON = 2000


class Worker:
    """The worker's socket loop; `run` returns when `stop` is set."""

    def __init__(self, config: WorkerConfig, backends: dict[str, Backend]) -> None:
        self.config = config
        self.backends = backends
        self.gpu = device_name(config)
        self.name = config.name or f"{socket.gethostname()}:{config.device}"
        self.identity = uuid.uuid4().bytes
        self.heartbeat_interval = 1.0
        self._context = zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task")
        self._task: dict[str, Any] | None = None
        self._future: Future | None = None
        self._cancel = threading.Event()
        self._registered = False
        self._last_heard = 0.0
        self._last_register = 0.0
        self._last_heartbeat = 0.0
        self._gauges = nvml_gauges_for(config.device)

    # ----------------------------------------------------------- socket

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a broker that is not there: stale heartbeats must not reach a new one.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        secure_client(self._socket)
        self._socket.connect(self.config.broker)
        self._registered = False
        self._last_heard = time.monotonic()

    def _send(self, kind: str, **fields: Any) -> bool:
        assert self._socket is not None
        try:
            self._socket.send(protocol.encode(kind, **fields), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _register(self) -> None:
        sent = self._send("register", name=self.name, host=socket.gethostname(), gpu=self.gpu,
                          device=self.config.device, stages=sorted(self.backends), pid=os.getpid())
        # Until the connection is up nothing is sent: try again at the next turn of the loop, not in a second.
        if sent:
            self._last_register = time.monotonic()

    # ------------------------------------------------------------- loop

    def run(self, stop: threading.Event) -> None:
        self._connect()
        self._register()
        logger.info("worker %s (%s, stages %s) connecting to %s", self.name, self.gpu,
                    ",".join(sorted(self.backends)), self.config.broker)
        waiting_logged = False
        try:
            while not stop.is_set():
                now = time.monotonic()
                assert self._socket is not None
                if self._socket.poll(50):
                    self._receive_all()
                self._collect_result()
                now = time.monotonic()
                if not self._registered:
                    if now - self._last_register >= 1.0:
                        if not waiting_logged and now - self._last_heard > 2.0:
                            logger.info("waiting for the broker at %s", self.config.broker)
                            waiting_logged = True
                        self._register()
                    continue
                waiting_logged = False
                if now - self._last_heartbeat >= self.heartbeat_interval:
                    self._last_heartbeat = now
                    gauges = self._gauges() if self._gauges else None
                    self._send("heartbeat", task=self._task["task"] if self._task else None,
                               **({"gauges": gauges} if gauges else {}))
                if now - self._last_heard > self.config.broker_timeout:
                    logger.warning("broker at %s silent for %.0f s; reconnecting", self.config.broker,
                                   now - self._last_heard)
                    self._connect()
                    self._register()
        finally:
            self._shutdown()

    def _receive_all(self) -> None:
        assert self._socket is not None
        while True:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = protocol.decode(frame)
            except ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            self._last_heard = time.monotonic()
            self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "registered":
            self._registered = True
            self.heartbeat_interval = message["heartbeat_interval"]
            logger.info("registered as %s, weight %.2f", message["name"], message["weight"])
            if self._task is None:
                self._send("request")
        elif kind == "reregister":
            self._register()
        elif kind == "assign":
            if self._task is not None:
                logger.warning("broker sent %s while %s runs; ignored", message["task"], self._task["task"])
                return
            self._start(message)
        elif kind == "revoke":
            if self._task is not None and self._task["task"] == message["task"]:
                logger.info("task %s revoked", message["task"])
                self._cancel.set()

    # ------------------------------------------------------------ tasks

    def _start(self, assignment: dict[str, Any]) -> None:
        self._task = assignment
        self._cancel.clear()
        self._future = self._executor.submit(self._execute, assignment)

    def _execute(self, assignment: dict[str, Any]) -> dict[str, Any]:
        """Run one file; the result's fields are those of a `done` message."""
        output = Path(assignment["output"])
        if is_complete(output):
            logger.info("%s: output already complete, skipped", output)
            return {"seconds": 0.0, "sequences": 0, "residues": 0, "skipped": True}
        backend = self.backends.get(assignment["stage"])
        if backend is None:
            raise WorkerSetupError(f"this worker does not serve the {assignment['stage']} stage")
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f".{output.name}.{self.identity.hex()[:8]}.tmp")
        started = time.monotonic()
        try:
            sequences, residues = backend.run(Path(assignment["path"]), temporary, self._cancel.is_set)
            seconds = time.monotonic() - started
            first = publish(temporary, output)
        finally:
            temporary.unlink(missing_ok=True)
        logger.info("%s -> %s: %d sequences in %.2f s%s", assignment["path"], output.name, sequences, seconds,
                    "" if first else " (another copy was published first)")
        return {"seconds": seconds, "sequences": sequences, "residues": residues, "skipped": False}

    def _collect_result(self) -> None:
        if self._future is None or not self._future.done():
            return
        task = self._task["task"]
        try:
            result = self._future.result()
        except Cancelled:
            result = None
            self._send("failed", task=task, reason="revoked by the broker")
        except Exception as exc:  # any backend error fails this file, not the worker
            logger.warning("%s failed: %s: %s", self._task["path"], type(exc).__name__, exc)
            self._send("failed", task=task, reason=f"{type(exc).__name__}: {exc}"[:MAX_REASON] or "error")
        else:
            self._send("done", task=task, **result)
        self._task = None
        self._future = None
        if self._registered:
            self._send("request")

    def _shutdown(self) -> None:
        self._cancel.set()
        if self._socket is not None:
            if self._registered:
                self._send("bye")
            self._socket.close(linger=500)
            self._socket = None
        self._executor.shutdown(wait=False, cancel_futures=True)
