"""A client's-eye check: would a verifying TLS peer accept this certificate?

Validation (DESIGN §5) applies our rules; this module asks OpenSSL, the TLS library of every
service we configure, the question that matters after ``200``: does a real handshake succeed?
It runs one handshake entirely in memory (``ssl.MemoryBIO`` and ``SSLObject``, no sockets):

- :func:`refusal_as_server`: the upload is a server's chain and key; a client trusting only the
  chain's trust anchor verifies it with host-name checking (OpenSSL purpose ``sslserver``).
- :func:`refusal_as_client`: the upload is a client certificate; a server that requires client
  certificates and trusts only the anchor verifies it (purpose ``sslclient``).

Each returns None when the handshake completes, else a :class:`Refusal` with OpenSSL's reason.
Time is not this module's question: certificate validity was judged at the validation time by
the rules before this one, so verification runs with OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME``
(see docs/decisions.md). Shared and top-level: it imports neither ``agent`` nor ``control``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clustercert import pki

__all__ = ["Refusal", "refusal_as_client", "refusal_as_server"]

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); Python's ssl module has no name for it but
# passes the bits of verify_flags through to X509_VERIFY_PARAM_set_flags.
_NO_CHECK_TIME = ssl.VerifyFlags(0x200000)

# A TLS 1.3 handshake takes two round trips between the objects, TLS 1.2 three; more means a bug.
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class Refusal:
    """Why a handshake failed: ``side`` that failed ("client" or "server") and OpenSSL's
    ``reason`` (e.g. "unsuitable certificate purpose")."""

    side: str
    reason: str


def refusal_as_server(
    chain_pem: str, key_pem: str, anchor_pem: str, server_name: str | None
) -> Refusal | None:
    """Serve ``chain_pem``/``key_pem`` to a verifying client that trusts only ``anchor_pem``.

    With ``server_name`` the client checks the host name (and sends it as SNI unless it is an
    IP address), as every service client does; None skips that check.
    """
    try:
        client = _verifying_client(anchor_pem, check_hostname=server_name is not None)
    except ssl.SSLError as exc:
        return Refusal("client", f"cannot load the trust anchor: {_reason(exc)}")
    try:
        server = _serving(chain_pem, key_pem)
    except ssl.SSLError as exc:
        return Refusal("server", _reason(exc))
    return _handshake(client, server, server_name)


def refusal_as_client(chain_pem: str, key_pem: str, anchor_pem: str) -> Refusal | None:
    """Present ``chain_pem``/``key_pem`` as the client certificate to a server that requires
    one and trusts only ``anchor_pem``."""
    try:
        server = _verifying_server(anchor_pem)
    except ssl.SSLError as exc:
        return Refusal("server", f"cannot load the trust anchor: {_reason(exc)}")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    # Only the upload is under test: the throwaway server identity is not verified.
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    try:
        _load_pair(client, chain_pem, key_pem)
    except ssl.SSLError as exc:
        return Refusal("client", _reason(exc))
    return _handshake(client, server, None)


# The verifying side depends only on the anchor, and uploads mostly end in the same few (the
# internal CA, a company root): reuse its context. Contexts are only read after this, and
# OpenSSL lets threads create connections from one context concurrently.
_CACHED_ANCHORS = 32


@functools.lru_cache(maxsize=_CACHED_ANCHORS)
def _verifying_client(anchor_pem: str, *, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _trust_only(ctx, anchor_pem)
    ctx.check_hostname = check_hostname
    return ctx


@functools.lru_cache(maxsize=_CACHED_ANCHORS)
def _verifying_server(anchor_pem: str) -> ssl.SSLContext:
    identity = _throwaway_identity()
    ctx = _serving(identity.cert_pem, identity.key_pem)
    _trust_only(ctx, anchor_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _trust_only(ctx: ssl.SSLContext, anchor_pem: str) -> None:
    """Verify peers against ``anchor_pem`` alone; it may be an intermediate (the trust store may
    hold one), and time is not checked (module docstring)."""
    ctx.load_verify_locations(cadata=anchor_pem)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | _NO_CHECK_TIME


def _serving(chain_pem: str, key_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0  # nothing is resumed: skip making TLS 1.3 session tickets
    _load_pair(ctx, chain_pem, key_pem)
    return ctx


def _load_pair(ctx: ssl.SSLContext, chain_pem: str, key_pem: str) -> None:
    with _readable(chain_pem) as chain_path, _readable(key_pem) as key_path:
        ctx.load_cert_chain(chain_path, key_path)


@contextlib.contextmanager
def _readable(text: str) -> Iterator[str]:
    """A path OpenSSL can read ``text`` from (``load_cert_chain`` takes paths only).

    On Linux an anonymous memory file, so the uploaded key never touches a disk; elsewhere a
    file in a private temporary directory, removed on exit.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("clustercert-handshake", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode("utf-8"))
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="clustercert-handshake-") as directory:
        path = Path(directory) / "pem"
        path.touch(mode=0o600)
        path.write_text(text)
        yield str(path)


@dataclass(frozen=True)
class _Identity:
    cert_pem: str
    key_pem: str


@functools.cache
def _throwaway_identity() -> _Identity:
    """The server side of a client-certificate check: made once per process, never verified,
    so its validity window is fixed rather than read from the clock."""
    ca = pki.new_ca("clustercert handshake check", now=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    pair = pki.issue_leaf(
        ca,
        "handshake-check.invalid",
        sans=["handshake-check.invalid"],
        eku=["serverAuth"],
        now=dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        validity=dt.timedelta(days=36_500),
    )
    return _Identity(pair.cert_pem, pair.key_pem)


def _handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_name: str | None
) -> Refusal | None:
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        client = client_ctx.wrap_bio(to_client, from_client, server_hostname=server_name)
    except ValueError as exc:  # a SAN Python cannot use as a host name (IDNA rules)
        return Refusal("client", f"cannot connect to {server_name!r}: {exc}")
    server = server_ctx.wrap_bio(to_server, from_server, server_side=True)
    sides = {"client": client, "server": server}
    done: set[str] = set()
    for _ in range(_MAX_ROUNDS):
        for side, obj in sides.items():
            if side in done:
                continue
            try:
                obj.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return Refusal(side, _reason(exc))
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if len(done) == len(sides):
            return None
    raise RuntimeError(f"in-memory TLS handshake did not finish in {_MAX_ROUNDS} rounds")


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return str(exc.reason or exc)
