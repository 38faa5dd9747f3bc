"""clustercert: replace TLS certificates on every node of a cluster, safely, with one call."""

__version__ = "0.1.0"
