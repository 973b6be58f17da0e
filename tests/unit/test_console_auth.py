"""The console's sign-in codes and sessions on a fake clock: single use, expiry, sign-out."""

from __future__ import annotations

import datetime as dt

import pytest

from authority.clock import FakeClock
from authority.console.auth import ConsoleAuth, Operator, digest
from authority.errors import InvalidArgument


def _auth() -> tuple[ConsoleAuth, FakeClock]:
    clock = FakeClock()
    return ConsoleAuth(clock, dt.timedelta(hours=1)), clock


def test_a_code_signs_in_once() -> None:
    auth, _ = _auth()
    code, _ = auth.mint_code("alice")
    operator = auth.redeem(code)
    assert operator == Operator("alice", "link")
    assert auth.redeem(code) is None


def test_a_code_is_kept_only_as_its_hash() -> None:
    auth, _ = _auth()
    code, _ = auth.mint_code("alice")
    assert code not in repr(vars(auth))
    assert code not in repr(auth._codes)
    assert digest(code) in auth._codes


def test_a_code_expires() -> None:
    auth, clock = _auth()
    code, expires = auth.mint_code("alice", dt.timedelta(minutes=2))
    clock.set(expires)
    assert auth.redeem(code) is None


@pytest.mark.parametrize("ttl", [dt.timedelta(minutes=16), dt.timedelta(milliseconds=10)])
def test_a_code_lives_1s_to_15m(ttl: dt.timedelta) -> None:
    auth, _ = _auth()
    with pytest.raises(InvalidArgument):
        auth.mint_code("alice", ttl)


@pytest.mark.parametrize("name", ["", "a" * 65, "<b>", "al ice", "alice\n"])
def test_operator_names_are_plain(name: str) -> None:
    auth, _ = _auth()
    with pytest.raises(InvalidArgument):
        auth.mint_code(name)


def test_a_session_expires_and_signs_out() -> None:
    auth, clock = _auth()
    value, session = auth.open_session(Operator("alice", "link"))
    assert auth.session(value) == session
    assert auth.session(value + "x") is None
    clock.advance(dt.timedelta(minutes=59))
    assert auth.session(value) == session
    clock.advance(dt.timedelta(minutes=1))
    assert auth.session(value) is None
    value, _ = auth.open_session(Operator("alice", "link"))
    auth.close(value)
    assert auth.session(value) is None


def test_close_all_ends_an_operators_sessions() -> None:
    auth, _ = _auth()
    a1, _ = auth.open_session(Operator("alice", "link"))
    a2, _ = auth.open_session(Operator("alice", "link"))
    b, _ = auth.open_session(Operator("bob", "link"))
    assert auth.close_all("alice") == 2
    assert auth.session(a1) is None
    assert auth.session(a2) is None
    assert auth.session(b) is not None


def test_csrf_is_the_sessions_own() -> None:
    auth, _ = _auth()
    _, mine = auth.open_session(Operator("alice", "link"))
    _, other = auth.open_session(Operator("alice", "link"))
    assert auth.csrf_ok(mine, mine.csrf)
    assert not auth.csrf_ok(mine, other.csrf)
    assert not auth.csrf_ok(mine, "")
