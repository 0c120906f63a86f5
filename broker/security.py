"""CURVE encryption for a broker that listens beyond this machine, with an allow-list of keys.

The broker holds a secret certificate and a directory of the public
certificates it accepts (one per worker or client machine). Workers and
clients name their own secret certificate and the broker's public one in
$VIRNUCPRO_CURVE_SECRET and $VIRNUCPRO_CURVE_SERVER_KEY. Certificates are
ZeroMQ's usual files (`NAME.key` public, `NAME.key_secret` secret), made
with `virnucpro-broker keys DIR NAME`.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SECRET_ENV = "VIRNUCPRO_CURVE_SECRET"
SERVER_KEY_ENV = "VIRNUCPRO_CURVE_SERVER_KEY"


class SecurityError(ValueError):
    """A key file or key setting that cannot be used; says which and what to do."""


def create_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair: (DIR/NAME.key to share, DIR/NAME.key_secret to keep)."""
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


def secure_server(context: zmq.Context, socket: zmq.Socket, secret_file: Path, allowed_dir: Path) -> ThreadAuthenticator:
    """Make `socket` a CURVE server that accepts only the public keys in `allowed_dir`."""
    if not allowed_dir.is_dir() or not any(allowed_dir.glob("*.key")):
        raise SecurityError(f"{allowed_dir}: no public certificates (*.key) to allow; copy each worker's NAME.key there")
    public_key, secret_key = _load(secret_file, secret=True)
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(allowed_dir))
    socket.curve_publickey = public_key
    socket.curve_secretkey = secret_key
    socket.curve_server = True
    return authenticator


def secure_client(socket: zmq.Socket) -> bool:
    """Give `socket` CURVE keys from the environment; False (plain socket) if none are set."""
    secret_file, server_file = os.environ.get(SECRET_ENV), os.environ.get(SERVER_KEY_ENV)
    if not secret_file and not server_file:
        return False
    if not (secret_file and server_file):
        raise SecurityError(f"set both ${SECRET_ENV} (your NAME.key_secret) and ${SERVER_KEY_ENV} (the broker's .key)")
    public_key, secret_key = _load(Path(secret_file), secret=True)
    server_key, _ = _load(Path(server_file), secret=False)
    socket.curve_publickey = public_key
    socket.curve_secretkey = secret_key
    socket.curve_serverkey = server_key
    return True
