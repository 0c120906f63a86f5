"""Who may talk to the broker: CURVE key pairs (the user's own unless told otherwise) and the roles each key may take.

With no key options, the broker and every worker and client of one user
use one key pair kept in the user's private state directory
($XDG_STATE_HOME/virnucpro/keys, else ~/.local/state/virnucpro/keys), made
by whichever process needs it first: the broker serves with it and admits
that key alone, in both roles, so another user's processes get no answer.
Across machines the broker takes its own secret certificate
(--curve-secret) and directories of the public certificates it admits as
workers, as clients, or as both; workers and clients name their secret
certificate and the broker's public one in $VIRNUCPRO_CURVE_SECRET and
$VIRNUCPRO_CURVE_SERVER_KEY. Certificates are ZeroMQ's usual files
(`NAME.key` public, `NAME.key_secret` secret), made with
`virnucpro-broker keys DIR NAME`. `--insecure` turns all of this off.

A key is named by its Z85 text everywhere (40 characters): that is the
User-Id ZeroMQ's authenticator gives each message of a CURVE peer.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SECRET_ENV = "VIRNUCPRO_CURVE_SECRET"
SERVER_KEY_ENV = "VIRNUCPRO_CURVE_SERVER_KEY"
USER_KEY_NAME = "user"
INSECURE_WARNING = ("--insecure: nothing is encrypted and nobody is authenticated; any process that reaches "
                    "{address} can {what}")


class SecurityError(ValueError):
    """A key file or key setting that cannot be used; says which and what to do."""


def state_directory() -> Path:
    """This user's private state: $XDG_STATE_HOME/virnucpro, else ~/.local/state/virnucpro."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "virnucpro"


def user_key_directory() -> Path:
    return state_directory() / "keys"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair (Z85 bytes) and the file the secret came from, for messages."""

    public: bytes
    secret: bytes
    source: Path

    @property
    def name(self) -> str:
        """The public key as text, as ZeroMQ's authenticator names the peer holding it."""
        return self.public.decode("ascii")


@dataclass(frozen=True)
class Credentials:
    """How a worker or client connects to a CURVE broker: its own key pair and the broker's public key."""

    keys: KeyPair
    server_key: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_publickey = self.keys.public
        socket.curve_secretkey = self.keys.secret
        socket.curve_serverkey = self.server_key


