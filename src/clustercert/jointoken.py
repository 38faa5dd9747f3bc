"""Join tokens that pin the cluster's CA, so a node needs nothing but the URL and the token.

The design follows kubeadm's ``--discovery-token-ca-cert-hash``: the hash is SHA-256 over the
CA certificate's DER SubjectPublicKeyInfo, written ``sha256:<64 hex>``. A token reads
``SECRET.sha256:HEX``: the secret (what the control plane consumes, once) and the CA pin.

Before it sends the secret anywhere, the agent fetches the CA from the control plane
(``GET /v1/internal/ca``) over a TLS connection it does not verify yet, keeps it only if its
public key hashes to the pin, then verifies the control plane's certificate against it for the
join itself. A man in the middle can serve a CA, but not one whose key hashes to the pin, and
without the matching private key it cannot present a certificate that CA signed: it never sees
the secret. See docs/decisions.md, "Join without copying files".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clustercert.errors import ConfigError

__all__ = ["JoinToken", "ca_hash"]

_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")


def ca_hash(ca: x509.Certificate) -> str:
    """``sha256:<hex>`` of the CA's DER SubjectPublicKeyInfo (kubeadm's CA cert hash)."""
    der = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class JoinToken:
    secret: str
    ca_hash: str | None = None  # None: a bare secret; the agent then needs ca_file

    def __str__(self) -> str:
        return f"{self.secret}.{self.ca_hash}" if self.ca_hash else self.secret

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """``SECRET.sha256:HEX`` or a bare ``SECRET``; ConfigError naming ``join_token``."""
        secret, dot, pin = text.strip().partition(".")
        if not secret:
            raise ConfigError("join_token: empty; print one with `clustercert join-token`")
        if not dot:
            return cls(secret)
        if not _PIN.match(pin.lower()):
            raise ConfigError(
                "join_token: after the '.' expected the CA pin sha256:<64 hex digits>, got "
                f"{pin[:80]!r}; copy the whole line `clustercert join-token` printed"
            )
        return cls(secret, pin.lower())

    def check(self, ca: x509.Certificate) -> None:
        """ConfigError unless ``ca`` is the pinned CA (a CA certificate whose key hashes to
        the pin)."""
        found = ca_hash(ca)
        if found != self.ca_hash:
            raise ConfigError(
                f"the control plane presented a CA whose public key hash is {found}, but the "
                f"join token pins {self.ca_hash}: this is not the cluster the token was made "
                "for (or someone is in the middle). Check control_plane_url, or print a new "
                "token on the control plane with `clustercert join-token`"
            )
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError("the pinned certificate is not a CA certificate")
