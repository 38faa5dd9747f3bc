"""Input limits on the API (DESIGN §4, §5): body size, PEM blocks, JSON nesting, slow clients,
malformed HTTP. Every refusal carries the JSON error body.

Checks that need no change run against the shared cluster; the body deadline (30 s in
production) is checked in-process, on the same listener wiring, with a short one.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from certfactory import CA
from clusterkit import api
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clustercert.control.http import error_response, read_json
from clustercert.control.listener import ListenerLimits, json_too_deep
from clustercert.control.server import api_config
from clustercert.demo import DemoCluster, free_port
from clustercert.errors import ClusterCertError
from clustercert.tls import ReloadableServerContext

MIB = 1024 * 1024


def _error(response: httpx.Response, status: int, code: str, match: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error_code"] == code
    assert body["description"] == body["message"]
    assert match.lower() in body["description"].lower()


def test_a_body_over_1_mib_is_413_before_it_is_parsed(cluster: DemoCluster) -> None:
    garbage = b"x" * (MIB + 1)  # not JSON: a 400 would mean it was parsed
    headers = {"content-type": "application/json"}
    with api(cluster) as client:
        declared = client.put("/v1/cluster/update_cert", content=garbage, headers=headers)
        _error(declared, 413, "payload_too_large", "limit is 1048576 bytes")
        streamed = client.put(
            "/v1/cluster/update_cert", content=iter([garbage[:MIB], garbage[MIB:]]),
            headers=headers,
        )  # fmt: skip
        _error(streamed, 413, "payload_too_large", "exceeds the limit")
        exactly = client.put("/v1/cluster/update_cert", content=b" " * MIB, headers=headers)
        _error(exactly, 400, "invalid_json")  # 1 MiB itself is allowed in
    with api(cluster, auth=None) as anonymous:
        first = anonymous.put("/v1/cluster/update_cert", content=garbage, headers=headers)
        _error(first, 401, "unauthorized")  # authentication comes first


def test_at_most_16_pem_blocks_per_field(cluster: DemoCluster) -> None:
    leaf = CA.new().issue("redis.example", eku=["serverAuth"])
    with api(cluster) as client:
        for blocks, refused in ((17, True), (16, False)):
            body = {"name": "proxy", "certificate": leaf.cert_pem * blocks, "key": leaf.key_pem}
            answer = client.post("/v1/cluster/certificates/validate", json=body)
            assert answer.status_code == 400 if refused else answer.status_code != 500
            said = answer.json().get("description", "")
            assert ("at most 16 are accepted" in said) is refused, said


def _nested(depth: int) -> str:
    return '{"name": ' + "[" * depth + "]" * depth + "}"


def test_json_nesting_is_bounded(cluster: DemoCluster) -> None:
    headers = {"content-type": "application/json"}
    path = "/v1/cluster/certificates/validate"
    with api(cluster) as client:
        deep = client.post(path, content=_nested(33 - 1), headers=headers)  # 33 with the object
        _error(deep, 400, "invalid_json", "deeper than 32 levels")
        allowed = client.post(path, content=_nested(32 - 1), headers=headers)
        _error(allowed, 400, "invalid_schema")  # parsed, then refused for its shape
        huge = client.post(path, content=_nested(400_000), headers=headers)
        _error(huge, 400, "invalid_json")
        strings = client.post(path, content='{"name": "' + "[" * 100 + '"}', headers=headers)
        _error(strings, 400, "invalid_schema")  # brackets inside strings do not count
    with api(cluster, auth=None) as anonymous:
        first = anonymous.post(path, content=_nested(1000), headers=headers)
        _error(first, 401, "unauthorized")


def test_json_depth_scanner() -> None:
    assert not json_too_deep(b'{"a": [1, {"b": "]]]]["}]}', 3)
    assert json_too_deep(b'{"a": [1, {"b": "]]]]["}]}', 2)
    assert not json_too_deep(b'"\\"[[[["', 1)
    assert json_too_deep(b"[" * 33, 32) and not json_too_deep(b"[" * 32, 32)


# --- raw HTTP over TLS ----------------------------------------------------------------------


def _tls(port: int, ca_file: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return context.wrap_socket(raw)


def _read_all(sock: ssl.SSLSocket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _read_one(sock: ssl.SSLSocket) -> bytes:
    """One response on a kept-alive connection: the head, then content-length bytes."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(next(
        line.split(b":")[1] for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    ))  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw
    return int(head.split()[1]), json.loads(body)


