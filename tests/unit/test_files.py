"""Files that grant power: refused when someone else can change them, as sshd's StrictModes."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from controlplane._files import UnsafeFileError, read_guarded

ME = pwd.getpwuid(os.geteuid()).pw_name
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
NOBODY = 65534


@pytest.fixture
def place(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


def _file(directory: Path, mode: int, text: str = "secret") -> Path:
    path = directory / "power.json"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_file_only_its_owner_can_change_is_read(place: Path) -> None:
    path = _file(place, 0o600)
    assert read_guarded(path, "the auth file", secret=True) == (b"secret", None)
    assert read_guarded(path, "the auth file", max_bytes=3) == (b"sec", None)


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(0o666, "is writable by others"), (0o620, "is writable by its group")],
)
def test_a_file_others_can_write_is_refused_with_the_fix(
    place: Path, mode: int, problem: str
) -> None:
    path = _file(place, mode)
    with pytest.raises(UnsafeFileError) as info:
        read_guarded(path, "the auth file")
    assert str(info.value) == (
        f"the auth file {path} is refused: it {problem} (owner {ME}, mode {mode:04o}): "
        f"chmod 600 {path}"
    )


@ROOT_ONLY
def test_a_file_owned_by_someone_else_is_refused(place: Path) -> None:
    path = _file(place, 0o600)
    os.chown(path, NOBODY, -1)
    with pytest.raises(UnsafeFileError) as info:
        read_guarded(path, "the override file")
    assert str(info.value) == (
        f"the override file {path} is refused: it is owned by nobody, not by root "
        f"(owner nobody, mode 0600): chown root {path} && chmod 600 {path}"
    )


def test_a_directory_others_can_write_lets_them_replace_the_file(place: Path) -> None:
    path = _file(place, 0o600)
    place.chmod(0o777)
    with pytest.raises(UnsafeFileError) as info:
        read_guarded(path, "the token file", secret=True)
    message = str(info.value)
    assert message.startswith(f"the token file is refused: its directory {place} is writable")
    assert f"chmod go-w {place}" in message


def test_a_sticky_directory_is_no_danger_to_a_file_of_ones_own(place: Path) -> None:
    path = _file(place, 0o600)
    place.chmod(0o1777)
    assert read_guarded(path, "the override file")[0] == b"secret"


def test_a_symlink_is_refused_where_the_file_itself_must_be(place: Path, tmp_path: Path) -> None:
    target = _file(place, 0o600)
    link = place / "override.json"
    link.symlink_to(target)
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        read_guarded(link, "the override file", follow_symlinks=False)
    assert read_guarded(link, "the auth file")[0] == b"secret"  # followed where allowed


def test_a_secret_others_can_read_works_with_a_warning(place: Path) -> None:
    path = _file(place, 0o644)
    data, warning = read_guarded(path, "the TLS key", secret=True)
    assert data == b"secret"
    assert warning == f"the TLS key {path} is readable by others (mode 0644): chmod 600 {path}"
    assert read_guarded(path, "the auth file")[1] is None  # not a secret: nothing to say


def test_a_missing_file_is_an_os_error_not_a_refusal(place: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_guarded(place / "absent", "the auth file", follow_symlinks=False)


def test_a_fifo_in_the_files_place_is_refused_without_waiting_for_a_writer(place: Path) -> None:
    # Someone could mkfifo the override file's path: opening it for reading would wait.
    fifo = place / "override.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafeFileError, match="is not a regular file"):
        read_guarded(fifo, "the override file", follow_symlinks=False)
