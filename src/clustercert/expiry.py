"""``node_cert_expiration_seconds``: Redis Enterprise's certificate-expiry series, built the
same way by every agent and by the control plane for the files each one serves itself.

``node_cert_expiration_seconds{cluster,logical_name,node,path}`` is the number of seconds until
the first certificate in ``path`` expires (negative once it has), computed at scrape time from
the file, so it shows what is really on disk and served, not what the store wants.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily

__all__ = ["NODE_CERT_EXPIRATION", "expiration_family"]

NODE_CERT_EXPIRATION = "node_cert_expiration_seconds"


def expiration_family(
    cluster: str, node: str, files: Mapping[str, Path], now: dt.datetime
) -> GaugeMetricFamily:
    """One sample per ``logical_name -> path`` in ``files`` (a file that cannot be read is left
    out: it may have been pruned between listing and reading)."""
    family = GaugeMetricFamily(
        NODE_CERT_EXPIRATION,
        "Seconds until the certificate in the file the node serves expires.",
        labels=["cluster", "logical_name", "node", "path"],
    )
    for name, path in sorted(files.items()):
        try:
            leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError):
            continue
        family.add_metric(
            [cluster, name, node, str(path)], (leaf.not_valid_after_utc - now).total_seconds()
        )
    return family