@dataclass(frozen=True)
class Admission:
    """The broker's key pair and the public keys it admits in each role (Z85 text)."""

    keys: KeyPair
    workers: frozenset[str]
    clients: frozenset[str]

    def admits(self, key: str | None, role: str) -> bool:
        """Whether the peer holding `key` may send a message of `role` ("worker" or "client")."""
        return key is not None and key in (self.workers if role == "worker" else self.clients)


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair: (DIR/NAME.key to share, DIR/NAME.key_secret to keep, mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public_key, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a readable ZeroMQ certificate ({exc})") from None
    if secret and not secret_key:
        raise SecurityError(f"{path}: holds no secret key; give the NAME.key_secret file")
    return public_key, secret_key


def load_key_pair(path: Path) -> KeyPair:
    """The key pair in a secret certificate that nobody else can read or write."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read this secret certificate ({exc.strerror})") from None
    if info.st_mode & 0o077:
        raise SecurityError(f"{path}: other users can read or write this secret key; run `chmod 600 {path}` "
                            "(and make a new key pair if others may have read it)")
    public, secret = _load(path, secret=True)
    assert secret is not None
    return KeyPair(public, secret, path)


def _check_owned(path: Path, info: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise SecurityError(f"{path}: {what} is a symbolic link; keys are kept only in a real directory of yours: "
                            f"remove the link (virnucpro makes the directory again)")
    if info.st_uid != os.geteuid():
        raise SecurityError(f"{path}: {what} belongs to user id {info.st_uid}, not to you ({os.geteuid()}); "
                            "set XDG_STATE_HOME to a directory of yours, or remove it")


def _check_private(path: Path, what: str, mode: int) -> None:
    """Refuse `path` unless it is ours and no other user may read or write it."""
    info = os.lstat(path)
    _check_owned(path, info, what)
    if info.st_mode & 0o077:
        raise SecurityError(f"{path}: other users can read or write {what}; run `chmod {mode:o} {path}`")


def _check_not_writable_by_others(path: Path, what: str) -> None:
    info = os.lstat(path)
    _check_owned(path, info, what)
    if info.st_mode & 0o022:
        raise SecurityError(f"{path}: other users can write {what}, so they could replace your keys; run "
                            f"`chmod go-w {path}`")


def user_key_pair() -> KeyPair:
    """This user's own key pair, made on first use; SecurityError if its directory or files are not private."""
    directory = user_key_directory()
    state = directory.parent
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SecurityError(f"{state}: cannot make your private state directory ({exc.strerror}); set "
                            "XDG_STATE_HOME to a directory of yours") from None
    _check_not_writable_by_others(state, "your virnucpro state directory")
    if not os.path.lexists(directory):
        _make_user_keys(directory)
    _check_private(directory, "your key directory", 0o700)
    secret = directory / f"{USER_KEY_NAME}.key_secret"
    _check_private(secret, "your secret key", 0o600)
    return load_key_pair(secret)


def _make_user_keys(directory: Path) -> None:
    """Make the key pair in a private staging directory and give it its name in one rename.

    When several processes start at once, one rename wins; the others find
    the name taken (the directory is not empty) and use the winner's keys.
    """
    staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=directory.parent))  # mode 0700
    try:
        create_keys(staging, USER_KEY_NAME)
        try:
            os.rename(staging, directory)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise SecurityError(f"{directory}: cannot make your key pair ({exc.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def credentials(insecure: bool = False, environment: bool = True) -> Credentials | None:
    """How this worker or client connects: the keys named in the environment, else the user's own; None if insecure.

    `environment`: whether $VIRNUCPRO_CURVE_SECRET and $VIRNUCPRO_CURVE_SERVER_KEY
    apply (they name another broker's keys for processes that talk to a broker
    started here with the user's key).
    """
    if insecure:
        return None
    secret_file, server_file = os.environ.get(SECRET_ENV), os.environ.get(SERVER_KEY_ENV)
    if environment and (secret_file or server_file):
        if not (secret_file and server_file):
            raise SecurityError(f"set both ${SECRET_ENV} (your NAME.key_secret) and ${SERVER_KEY_ENV} (the "
                                "broker's .key), or neither (your own key, for a broker of yours with no key options)")
        server_key, _ = _load(Path(server_file), secret=False)
        return Credentials(load_key_pair(Path(secret_file)), server_key)
    keys = user_key_pair()
    return Credentials(keys, keys.public)


def public_keys(directory: Path) -> set[str]:
    """The public keys of the certificates (*.key) in `directory`, which nobody else may change."""
    if not directory.is_dir() or not any(directory.glob("*.key")):
        raise SecurityError(f"{directory}: no public certificates (*.key) to allow; copy each worker's or "
                            "client's NAME.key there")
    for path in [directory, *directory.glob("*.key")]:
        if path.stat().st_mode & 0o022:
            raise SecurityError(f"{path}: other users can write it, so they could admit their own keys; run "
                                f"`chmod go-w {path}`")
    try:
        return {key.decode("ascii") for key in zmq.auth.load_certificates(str(directory))}
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{directory}: holds a certificate that cannot be read ({exc})") from None


def admission(curve_secret: Path | None = None, allowed_keys: Path | None = None,
              allowed_workers: Path | None = None, allowed_clients: Path | None = None) -> Admission:
    """Who the broker admits: with no --curve-secret, the user's own key in both roles, and the keys in the dirs.

    `allowed_keys` are admitted in both roles, `allowed_workers` only as
    workers and `allowed_clients` only as clients.
    """
    if curve_secret is None:
        keys = user_key_pair()
        both = {keys.name}
    else:
        if not (allowed_keys or allowed_workers or allowed_clients):
            raise SecurityError("--curve-secret admits only the keys in --allowed-keys, --allowed-workers or "
                                "--allowed-clients: give at least one directory of public certificates")
        keys = load_key_pair(curve_secret)
        both = set()
    if allowed_keys is not None:
        both |= public_keys(allowed_keys)
    workers = both | (public_keys(allowed_workers) if allowed_workers is not None else set())
    clients = both | (public_keys(allowed_clients) if allowed_clients is not None else set())
    return Admission(keys, frozenset(workers), frozenset(clients))


class _Admitted:
    """ZeroMQ's authenticator asks this whether a CURVE client's key may connect at all."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = frozenset(key.encode("ascii") for key in keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def serve_securely(context: zmq.Context, socket: zmq.Socket, keys: KeyPair, admitted: Iterable[str]) -> ThreadAuthenticator:
    """Make `socket` a CURVE server with `keys` that lets only the `admitted` public keys connect.

    Any other peer fails the handshake and never reaches the application: it
    gets no answer. Each message received from an admitted peer carries its
    key as the frame property "User-Id" (see `sender_key`).
    """
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", _Admitted(admitted))
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_server = True
    return authenticator


def sender_key(frame: zmq.Frame) -> str | None:
    """The public key (Z85 text) of the CURVE peer that sent `frame` (received with copy=False); None if plain."""
    try:
        key = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return key if isinstance(key, str) else None
