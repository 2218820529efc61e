"""agents._filewatch: real files in temporary directories, a real event loop.

Each test makes a change and waits for the watch's wake-up (with a time limit);
nothing sleeps to let something happen. The few bounded waits for *no* wake-up
are said so where they are.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from agents._filewatch import FALLBACK_INTERVAL, FileWatch, watched_names

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="inotify: Linux only (elsewhere: the fallback)"
)

WITHIN = 5.0
"""The limit on a wake-up that inotify gives in microseconds (a loaded machine)."""


async def woken(watch: FileWatch, within: float = WITHIN) -> None:
    try:
        await asyncio.wait_for(watch.wait(), within)
    except TimeoutError:
        raise AssertionError(f"no wake-up within {within}s") from None


async def not_woken(watch: FileWatch, within: float) -> None:
    """No wake-up for ``within`` seconds (a bounded wait for something that must not come)."""
    try:
        await asyncio.wait_for(watch.wait(), within)
    except TimeoutError:
        return
    raise AssertionError("woken with nothing changed")


def inotify_fds() -> list[int]:
    """This process's open inotify instances."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.append(int(name))
        except OSError:  # the listing's own descriptor, gone
            pass
    return found


def replace(path: Path, text: str) -> None:
    """A temporary file in the same directory, then a rename (as documented)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- each change


async def test_a_file_created_wakes_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    with FileWatch(path) as watch:
        assert watch.watching
        path.write_text("{}")
        await woken(watch)
        assert watch.watching


async def test_a_file_replaced_by_a_rename_wakes_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    path.write_text("one")
    with FileWatch(path) as watch:
        replace(path, "two")
        await woken(watch)
        replace(path, "three")
        await woken(watch)
        assert path.read_text() == "three"


async def test_a_file_modified_in_place_wakes_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    path.write_text("one")
    with FileWatch(path) as watch:
        with path.open("a") as f:
            f.write(" more")
        await woken(watch)
        path.chmod(0o600)  # owner and mode count for the override file's check
        await woken(watch)


async def test_a_file_removed_wakes_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    path.write_text("{}")
    with FileWatch(path) as watch:
        path.unlink()
        await woken(watch)
        assert watch.watching
        path.write_text("{}")  # and back
        await woken(watch)


async def test_a_directory_missing_at_start_is_watched_for_until_the_file_comes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "agent" / "override.json"
    with FileWatch(path) as watch:
        assert watch.watching  # from the nearest directory that exists, not polling
        assert watched_names(str(path)) == {str(tmp_path): {b"run"}}
        (tmp_path / "run").mkdir()
        await woken(watch)
        (tmp_path / "run" / "agent").mkdir()
        await woken(watch)
        assert watched_names(str(path)) == {str(tmp_path / "run" / "agent"): {b"override.json"}}
        path.write_text("{}")
        await woken(watch)
        assert watch.watching


async def test_a_directory_removed_and_made_again_is_followed(tmp_path: Path) -> None:
    directory = tmp_path / "agent"
    directory.mkdir()
    path = directory / "override.json"
    path.write_text("{}")
    with FileWatch(path) as watch:
        shutil.rmtree(directory)
        await woken(watch)
        assert watch.watching
        directory.mkdir()
        await woken(watch)
        path.write_text("{}")
        await woken(watch)
        # A directory moved away is the same: what the path names changed.
        directory.rename(tmp_path / "old")
        await woken(watch)
        directory.mkdir()
        await woken(watch)
        replace(path, "new")
        await woken(watch)
        assert len(inotify_fds()) >= 1 and watch.fileno() in inotify_fds()


async def test_a_configmap_style_symlink_swap_wakes_the_owner(tmp_path: Path) -> None:
    # A ConfigMap volume: override.json -> ..data/override.json, ..data -> ..<time>;
    # an update writes a new ..<time>, points ..data_tmp at it, renames it over
    # ..data and removes the old one. Nothing named override.json changes.
    volume = tmp_path / "volume"
    (volume / "..v1").mkdir(parents=True)
    (volume / "..v1" / "override.json").write_text("one")
    (volume / "..data").symlink_to("..v1")
    path = volume / "override.json"
    path.symlink_to("..data/override.json")
    with FileWatch(path) as watch:
        assert watched_names(str(path)) == {
            str(volume): {b"override.json", b"..data"},
            str(volume / "..v1"): {b"override.json"},
        }
        (volume / "..v2").mkdir()
        (volume / "..v2" / "override.json").write_text("two")
        (volume / "..data_tmp").symlink_to("..v2")
        os.replace(volume / "..data_tmp", volume / "..data")
        shutil.rmtree(volume / "..v1")
        await woken(watch)
        assert path.read_text() == "two"
        assert watched_names(str(path))[str(volume / "..v2")] == {b"override.json"}
        # The watch followed: the next swap wakes it too.
        (volume / "..v3").mkdir()
        (volume / "..v3" / "override.json").write_text("three")
        (volume / "..data_tmp").symlink_to("..v3")
        os.replace(volume / "..data_tmp", volume / "..data")
        await woken(watch)
        assert path.read_text() == "three"


async def test_a_link_target_elsewhere_is_watched_where_it_is(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "override.json"
    target.write_text("one")
    path = tmp_path / "etc" / "override.json"
    path.symlink_to(target)
    with FileWatch(path) as watch:
        with target.open("a") as f:  # in place, through its own directory
            f.write(" more")
        await woken(watch)


# ---------------------------------------------------------------- quiet while nothing changes


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "fallback"])
async def test_no_wake_up_while_the_file_does_not_change(tmp_path: Path, use_inotify: bool) -> None:
    """Over more than a fallback interval, another directory's file is written
    again and again, a file beside the watched one too, and the watched file is
    read and stat'ed as the owner does: inotify wakes no one; the fallback does
    (which shows that this test sees wake-ups)."""
    path = tmp_path / "watched" / "override.json"
    path.parent.mkdir()
    path.write_text("{}")
    elsewhere = tmp_path / "elsewhere" / "override.json"
    elsewhere.parent.mkdir()
    beside = path.with_name("cache.json")
    wakes = 0
    woke = asyncio.Event()
    with FileWatch(path, use_inotify=use_inotify) as watch:
        assert watch.watching is use_inotify

        async def count() -> None:
            nonlocal wakes
            while True:
                await watch.wait()
                wakes += 1
                woke.set()

        counter = asyncio.create_task(count())
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + FALLBACK_INTERVAL * 1.3
            writes = 0
            while loop.time() < end or writes <= 50:  # (a loaded machine paces slower)
                replace(elsewhere, str(writes))
                elsewhere.write_text(str(writes))
                replace(beside, str(writes))
                path.read_text()
                path.stat()
                writes += 1
                # Pacing, not waiting for anything: events read and counted between writes.
                await asyncio.sleep(0.01)
            assert writes > 50
            if use_inotify:
                assert wakes == 0, f"{wakes} wake-ups, nothing changed"
                # The counter is alive and counting: a change is one wake-up.
                replace(path, "changed")
                await asyncio.wait_for(woke.wait(), WITHIN)
                assert wakes == 1
            else:
                assert wakes >= 1
        finally:
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)


async def test_the_owners_own_reads_do_not_wake_it(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    path.write_text("{}")
    with FileWatch(path) as watch:
        for _ in range(20):
            path.read_bytes()
            os.stat(path)
            os.lstat(path)
            os.stat(tmp_path)
        # A bounded wait for nothing; inotify would have told in microseconds.
        await not_woken(watch, 0.3)


# ---------------------------------------------------------------- fallback, descriptors


async def test_the_fallback_wakes_once_a_second_and_sees_every_change(tmp_path: Path) -> None:
    path = tmp_path / "override.json"
    loop = asyncio.get_running_loop()
    before = set(inotify_fds())
    with FileWatch(path, use_inotify=False) as watch:
        assert not watch.watching and watch.fileno() == -1
        assert set(inotify_fds()) == before
        started = loop.time()
        path.write_text("{}")
        await woken(watch, FALLBACK_INTERVAL * 3)
        first = loop.time()
        await woken(watch, FALLBACK_INTERVAL * 3)  # a poll: nothing changed
        second = loop.time()
        assert first - started >= FALLBACK_INTERVAL * 0.9
        assert second - first >= FALLBACK_INTERVAL * 0.9
        assert not watch.watching


async def test_the_descriptor_is_closed_on_close_and_each_rearm_keeps_one(
    tmp_path: Path,
) -> None:
    before = set(inotify_fds())
    path = tmp_path / "override.json"
    watch = FileWatch(path)
    fd = watch.fileno()
    assert set(inotify_fds()) - before == {fd}
    for text in ("one", "two", "three"):
        replace(path, text)
        await woken(watch)
        assert len(set(inotify_fds()) - before) == 1  # the previous one closed
    watch.close()
    assert set(inotify_fds()) == before
    assert watch.fileno() == -1 and not watch.watching
    watch.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await watch.wait()


async def test_a_cancelled_owner_closes_the_descriptor(tmp_path: Path) -> None:
    before = set(inotify_fds())
    started = asyncio.Event()

    async def owner() -> None:
        with FileWatch(tmp_path / "override.json") as watch:
            started.set()
            while True:
                await watch.wait()

    task = asyncio.create_task(owner())
    await started.wait()
    assert len(set(inotify_fds()) - before) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert set(inotify_fds()) == before


def test_a_forked_child_closes_the_inherited_descriptor(tmp_path: Path) -> None:
    async def main() -> None:
        with FileWatch(tmp_path / "override.json") as watch:
            fd = watch.fileno()
            assert fd in inotify_fds()
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report whether the copy is still open
                os.close(read)
                os.write(write, b"open" if fd in inotify_fds() else b"closed")
                os._exit(0)
            os.close(write)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            with os.fdopen(read, "rb") as pipe:
                assert pipe.read() == b"closed"
            # The parent's watch goes on.
            assert watch.watching and fd in inotify_fds()
            (tmp_path / "override.json").write_text("{}")
            await woken(watch)

    asyncio.run(main())


# ---------------------------------------------------------------- what is watched


def test_what_is_watched_follows_the_path_as_it_resolves(tmp_path: Path) -> None:
    (tmp_path / "releases" / "v1").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/v1")
    path = tmp_path / "current" / "override.json"
    # A directory reached through a link: the link's name in its directory too.
    assert watched_names(str(path)) == {
        str(tmp_path): {b"current"},
        str(tmp_path / "releases" / "v1"): {b"override.json"},
    }
    # A file where a directory should be: its name, until it is a directory.
    (tmp_path / "file").write_text("")
    assert watched_names(str(tmp_path / "file" / "override.json")) == {str(tmp_path): {b"file"}}
    # ".." after a link is taken from where the link leads.
    assert watched_names(str(tmp_path / "current" / ".." / "v1" / "x")) == {
        str(tmp_path): {b"current"},
        str(tmp_path / "releases" / "v1"): {b"x"},
    }
    # A loop of links is an error (the owner falls back).
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError, match="many"):
        watched_names(str(tmp_path / "a" / "override.json"))
    # Relative: from the working directory.
    assert watched_names("override.json") == {os.getcwd(): {b"override.json"}}


async def test_a_directory_link_swapped_wakes_the_owner(tmp_path: Path) -> None:
    (tmp_path / "releases" / "v1").mkdir(parents=True)
    (tmp_path / "releases" / "v2").mkdir(parents=True)
    (tmp_path / "releases" / "v2" / "override.json").write_text("{}")
    (tmp_path / "current").symlink_to("releases/v1")
    path = tmp_path / "current" / "override.json"
    with FileWatch(path) as watch:
        (tmp_path / "next").symlink_to("releases/v2")
        os.replace(tmp_path / "next", tmp_path / "current")
        await woken(watch)
        assert watched_names(str(path))[str(tmp_path / "releases" / "v2")] == {b"override.json"}
