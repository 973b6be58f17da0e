"""The key vaults: the file one (0600 files in a 0700 folder) and its in-memory twin."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from authority.errors import Internal, NotFound
from authority.keyvault import FileKeyVault, KeyVault, MemoryKeyVault, write_private_file
from tests.unit._pki import ec_key

NAME = "x509-AbC_d-9"


@pytest.fixture(params=["file", "memory"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyVault]:
    if request.param == "file":
        yield FileKeyVault(tmp_path / "keys")
    else:
        yield MemoryKeyVault()


def same_key(a: ec.EllipticCurvePrivateKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.private_numbers() == b.private_numbers()


# --- contract, both vaults -------------------------------------------------------------------


def test_save_then_load(vault: KeyVault) -> None:
    key = ec_key()
    vault.save(NAME, key)
    assert same_key(vault.load(NAME), key)


def test_save_replaces(vault: KeyVault) -> None:
    first, second = ec_key(), ec_key(ec.SECP384R1())
    vault.save(NAME, first)
    vault.save(NAME, second)
    loaded = vault.load(NAME)
    assert same_key(loaded, second)
    assert isinstance(loaded.curve, ec.SECP384R1)


def test_keys_are_kept_apart(vault: KeyVault) -> None:
    a, b = ec_key(), ec_key()
    vault.save("jwt-a", a)
    vault.save("jwt-b", b)
    assert same_key(vault.load("jwt-a"), a)
    assert same_key(vault.load("jwt-b"), b)


def test_missing_key_is_not_found(vault: KeyVault) -> None:
    with pytest.raises(NotFound, match="missing"):
        vault.load(NAME)


def test_delete_is_idempotent(vault: KeyVault) -> None:
    vault.save(NAME, ec_key())
    vault.delete(NAME)
    with pytest.raises(NotFound):
        vault.load(NAME)
    vault.delete(NAME)  # a second delete is not an error


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x509",
        "x509-",
        "X509-abc",
        "-abc",
        "x509-a/b",
        "../x509-a",
        "x509-a.pem",
        "x509-" + "a" * 129,
    ],
)
def test_bad_names_are_refused(vault: KeyVault, name: str) -> None:
    with pytest.raises(Internal, match="invalid key name"):
        vault.save(name, ec_key())
    with pytest.raises(Internal, match="invalid key name"):
        vault.load(name)
    with pytest.raises(Internal, match="invalid key name"):
        vault.delete(name)


# --- the file vault --------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_0600_in_a_0700_folder(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # noqa: S103 - the loose mode under test
    vault = FileKeyVault(folder)
    assert mode(folder) == 0o700  # tightened even when it existed
    vault.save(NAME, ec_key())
    assert mode(folder / f"{NAME}.pem") == 0o600
    assert sorted(p.name for p in folder.iterdir()) == [f"{NAME}.pem"]  # no temp file left


def test_file_is_unencrypted_pkcs8_pem(tmp_path: Path) -> None:
    vault = FileKeyVault(tmp_path)
    key = ec_key()
    vault.save(NAME, key)
    data = (tmp_path / f"{NAME}.pem").read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert same_key(loaded, key)


def test_a_second_vault_on_the_folder_sees_the_keys(tmp_path: Path) -> None:
    key = ec_key()
    FileKeyVault(tmp_path / "keys").save(NAME, key)
    assert same_key(FileKeyVault(tmp_path / "keys").load(NAME), key)


def test_a_non_ec_key_file_is_refused(tmp_path: Path) -> None:
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / f"{NAME}.pem").write_bytes(other)
    with pytest.raises(Internal, match="not an EC key"):
        FileKeyVault(tmp_path).load(NAME)


def test_a_corrupt_key_file_is_an_internal_error(tmp_path: Path) -> None:
    (tmp_path / f"{NAME}.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    with pytest.raises(Internal, match="does not parse") as info:
        FileKeyVault(tmp_path).load(NAME)
    assert "AAAA" not in info.value.message


def test_write_private_file_is_0600_from_the_start(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        target = tmp_path / "secret"
        write_private_file(target, b"one")
        assert mode(target) == 0o600
        # A stale temporary file with loose permissions does not loosen the result.
        stale = tmp_path / ".secret.tmp"
        stale.write_bytes(b"stale")
        os.chmod(stale, 0o666)  # noqa: S103 - the loose mode under test
        write_private_file(target, b"two" * 100_000)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"two" * 100_000
    assert mode(target) == 0o600
    # The temporary name is random and created exclusively: the stale file was not reused.
    assert stale.read_bytes() == b"stale"
