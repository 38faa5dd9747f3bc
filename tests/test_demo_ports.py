"""The demo's (and the tests') listening ports: chosen below the kernel's ephemeral range, so an
outgoing connection cannot take one between the choice and the listener's bind (an agent then
exited with uvicorn's startup-failure code 3 under load). No process is started here."""

from __future__ import annotations

import socket

import pytest

from clustercert.demo import PORT_SLICE_ENV, _ephemeral_ports, _port_candidates, free_port
from clustercert.errors import ConfigError


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    ephemeral = _ephemeral_ports()
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= p < ephemeral.start for p in ports), sorted(ports)
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in list(ports)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_chosen() -> None:
    """With most of the low range held by listeners, free_port still answers a free one."""
    ephemeral = _ephemeral_ports()
    held: list[socket.socket] = []
    try:
        for port in range(max(1024, ephemeral.start - 20000), ephemeral.start, 7):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()
                continue
            held.append(sock)
        taken = {s.getsockname()[1] for s in held}
        for _ in range(20):
            port = free_port()
            assert port not in taken
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


def test_the_same_port_is_never_answered_twice() -> None:
    """A cluster picks its ports before any process binds them: free_port must not answer a
    port it answered before (at N=30, 90 picks from 20,000 ports collided one run in five)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_each_slice_of_several_processes_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test workers running at once (``CLUSTERCERT_PORT_SLICE=I/N``) pick from disjoint slices
    of the range, so one never picks a port another chose but has not bound yet."""
    slices = []
    for index in range(3):
        monkeypatch.setenv(PORT_SLICE_ENV, f"{index}/3")
        slices.append(_port_candidates())
        assert all(slices[-1].start <= free_port() < slices[-1].stop for _ in range(20))
    assert slices[0].stop <= slices[1].start and slices[1].stop <= slices[2].start
    assert all(len(s) > 6000 for s in slices)


@pytest.mark.parametrize("value", ["2/2", "x/2", "1", "-1/2"])
def test_a_malformed_slice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PORT_SLICE_ENV, value)
    with pytest.raises(ConfigError, match=PORT_SLICE_ENV):
        free_port()
