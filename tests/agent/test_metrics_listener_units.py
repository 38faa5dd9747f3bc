"""The metrics listener in-process (a real uvicorn on loopback, no agent process): a port that
is taken fails the reload with the reason instead of ending the agent (uvicorn calls
``sys.exit(3)``; an agent exited with that code under load, docs/decisions.md)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from certfactory import CA

from clustercert.agent.config import ServiceConfig
from clustercert.agent.metrics import MetricsListener, NodeLabels
from clustercert.agent.services import ReloadFailed
from clustercert.certfiles import CertificateFiles, GenerationPaths


def test_a_taken_port_fails_the_reload_and_the_agent_goes_on(tmp_path: Path) -> None:
    ca = CA.new()
    leaf = ca.issue("localhost")
    (tmp_path / "cert.pem").write_text(leaf.chain_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServiceConfig("metrics", "metrics", "metrics_exporter", ("127.0.0.1", port))
        listener = MetricsListener(
            config, 5.0, CertificateFiles(tmp_path / "data"), tmp_path / "ca.pem",
            NodeLabels("cluster.example", "1", {}),
        )  # fmt: skip
        paths = GenerationPaths(1, tmp_path / "cert.pem", tmp_path / "key.pem")

        async def reload_then_carry_on() -> str:
            with pytest.raises(ReloadFailed) as failed:
                await listener.reload("metrics_exporter", paths)
            await asyncio.sleep(0.05)  # the loop still runs: nothing raised SystemExit
            await listener.stop()
            return str(failed.value)

        message = asyncio.run(reload_then_carry_on())
    assert f"did not start on 127.0.0.1:{port}" in message
    assert "is the port taken?" in message