def test_a_client_that_trickles_its_headers_gets_408_and_is_cut_off(cluster: DemoCluster) -> None:
    with _tls(cluster.api_port, cluster.cluster.ca_file) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for _ in range(20):  # one header byte a second, for longer than the 10 s allowed
            try:
                sock.sendall(b"X")
            except OSError:
                break
            sock.settimeout(1)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(5)
        answer += _read_all(sock)
        elapsed = time.monotonic() - start
    status, body = _response(answer)
    assert status == 408 and body["error_code"] == "request_timeout"
    assert "did not arrive within 10 s" in body["description"]
    assert elapsed > 9  # the 10 s deadline fired, not an earlier one (no upper wall-clock bound)


def test_malformed_http_and_oversized_heads_get_a_json_400(cluster: DemoCluster) -> None:
    for request in (
        b"THIS IS NOT HTTP\r\n\r\n",
        b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n",
    ):
        for piece in (8192, len(request)):  # in pieces, and whole: one read may take it all
            with _tls(cluster.api_port, cluster.cluster.ca_file) as sock:
                # The server may answer and close before the whole head is sent.
                with contextlib.suppress(OSError):
                    for start in range(0, len(request), piece):
                        sock.sendall(request[start : start + piece])
                status, body = _response(_read_all(sock))
            assert status == 400 and body["error_code"] == "bad_request"
            assert body["description"].startswith("malformed HTTP request")


# --- the body deadline, on the production listener wiring with short limits ----------------


@pytest.fixture
def short_listener(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ca = CA.new()
    leaf = ca.issue("127.0.0.1", sans=["127.0.0.1"], eku=["serverAuth"])
    cert_file, key_file = leaf.write(tmp_path)
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    app = FastAPI()

    @app.exception_handler(ClusterCertError)
    async def domain_error(request: Request, exc: ClusterCertError) -> JSONResponse:
        return error_response(exc)

    @app.put("/echo")
    async def echo(request: Request) -> Any:
        return {"got": await read_json(request)}

    context = ReloadableServerContext(cert_file, key_file, request_client_cert=True)
    port = free_port()
    limits = ListenerLimits(header_timeout=1.0, body_timeout=1.0, max_json_depth=4)
    server = uvicorn.Server(api_config(app, context.base, "127.0.0.1", port, limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield port, tmp_path / "ca.pem"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_body_that_does_not_arrive_in_time_gets_408(short_listener: tuple[int, Path]) -> None:
    port, ca_file = short_listener
    body = b'{"a": 1}'
    head = (
        b"PUT /echo HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    with _tls(port, ca_file) as sock:
        sock.sendall(head + body)
        sock.settimeout(5)
        status, answer = _response(_read_one(sock))
        assert (status, answer) == (200, {"got": {"a": 1}})  # a prompt client is served

        start = time.monotonic()
        sock.sendall(head + body[:3])  # the rest never comes
        status, answer = _response(_read_all(sock))  # answered, then closed
        elapsed = time.monotonic() - start
    assert status == 408 and answer["error_code"] == "request_timeout"
    assert "did not arrive within 1 s" in answer["description"]
    assert elapsed > 0.9  # the body deadline fired (no upper wall-clock bound)


def test_the_listener_bounds_nesting_and_headers(short_listener: tuple[int, Path]) -> None:
    port, ca_file = short_listener
    context = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context) as client:
        assert client.put("/echo", json=[[[[1]]]]).status_code == 200
        _error(client.put("/echo", json=[[[[[1]]]]]), 400, "invalid_json", "deeper than 4")
    with _tls(port, ca_file) as sock:
        sock.sendall(b"PUT /echo HTTP/1.1\r\n")
        status, answer = _response(_read_all(sock))
    assert status == 408 and answer["error_code"] == "request_timeout"
    with _tls(port, ca_file) as idle:  # says nothing at all after the handshake
        status, answer = _response(_read_all(idle))
    assert status == 408
