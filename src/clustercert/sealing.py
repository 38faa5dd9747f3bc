"""Private keys encrypted at rest in the store: AES-256-GCM under the cluster key file.

The record's name is bound as associated data, so a sealed key cannot be moved to another
record unnoticed.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clustercert.certfiles import write_atomically
from clustercert.errors import ConfigError

__all__ = ["KeySealer"]

_PREFIX = "aesgcm:"


class KeySealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the cluster key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def create(cls, path: Path) -> KeySealer:
        """Write a new random key to ``path`` (mode 0600)."""
        key = AESGCM.generate_key(bit_length=256)
        write_atomically(path, key)
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> KeySealer:
        try:
            return cls(path.read_bytes())
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"the cluster key file {path} is missing or malformed") from exc

    def seal(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return _PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, token: str, context: str) -> str:
        if not token.startswith(_PREFIX):
            raise ConfigError(f"sealed value for {context} has an unknown format")
        raw = base64.b64decode(token[len(_PREFIX) :])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag as exc:
            raise ConfigError(
                f"the sealed key of {context} does not decrypt with this cluster key"
            ) from exc
