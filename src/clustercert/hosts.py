"""Host names and addresses as operators write them: in URLs, listen addresses and SANs.

Shared by the control plane and the agent; it imports neither.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

__all__ = ["canonical_host", "host_of", "is_wildcard", "valid_san"]

# A DNS name as a certificate may carry it: labels of letters, digits and hyphens; one leading
# "*." label for a wildcard name.
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)


def host_of(value: str) -> str:
    """The host of ``https://HOST:PORT/...``, ``HOST:PORT`` or ``HOST`` (IPv6 without brackets)."""
    value = value.strip()
    if "://" in value:
        return urlsplit(value).hostname or ""
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare name, IPv4 or IPv6 address


def is_wildcard(host: str) -> bool:
    """True for a listen host that means "every address": empty, 0.0.0.0 or ::.

    Such an address is where a server listens, never where anyone can reach it, so it cannot
    be advertised to agents nor named by a certificate."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def valid_san(value: str) -> str | None:
    """None if ``value`` can be a certificate's subject alternative name (a DNS name or an IP
    address, not a wildcard listen address); otherwise the reason it cannot."""
    if is_wildcard(value):
        return f"{value!r} means every address and names no host; give an address or a name"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if len(value) > 253 or not _DNS_NAME.match(value):
        return f"{value!r} is neither an IP address nor a DNS name"
    return None


def canonical_host(value: str) -> str:
    """An IP address in its canonical text form (as SANs print it); a name lowercased."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.lower().rstrip(".")
