"""The workload commands' files: an attacker who can write into (or name) the --out folder
plants symlinks at the names the CLI writes, or hands it a folder others can read. Nothing is
written through a link, and the key ends in a folder of the user's own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from authority import files
from authority.errors import FailedPrecondition
from tests.helpers import ServeProcess
from tests.integration.test_cli import assert_one_error_line, attest, bundle_file
from tests.security._attack import AGENT

NAMES = ("svid.key", "svid.pem", "bundle.pem")
VICTIM = b"the victim's own file\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim" / "authorized_keys"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    os.chmod(path, 0o644)
    return path


def assert_written_in_place(out: Path) -> None:
    """Three regular files (no link), the key 0600, in a 0700 folder."""
    for name in NAMES:
        assert stat.S_ISREG(os.lstat(out / name).st_mode), name
    assert mode(out / "svid.key") == 0o600
    assert mode(out) == 0o700
    assert b"PRIVATE KEY" in (out / "svid.key").read_bytes()


def test_symlinks_at_the_final_names_are_replaced_not_followed(
    served: ServeProcess, tmp_path: Path
) -> None:
    target = victim(tmp_path)
    out = tmp_path / "work" / "svid"
    out.mkdir(parents=True, mode=0o700)
    for name in NAMES:
        (out / name).symlink_to(target)

    attest(served, AGENT, out)

    assert target.read_bytes() == VICTIM
    assert mode(target) == 0o644
    assert_written_in_place(out)


def test_symlinks_at_the_old_temporary_names_are_not_followed(
    served: ServeProcess, tmp_path: Path
) -> None:
    """The temporary names were ``.svid.key.tmp`` and so on: links planted there are left
    alone (the names are random now, and created exclusively)."""
    target = victim(tmp_path)
    out = tmp_path / "work" / "svid"
    out.mkdir(parents=True, mode=0o700)
    planted = [out / f".{name}.tmp" for name in NAMES]
    for link in planted:
        link.symlink_to(target)

    attest(served, AGENT, out)

    assert target.read_bytes() == VICTIM
    assert all(link.is_symlink() for link in planted)
    assert_written_in_place(out)


def test_renew_in_place_replaces_a_planted_symlink(served: ServeProcess, tmp_path: Path) -> None:
    """``svid.key`` is a link to a file elsewhere holding the same key (renew must still read
    it): the renewed key replaces the link, and the file it pointed to keeps the old key."""
    out = tmp_path / "work" / "svid"
    out.parent.mkdir()
    attest(served, AGENT, out)
    old_key = (out / "svid.key").read_bytes()
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(old_key)
    (out / "svid.key").unlink()
    (out / "svid.key").symlink_to(elsewhere)
    old_cert = (out / "svid.pem").read_bytes()

    served.cli("workload", "renew", "--server", served.address, "--svid-dir", str(out))

    assert elsewhere.read_bytes() == old_key
    assert (out / "svid.key").read_bytes() != old_key
    assert (out / "svid.pem").read_bytes() != old_cert
    assert_written_in_place(out)


def test_an_existing_0755_out_folder_is_tightened(served: ServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "work" / "svid"
    out.mkdir(parents=True)
    os.chmod(out, 0o755)  # noqa: S103 - the loose mode under test

    attest(served, AGENT, out)

    assert_written_in_place(out)


def test_an_out_folder_that_is_a_symlink_is_refused_before_the_token_is_spent(
    served: ServeProcess, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    out = tmp_path / "work" / "svid"
    out.parent.mkdir()
    out.symlink_to(elsewhere)
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    bundle = bundle_file(served, tmp_path)

    result = served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", token, "--out", str(out), check=False,
    )  # fmt: skip

    assert_one_error_line(result, "symlink")
    assert list(elsewhere.iterdir()) == []
    assert mode(elsewhere) == 0o755
    # The token was not spent: the folder itself still works.
    good = tmp_path / "good"
    served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", token, "--out", str(good),
    )  # fmt: skip
    assert_written_in_place(good)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder away needs root")
def test_an_out_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "theirs"
    out.mkdir(mode=0o777)
    os.chown(out, 65534, 65534)

    with pytest.raises(FailedPrecondition, match="belongs to uid 65534") as info:
        files.check_private_folder(out)

    assert info.value.reason == "UNSAFE_FOLDER"
    assert list(out.iterdir()) == []


def test_a_link_at_the_guessed_temporary_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker who guesses the random temporary name and plants a link there: the
    exclusive, no-follow create fails and the link's target is untouched."""
    target = victim(tmp_path)
    folder = tmp_path / "svid"
    monkeypatch.setattr("authority.files.secrets.token_hex", lambda _: "guessed")
    folder.mkdir(mode=0o700)
    (folder / ".svid.key.guessed.tmp").symlink_to(target)

    with pytest.raises(FileExistsError), files.private_folder(folder) as fd:
        files.write_at(fd, "svid.key", b"secret")

    assert target.read_bytes() == VICTIM
    assert not (folder / "svid.key").exists()
