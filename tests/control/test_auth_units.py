"""Units of the security baseline with injected clocks: the login throttle's schedule, subject
lines, and every branch of client-certificate login (against real certificates)."""

from __future__ import annotations

import base64
import datetime as dt
from asyncio import run

import pytest
from certfactory import CA
from cryptography import x509

from clustercert.control.auth import (
    Authenticator,
    LoginThrottle,
    canonical_subject,
    client_certificate,
    hash_password,
    verify_password,
)
from clustercert.control.state import User
from clustercert.errors import Unauthorized

UTC = dt.UTC


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_schedule() -> None:
    clock = Clock()
    throttle = LoginThrottle(free_per_account=3, base_delay=1.0, max_delay=8.0, clock=clock)
    for _ in range(2):
        throttle.failed("a@x", "h")
        assert throttle.wait_seconds("a@x", "h") == 0
    expected = [1.0, 2.0, 4.0, 8.0, 8.0]  # from the third failure on, doubling, capped
    for delay in expected:
        throttle.failed("a@x", "h")
        assert throttle.wait_seconds("a@x", "h") == pytest.approx(delay)
        assert throttle.wait_seconds("A@X", "h") == pytest.approx(delay)  # case-insensitive
        assert throttle.wait_seconds("a@x", "elsewhere") == 0  # another source is not slowed
        clock.now += delay - 0.01
        assert throttle.wait_seconds("a@x", "h") == pytest.approx(0.01)
        clock.now += 0.01
        assert throttle.wait_seconds("a@x", "h") == 0
    assert throttle.wait_seconds("b@x", "h") == 0  # another account is not slowed
    throttle.succeeded("a@x", "h")
    assert throttle.wait_seconds("a@x", "h") == 0


def test_the_throttle_forgets_after_its_window_and_bounds_its_memory() -> None:
    clock = Clock()
    throttle = LoginThrottle(free_per_account=1, window=60, max_entries=4, clock=clock)
    throttle.failed("a@x", "h")
    assert throttle.failed("a@x", "h") == 2
    assert throttle.wait_seconds("a@x", "h") == 2.0
    clock.now += 61
    assert throttle.wait_seconds("a@x", "h") == 0
    assert throttle.failed("a@x", "h") == 1  # counting starts over
    for i in range(10):
        throttle.failed(f"u{i}@x", "h")
    assert len(throttle) <= 4


def test_the_throttle_per_source_catches_spraying() -> None:
    clock = Clock()
    throttle = LoginThrottle(free_per_account=100, free_per_source=3, clock=clock)
    for i in range(4):
        throttle.failed(f"user{i}@x", "10.0.0.1")
    assert throttle.wait_seconds("fresh@x", "10.0.0.1") == 2.0
    assert throttle.wait_seconds("fresh@x", "10.0.0.2") == 0


def test_the_account_wide_counter_only_holds_back_wrong_answers() -> None:
    clock = Clock()
    throttle = LoginThrottle(free_per_account=100, free_account_wide=3, clock=clock)
    for i in range(4):
        throttle.failed("a@x", f"10.0.0.{i}")
    assert throttle.account_wait("A@x") == 2.0
    assert throttle.wait_seconds("a@x", "10.0.0.9") == 0  # never a refusal
    assert throttle.account_wait("b@x") == 0


def test_an_outsider_guessing_cannot_lock_the_admin_out() -> None:
    """Issue #11: an attacker failing over and over from one address is itself refused with
    growing delays, while the admin's correct password from another address still logs in;
    once every source together has failed too often, wrong answers (only) are held back."""
    clock = Clock()
    admin = User(1, "admin@x", "A", "admin", hash_password("the-right-one"))
    slept: list[float] = []

    async def find_user(email: str) -> User | None:
        return admin if email == "admin@x" else None

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    throttle = LoginThrottle(free_per_account=2, free_account_wide=3, clock=clock)
    auth = Authenticator(find_user, throttle=throttle, clock=clock, sleep=sleep)
    answers = []
    for _ in range(6):
        with pytest.raises(Unauthorized) as refused:
            run(auth.authenticate("admin@x", "guess", source="203.0.113.9"))
        answers.append(refused.value.description)
        clock.now += 0.1  # faster than the attacker's delay allows
    assert answers[:2] == ["wrong username or password"] * 2
    assert all(a.startswith("too many failed logins from this address") for a in answers[2:])
    assert throttle.wait_seconds("admin@x", "203.0.113.9") > 0  # the attacker is delayed
    # The admin, elsewhere, with the right password: in at once, no wait, no refusal.
    assert run(auth.authenticate("admin@x", "the-right-one", source="10.0.0.5")) == admin
    assert slept == []
    # Many sources guessing: past the account-wide budget a wrong answer is held back ...
    for i in range(3):
        with pytest.raises(Unauthorized, match="wrong username or password"):
            run(auth.authenticate("admin@x", f"guess{i}", source=f"198.51.100.{i}"))
    assert slept and slept[-1] > 0
    # ... and a right one is still not.
    held = len(slept)
    auth2 = Authenticator(find_user, throttle=throttle, clock=clock, sleep=sleep)  # no cache
    assert run(auth2.authenticate("admin@x", "the-right-one", source="10.0.0.6")) == admin
    assert len(slept) == held


