"""Request/reply access to a running broker, for clients and the status command."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import zmq

from broker import protocol
from broker.protocol import ErrorCode, ProtocolError
from broker.security import Credentials, credentials

# Said with every "no answer": a broker that does not admit this process's key cannot answer it at all.
NOT_ADMITTED_HINT = ("a broker that does not admit this process's key does not answer either: it must run as "
                     "this user with no key options, or admit the key in $VIRNUCPRO_CURVE_SECRET (whose "
                     "broker key is $VIRNUCPRO_CURVE_SERVER_KEY); --insecure only talks to an --insecure broker")


# Waits between tries while the broker does not answer, as the ZeroMQ guide's Paranoid Pirate worker
# reconnects: 1 s after the first failed try, doubling after each further one, at most 32 s.
RECONNECT_FIRST = 1.0
RECONNECT_MOST = 32.0


def reconnect_waits() -> Iterator[float]:
    """The waits before each next try: 1, 2, 4, ... 32, 32, ... seconds."""
    wait = RECONNECT_FIRST
    while True:
        yield wait
        wait = min(wait * 2, RECONNECT_MOST)


class BrokerUnreachable(RuntimeError):
    """No answer from the broker within the timeout; the message names the address."""


class BrokerError(RuntimeError):
    """The broker answered with an error: `code` says which kind, the message says why in words.

    `code` is None when a client raises it for a failure found on its own side.
    """

    def __init__(self, reason: str, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.code = code


def broker_address(address: str | None = None) -> str:
    """The address to use: the one given, else $VIRNUCPRO_BROKER, else the default."""
    return address or os.environ.get(protocol.ADDRESS_ENV) or protocol.DEFAULT_ADDRESS


class BrokerClient:
    """One DEALER socket, one request in flight at a time."""

    def __init__(self, address: str, timeout: float = 5.0, *, insecure: bool = False,
                 environment_keys: bool = True) -> None:
        """`insecure`: connect in the clear (to an --insecure broker); `environment_keys`: use the keys named in
        $VIRNUCPRO_CURVE_SECRET and $VIRNUCPRO_CURVE_SERVER_KEY when set (otherwise the user's own)."""
        self.address = address
        self.timeout = timeout
        self.insecure = insecure
        self.environment_keys = environment_keys
        self._context: zmq.Context = zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._credentials: Credentials | None = None

    @property
    def credentials(self) -> Credentials | None:
        """The keys this client connects with (None: --insecure); a job's file transfers use them too.

        SecurityError if the keys cannot be used.
        """
        self._connect()
        return self._credentials

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            if self._credentials is None and not self.insecure:
                self._credentials = credentials(environment=self.environment_keys)
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            if self._credentials is not None:
                self._credentials.apply(socket)
            socket.connect(self.address)
            self._socket = socket
        return self._socket

    def _reset(self) -> None:
        # A reply that arrives after its timeout must not be read as the next request's.
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def request(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one message and return the broker's reply; BrokerError for an `error` reply."""
        socket = self._connect()
        socket.send(protocol.encode(kind, **fields))
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(math.ceil(remaining * 1000)):
                self._reset()
                raise BrokerUnreachable(f"no answer from the broker at {self.address} within {timeout:g} s; "
                                        f"{NOT_ADMITTED_HINT}")
            try:
                reply = protocol.decode(socket.recv())
            except ProtocolError:
                continue
            if reply["type"] == "error":
                raise BrokerError(reply["reason"], ErrorCode(reply["code"]))
            return reply

    def wait_until_up(self, timeout: float, since: float | None = None) -> dict[str, Any]:
        """The broker's status, tried again after each silence until it answers or `timeout` has passed.

        `since`: when the broker was last heard (monotonic clock); the wait
        ends `timeout` after it, and the error says how long the broker was
        silent. The count of consecutive failed tries sets the pause between
        them (reconnect_waits); it starts again with every call, that is
        after every time the broker answered.
        """
        since = time.monotonic() if since is None else since
        deadline = since + timeout
        tries = 0
        waits = reconnect_waits()
        while True:
            try:
                return self.request("status", timeout=min(self.timeout, max(0.1, deadline - time.monotonic())))[
                    "status"]
            except BrokerUnreachable:
                tries += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnreachable(
                        f"no broker answered at {self.address} for {time.monotonic() - since:.0f} s ({tries} tries; "
                        f"--timeout {timeout:g} s); start one with `virnucpro-broker --bind {self.address}` or pass "
                        f"--broker ADDR; {NOT_ADMITTED_HINT}"
                    ) from None
                time.sleep(min(next(waits), remaining))

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
