"""The Prometheus alerting rules shipped in deploy/prometheus: promtool (Debian's prometheus
package, installed by `make install`) checks their syntax and runs their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def _promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make install` installs Debian's prometheus package"
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_are_valid() -> None:
    result = _promtool("check", "rules", "clustercert-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = _promtool("test", "rules", "clustercert-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# The first "for: 15m" is ClusterCertAboutToExpire's pending time.
@pytest.mark.parametrize(("original", "broken"), [("< 45 * 86400", "< 44 * 86400"),
                                                  ("for: 15m", "for: 14m")])  # fmt: skip
def test_the_unit_tests_catch_a_changed_threshold(
    tmp_path: Path, original: str, broken: str
) -> None:
    """The unit tests pin the thresholds: a rules file with another threshold or another
    pending time fails them (so they test something)."""
    rules = (RULES / "clustercert-alerts.yml").read_text()
    assert original in rules
    (tmp_path / "clustercert-alerts.yml").write_text(rules.replace(original, broken, 1))
    shutil.copy(RULES / "clustercert-alerts.test.yml", tmp_path)
    result = _promtool("test", "rules", "clustercert-alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "alertname: ClusterCertAboutToExpire" in result.stdout + result.stderr
