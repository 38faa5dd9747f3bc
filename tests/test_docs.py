"""The documentation's examples run: every ```sh block of docs/api.md, in order, verbatim."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from clusterkit import served_by_node
from cryptography import x509

from clustercert import pki
from clustercert.demo import DemoCluster

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_examples_run_against_a_cluster(cluster: DemoCluster, tmp_path: Path) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", (DOCS / "api.md").read_text(), re.S)
    assert len(blocks) >= 8
    env = {
        **os.environ,
        "CLUSTERCERT_URL": cluster.api_url,
        "CLUSTERCERT_CA_FILE": str(cluster.cluster.ca_file),
        "CLUSTERCERT_PASSWORD": cluster.admin_password or "",
    }
    script = "set -euo pipefail\n" + "\n".join(blocks)
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"error_code":"key_values_mismatch"' in done.stdout
    uploaded = x509.load_pem_x509_certificates((tmp_path / "proxy.pem").read_bytes())
    assert len(uploaded) == 2
    assert set(served_by_node(cluster).values()) == {pki.fingerprint_sha256(uploaded[0])}
    assert "_key" in (tmp_path / "certificates.json").read_text()
