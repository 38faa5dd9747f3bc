"""The operator's helper for multi-host tests, run INSIDE the workstation namespace
(tests/netns.py): ``python workstation.py COMMAND ...``. Connection settings come from the
environment, as for the ``clustercert`` CLI (CLUSTERCERT_URL, _USER, _PASSWORD, _CA_FILE).

- ``wait-nodes EXPR TIMEOUT``: poll ``GET /v1/nodes`` every 0.1 s until the Python expression
  EXPR (over ``nodes``, the answer) is true; print ``{"elapsed": s, "nodes": [...]}``. Exit 1
  with the last answer on timeout.
- ``served HOST PORT``: the SHA-256 of the leaf a TLS server presents (no verification),
  then its subject alternative names, space-separated, on a second line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import sys
import time
from typing import Any

import httpx
from cryptography import x509

from clustercert import pki


def wait_nodes(expression: str, timeout: float) -> int:
    context = ssl.create_default_context(cafile=os.environ["CLUSTERCERT_CA_FILE"])
    auth = (os.environ["CLUSTERCERT_USER"], os.environ["CLUSTERCERT_PASSWORD"])
    started = time.monotonic()
    last: Any = None
    with httpx.Client(base_url=os.environ["CLUSTERCERT_URL"], auth=auth, verify=context,
                      timeout=5) as client:  # fmt: skip
        while time.monotonic() - started < timeout:
            try:
                last = client.get("/v1/nodes").json()
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if eval(expression, {"nodes": last, "any": any, "all": all}):  # noqa: S307
                    print(json.dumps({"elapsed": time.monotonic() - started, "nodes": last}))
                    return 0
            time.sleep(0.1)
    print(json.dumps({"elapsed": None, "nodes": last}))
    return 1


def served(host: str, port: int) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    print(hashlib.sha256(der).hexdigest())
    print(" ".join(pki.subject_alt_names(x509.load_der_x509_certificate(der))))
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "wait-nodes":
        sys.exit(wait_nodes(args[0], float(args[1])))
    if command == "served":
        sys.exit(served(args[0], int(args[1])))
    sys.exit(f"unknown command {command!r}")
