"""A real HTTPS webhook receiver on loopback for the alert tests (certificate from certfactory).

It answers each POST with the next status of its script (then 200), and records every body.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from certfactory import CA

__all__ = ["Receiver", "webhook_receiver"]


@dataclass
class Receiver:
    url: str
    ca_file: Path  # trust this to verify the receiver
    script: list[int]  # statuses still to answer, in order; 200 once empty
    received: list[dict[str, Any]] = field(default_factory=list)  # every body, answered or not
    accepted: list[dict[str, Any]] = field(default_factory=list)  # bodies answered 2xx
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The accepted bodies once there are ``count`` of them (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.accepted) >= count:
                    return list(self.accepted)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.accepted)} of {count} webhook calls arrived: {self}")


@contextlib.contextmanager
def webhook_receiver(script: list[int] | None = None) -> Iterator[Receiver]:
    ca = CA.new("webhook test CA")
    leaf = ca.issue("127.0.0.1", sans=["127.0.0.1", "localhost"], eku=["serverAuth"])
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = leaf.write(Path(tmp))
        ca_file = Path(tmp) / "ca.pem"
        ca_file.write_text(ca.cert_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        receiver: Receiver

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with receiver.lock:
                    receiver.received.append(body)
                    status = receiver.script.pop(0) if receiver.script else 200
                    if status < 300:
                        receiver.accepted.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        receiver = Receiver(
            f"https://127.0.0.1:{server.server_address[1]}/hooks/clustercert?token=s3cret",
            ca_file,
            list(script or []),
        )
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield receiver
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