@pytest.mark.parametrize(
    ("line", "canonical"),
    [
        ("CN=robot,O=Example,C=US", "CN=robot,O=Example,C=US"),
        ("CN=robot, O=Example, C=US", "CN=robot,O=Example,C=US"),
        ("cn=robot; o=Example", "CN=robot,O=Example"),
        ("CN=a\\, b, O=x", "CN=a\\, b,O=x"),
        ("CN=robot+UID=7, O=x", "CN=robot+UID=7,O=x"),
    ],
)
def test_subject_lines_are_canonicalised(line: str, canonical: str) -> None:
    assert canonical_subject(line) == canonical


@pytest.mark.parametrize("line", ["", "robot", "CN=", "=robot", "CN=robot,,O=x", "XX=robot"])
def test_malformed_subject_lines_are_refused(line: str) -> None:
    with pytest.raises(ValueError):
        canonical_subject(line)


def test_password_hashes() -> None:
    stored = hash_password("right")
    assert verify_password("right", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("", "")  # certificate users have no hash
    assert not verify_password("right", "md5$x$y$z$a$b")


def _basic(email: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{email}:{password}".encode()).decode()


def test_basic_login_through_an_asgi_scope() -> None:
    user = User(1, "a@x", "A", "admin", hash_password("pw-right"))

    async def find_user(email: str) -> User | None:
        return user if email == "a@x" else None

    auth = Authenticator(find_user)
    scope = {"headers": [(b"authorization", _basic("a@x", "pw-right").encode())],
             "client": ("10.1.1.1", 5)}  # fmt: skip
    assert run(auth.authenticate_scope(scope)) == user
    with pytest.raises(Unauthorized, match="authentication required"):
        run(auth.authenticate_scope({"headers": [], "client": ("10.1.1.1", 5)}))
    with pytest.raises(Unauthorized, match="malformed"):
        run(auth.authenticate_basic("Basic !!!"))
    with pytest.raises(Unauthorized, match="wrong username or password"):
        run(auth.authenticate_basic(_basic("a@x", "nope")))


# --- client certificates ---------------------------------------------------------------------

NOW = dt.datetime(2026, 6, 1, tzinfo=UTC)


def _robot() -> User:
    return User(7, "robot@x", "R", "cluster_viewer", "", "certificate", "CN=robot")


def _authenticator(bundle: str | None, users: list[User]) -> Authenticator:
    async def nobody(email: str) -> User | None:
        return None

    async def by_subject(subject: str) -> User | None:
        return next((u for u in users if u.certificate_subject_line == subject), None)

    async def trusted() -> str | None:
        return bundle

    return Authenticator(
        nobody, find_certificate_user=by_subject, trusted_client_cas=trusted, wall_clock=lambda: NOW
    )


def _scope(cert_pem: str) -> dict[str, object]:
    return {"headers": [], "client": ("h", 1),
            "extensions": {"tls": {"client_cert_chain": [cert_pem]}}}  # fmt: skip


def test_certificate_login_branches() -> None:
    ca, other = CA.new(now=NOW), CA.new(now=NOW)
    robot = ca.issue("robot", sans=[], eku=["clientAuth"])
    auth = _authenticator(ca.cert_pem + other.cert_pem, [_robot()])
    assert run(auth.authenticate_scope(_scope(robot.cert_pem))) == _robot()

    cases = {
        "not issued by a CA of mtls_trusted_ca": CA.new(now=NOW).issue(
            "robot", sans=[], eku=["clientAuth"]
        ),
        "does not allow clientAuth": ca.issue("robot", sans=[], eku=["serverAuth"]),
        "expired or not yet valid": ca.issue(
            "robot", sans=[], eku=["clientAuth"], not_after=NOW - dt.timedelta(seconds=1)
        ),
        "no user logs in with the certificate subject 'CN=stranger'": ca.issue(
            "stranger", sans=[], eku=["clientAuth"]
        ),
    }
    for message, leaf in cases.items():
        with pytest.raises(Unauthorized, match=message):
            run(auth.authenticate_certificate(leaf.cert))
    no_eku = ca.issue("robot", sans=[], eku=None)
    assert run(auth.authenticate_certificate(no_eku.cert)) == _robot()

    with pytest.raises(Unauthorized, match="login is off"):
        run(_authenticator(None, [_robot()]).authenticate_certificate(robot.cert))
    with pytest.raises(Unauthorized, match="not issued"):
        run(_authenticator(other.cert_pem, [_robot()]).authenticate_certificate(robot.cert))
    # Basic credentials, when sent, decide: a certificate does not override them.
    scope = _scope(robot.cert_pem)
    scope["headers"] = [(b"authorization", _basic("robot@x", "").encode())]
    with pytest.raises(Unauthorized, match="wrong username or password"):
        run(auth.authenticate_scope(scope))


def test_client_certificate_from_the_tls_extension() -> None:
    leaf = CA.new().issue("robot", sans=[], eku=["clientAuth"])
    assert client_certificate({}) is None
    assert client_certificate({"extensions": {"tls": {"client_cert_chain": []}}}) is None
    found = client_certificate(_scope(leaf.cert_pem))
    assert isinstance(found, x509.Certificate) and found == leaf.cert
