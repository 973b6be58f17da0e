"""Where the trust domain's private keys live: files of mode 0600 in the data directory.

A Protocol, so that a KMS or HSM backend can replace the files. The vault never logs or returns a
key as text; callers get key objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority.errors import Internal, NotFound
from authority.files import write_atomic

_KEY_NAME = re.compile(r"^[a-z0-9]+-[A-Za-z0-9_-]{1,128}$")


class KeyVault(Protocol):
    def save(self, name: str, key: ec.EllipticCurvePrivateKey) -> None: ...

    def load(self, name: str) -> ec.EllipticCurvePrivateKey: ...

    def delete(self, name: str) -> None: ...


def _check_name(name: str) -> None:
    if not _KEY_NAME.fullmatch(name):
        raise Internal(f"invalid key name {name!r}")


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: for a 0600 file or a TLS credential, never for a log."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: mode 0600 from the first byte, atomically, never through a
    link (``authority.files.write_atomic``)."""
    write_atomic(path, data, 0o600)


class FileKeyVault:
    """PKCS#8 PEM files, one per key, in a 0700 folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        self._folder = folder

    def _path(self, name: str) -> Path:
        _check_name(name)
        return self._folder / f"{name}.pem"

    def save(self, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        pem = private_key_pem(key)
        write_private_file(self._path(name), pem)

    def load(self, name: str) -> ec.EllipticCurvePrivateKey:
        path = self._path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"signing key {name} is missing from the vault") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise Internal(f"signing key {name} in the vault does not parse") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Internal(f"signing key {name} is not an EC key")
        return key

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


class MemoryKeyVault:
    """``KeyVault`` in a dictionary, with the file vault's name rules (for tests)."""

    def __init__(self) -> None:
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def save(self, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        _check_name(name)
        self._keys[name] = key

    def load(self, name: str) -> ec.EllipticCurvePrivateKey:
        _check_name(name)
        try:
            return self._keys[name]
        except KeyError:
            raise NotFound(f"signing key {name} is missing from the vault") from None

    def delete(self, name: str) -> None:
        _check_name(name)
        self._keys.pop(name, None)
