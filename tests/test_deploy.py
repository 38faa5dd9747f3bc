"""The shipped deployment files: systemd units that `systemd-analyze verify` accepts, and the
lock file that `make install` installs from."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
SHIPPED_BINARY = "/opt/clustercert/bin/clustercert"


def test_the_units_are_shipped() -> None:
    assert [u.name for u in UNITS] == [
        "clustercert-agent.service",
        "clustercert-etcd.service",  # an etcd member of the HA store (ccs_internode_encryption)
        "clustercert-server.service",
    ]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine; the unit was not verified")
    # verify also checks that ExecStart's binary exists: point it at this checkout's.
    binary = Path(sys.executable).with_name("clustercert")
    assert binary.exists()
    text = unit.read_text()
    assert SHIPPED_BINARY in text or "ExecStart=/usr/bin/etcd " in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(SHIPPED_BINARY, str(binary)))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown keys are only warnings (exit 0), so any line about the unit is a failure.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not complaints, complaints


def test_agent_unit_lets_the_agent_stop_redis_itself() -> None:
    text = (ROOT / "deploy" / "systemd" / "clustercert-agent.service").read_text()
    # SIGTERM to the agent alone; the agent stops the redis-server it supervises.
    assert re.search(r"^KillMode=mixed$", text, re.M)
    assert "clustercert agent --config /etc/clustercert/agent.toml" in text


def test_lock_pins_every_dependency_exactly() -> None:
    import tomllib

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    assert "clustercert" not in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in wanted:
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt; run `make lock`"
