"""The user's own key pair: made once, race-free, in a private directory; refused when others could read or change it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from broker.security import (
    SECRET_ENV,
    SERVER_KEY_ENV,
    SecurityError,
    admission,
    create_keys,
    credentials,
    user_key_directory,
    user_key_pair,
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh XDG_STATE_HOME, with no key options in the environment."""
    home = tmp_path / "state"
    home.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    return home / "virnucpro"


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o777


def test_the_first_use_makes_a_private_key_pair_that_later_uses_read_back(state: Path) -> None:
    made = user_key_pair()
    assert user_key_directory() == state / "keys"
    assert (mode(state), mode(state / "keys"), mode(made.source)) == (0o700, 0o700, 0o600)
    assert user_key_pair() == made
    assert credentials() is not None and credentials().server_key == made.public  # type: ignore[union-attr]


def test_processes_starting_at_once_all_end_up_with_one_key_pair(state: Path) -> None:
    start = threading.Barrier(8)
    found: list[bytes] = []

    def first_use() -> None:
        start.wait()
        found.append(user_key_pair().public)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert sorted(p.name for p in state.iterdir()) == ["keys"]  # no staging directory left behind


def test_a_key_directory_others_can_read_is_refused_with_the_fix(state: Path) -> None:
    user_key_pair()
    (state / "keys").chmod(0o755)
    with pytest.raises(SecurityError, match=rf"other users can read or write your key directory; run `chmod 700 "
                                            rf"{state / 'keys'}`"):
        user_key_pair()


def test_a_secret_key_others_can_read_is_refused_with_the_fix(state: Path) -> None:
    secret = user_key_pair().source
    secret.chmod(0o644)
    with pytest.raises(SecurityError, match=rf"run `chmod 600 {secret}`"):
        user_key_pair()


def test_a_state_directory_others_can_write_is_refused_with_the_fix(state: Path) -> None:
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(SecurityError, match=rf"could replace your keys; run `chmod go-w {state}`"):
        user_key_pair()
    assert not (state / "keys").exists()


def test_a_key_directory_that_is_a_link_is_refused(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    (state / "keys").symlink_to(elsewhere)
    with pytest.raises(SecurityError, match="is a symbolic link"):
        user_key_pair()


def test_a_client_with_only_one_key_setting_gets_a_clear_error(state: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = create_keys(tmp_path / "node", "node")
    monkeypatch.setenv(SECRET_ENV, str(secret))
    with pytest.raises(SecurityError, match="set both"):
        credentials()
    assert credentials(environment=False) is not None  # a broker started here: the user's own key
    assert credentials(insecure=True) is None


def test_a_public_certificate_is_not_accepted_as_a_secret_one(state: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    public, _ = create_keys(tmp_path / "broker", "broker")
    public.chmod(0o600)
    monkeypatch.setenv(SECRET_ENV, str(public))
    monkeypatch.setenv(SERVER_KEY_ENV, str(public))
    with pytest.raises(SecurityError, match="holds no secret key"):
        credentials()


def test_roles_come_from_the_directories_and_the_users_own_key_takes_both(state: Path, tmp_path: Path) -> None:
    workers, clients, both = tmp_path / "workers", tmp_path / "clients", tmp_path / "both"
    worker, _ = create_keys(workers, "node1")
    client, _ = create_keys(clients, "laptop")
    shared, _ = create_keys(both, "head")
    for directory in (workers, clients, both):
        for secret in directory.glob("*.key_secret"):
            secret.unlink()
    mine = user_key_pair().name
    names = {path: path.read_text().split('public-key = "')[1].split('"')[0] for path in (worker, client, shared)}
    admitted = admission(allowed_keys=both, allowed_workers=workers, allowed_clients=clients)
    assert admitted.workers == {mine, names[worker], names[shared]}
    assert admitted.clients == {mine, names[client], names[shared]}
    assert admitted.admits(names[worker], "worker") and not admitted.admits(names[worker], "client")
    assert admitted.admits(names[client], "client") and not admitted.admits(names[client], "worker")
    assert not admitted.admits(None, "client")
    _, broker_secret = create_keys(tmp_path / "broker", "broker")
    explicit = admission(broker_secret, allowed_workers=workers)
    assert explicit.workers == {names[worker]} and explicit.clients == frozenset()  # no own key with --curve-secret
    with pytest.raises(SecurityError, match="give at least one directory"):
        admission(broker_secret)


def test_an_allowed_keys_directory_others_can_write_is_refused(state: Path, tmp_path: Path) -> None:
    create_keys(tmp_path / "allowed", "node1")
    (tmp_path / "allowed").chmod(0o777)
    with pytest.raises(SecurityError, match="so they could admit their own keys"):
        admission(allowed_workers=tmp_path / "allowed")
