"""Console sessions (web/sessions.py) with an injected clock: lifetime, bound, CSRF check.
In-process and fast; the browser tests (web/test_console.py) drive the same store for real."""

from __future__ import annotations

import pytest

from clustercert.web.sessions import CsrfRejected, SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_ends_exactly_at_its_lifetime() -> None:
    clock = Clock()
    store = SessionStore(lifetime=8 * 3600, clock=clock)
    session = store.create("admin@cluster.local")
    clock.now += 8 * 3600 - 1
    assert store.get(session.session_id) == session
    clock.now += 1
    assert store.get(session.session_id) is None
    assert len(store) == 0


def test_every_login_gets_a_fresh_id_and_token_and_logout_ends_only_that_one() -> None:
    store = SessionStore(clock=Clock())
    first, second = store.create("a@x"), store.create("a@x")
    assert first.session_id != second.session_id
    assert first.csrf_token != second.csrf_token
    store.end(first.session_id)
    assert store.get(first.session_id) is None
    assert store.get(second.session_id) == second
    assert store.get(None) is None and store.get("") is None and store.get("forged") is None


def test_the_store_is_bounded_and_drops_the_oldest() -> None:
    store = SessionStore(max_sessions=3, clock=Clock())
    sessions = [store.create(f"u{i}@x") for i in range(5)]
    assert len(store) == 3
    assert [store.get(s.session_id) is not None for s in sessions] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_expired_sessions_are_dropped_when_a_new_one_is_made() -> None:
    clock = Clock()
    store = SessionStore(lifetime=10, clock=clock)
    for i in range(3):
        store.create(f"u{i}@x")
    clock.now += 10
    store.create("late@x")
    assert len(store) == 1


@pytest.mark.parametrize("token", [None, "", "guess", "x" * 43])
def test_a_wrong_csrf_token_is_refused(token: str | None) -> None:
    session = SessionStore(clock=Clock()).create("a@x")
    with pytest.raises(CsrfRejected, match="security token is missing or stale") as caught:
        session.check_csrf(token)
    assert caught.value.http_status == 403
    assert caught.value.error_code == "csrf_token_invalid"
    session.check_csrf(session.csrf_token)
