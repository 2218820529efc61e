"""The cache file on disk: atomic writes, one writer at a time, never backwards, reading it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format

from agents import Agent, AgentState
from agents._atomic import write_atomic
from agents._cache import (
    CacheWriter,
    RecordsJSON,
    lock_path,
    read_cache,
    snapshot_from_cache,
    snapshot_to_cache,
)
from agents._codec import apply_change, snapshot_from_proto, snapshot_to_proto
from agents._state import Snapshot
from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as t
from tests.helpers.agent_sync import (
    cached_revision,
    flag,
    meta,
    now,
    snapshot_msg,
    state,
)


def test_a_cache_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "cache.json"
    write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    inode = path.stat().st_ino
    with path.open("rb") as reader:
        write_atomic(path, b"second, longer")
        # A reader of the old file still sees all of it: a new file was renamed over it.
        assert reader.read() == b"first"
    assert path.read_bytes() == b"second, longer"
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


@pytest.mark.parametrize("mode", [None, 0o644], ids=["cache", "state-file"])
def test_an_atomic_write_syncs_the_file_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int | None
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "state.json"
    write_atomic(path, b"data", mode=mode)
    # The content before the rename, the rename itself after it.
    assert synced == ["file", "directory"]
    assert path.read_bytes() == b"data"
    # Without a mode, the temporary file's: readable by the owner only.
    assert stat.S_IMODE(path.stat().st_mode) == (0o600 if mode is None else mode)


def test_a_failed_cache_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    target.mkdir()  # os.replace of a file over a directory fails after the write
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"data")
    assert target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_the_cache_writer_never_goes_back_and_logs_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    writer = CacheWriter(path)
    older = state(5, flag("a", True))
    newer = state(3, flag("a", False))
    assert writer.write(older, 1)
    # A lower revision applied later (the server's store went back): written.
    assert writer.write(newer, 2, replace_newer=True)
    assert not writer.write(older, 1)  # a write that lost the race: skipped
    cached = read_cache(path, "checkout", now())
    assert cached is not None and cached.revision == 3 and cached.flags == {"a": False}

    caplog.set_level(logging.WARNING, logger="agents")
    directory = tmp_path / "a-directory"
    directory.mkdir()
    broken = CacheWriter(directory)  # cannot be replaced by a file
    assert not broken.write(newer, 1)
    assert any("agent_cache_write_failed" in r.getMessage() for r in caplog.records)


def test_processes_sharing_a_cache_path_never_replace_a_newer_revision(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    # Two workers' writers: each has its own sequence, the file is shared.
    first, second = CacheWriter(path), CacheWriter(path)
    assert first.write(state(7, flag("mode", "lite")), 1)
    assert not second.write(state(5, flag("mode", "full")), 1)  # behind: skipped
    assert cached_revision(path) == 7
    assert second.write(state(9, flag("mode", "off")), 2)
    assert not first.write(state(8), 2)
    assert cached_revision(path) == 9
    # An equal revision is the same state: written (harmless).
    assert first.write(state(9, flag("mode", "off")), 3)
    # The server's store went back (an older snapshot): it replaces the file.
    assert second.write(state(4, flag("mode", "restored")), 3, replace_newer=True)
    assert cached_revision(path) == 4
    # Another service's (a misconfigured shared path) or a corrupt file protects nothing.
    write_atomic(path, snapshot_to_cache(state(99, service="payments")))
    assert first.write(state(10), 4)
    path.write_bytes(b'{"format": 1, "revision": 1000')
    assert second.write(state(11), 4)
    assert cached_revision(path) == 11
    # Nor does a file no agent would boot from, whatever revision it claims.
    doc = json.loads(snapshot_to_cache(state(12)))
    path.write_text(json.dumps({**doc, "revision": 2**63}))
    assert first.write(state(12), 5)
    path.write_text(json.dumps({**doc, "revision": 500, "records": {"flags": "nope"}}))
    assert second.write(state(13), 5)
    assert cached_revision(path) == 13
    assert lock_path(path) == tmp_path / "cache.json.lock" and lock_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "cache.json.lock"]


def test_a_cache_write_waits_for_the_lock_and_checks_the_file_under_it(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    writer = CacheWriter(path)
    assert writer.write(state(3), 1)
    result: list[bool] = []
    fd = os.open(lock_path(path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process writing
        thread = threading.Thread(target=lambda: result.append(writer.write(state(7), 2)))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and result == []  # blocked on the lock
        # What the other process writes while holding the lock...
        write_atomic(path, snapshot_to_cache(state(9)))
    finally:
        os.close(fd)
    thread.join(10)
    # ... is what the waiting writer finds once it has the lock: newer, kept.
    assert result == [False]
    assert cached_revision(path) == 9


def test_reading_a_cache_missing_corrupt_or_for_another_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    path = tmp_path / "cache.json"
    assert read_cache(path, "checkout", now()) is None
    assert caplog.records == []  # no cache yet is normal: no warning

    path.write_bytes(b'{"format": 1, "serv')
    assert read_cache(path, "checkout", now()) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "agent_cache_corrupt" in record.getMessage() and "not JSON" in record.getMessage()

    snap = snapshot_from_proto(
        "checkout",
        snapshot_msg(9, flag("mode", "lite"), flag("new-ui", True, scope="global")).snapshot,
        now(),
    )
    path.write_bytes(snapshot_to_cache(snap))
    assert read_cache(path, "payments", now()) is None
    assert "for service 'checkout'" in caplog.records[-1].getMessage()
    loaded = read_cache(path, "checkout", now())
    assert loaded is not None
    assert (loaded.revision, dict(loaded.flags)) == (9, {"mode": "lite", "new-ui": True})


def test_a_cache_with_a_revision_beyond_int64_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    path = tmp_path / "cache.json"
    doc = json.loads(snapshot_to_cache(state(9, flag("mode", "lite"))))
    doc["revision"] = 2**63
    path.write_text(json.dumps(doc))
    assert read_cache(path, "checkout", now()) is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert "agent_cache_corrupt" in warning and "9223372036854775808" in warning
    agent = Agent("checkout", ["127.0.0.1:1"], cache_path=path)
    agent.start()  # no exception: the file is ignored
    try:
        assert agent.state is AgentState.CONNECTING
        assert agent.revision == 0
    finally:
        agent.close()


def test_a_cached_time_boxed_change_expires_when_the_cache_is_read(tmp_path: Path) -> None:
    boxed = flag("mode", "degraded", expires_in=0.2)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    snap = snapshot_from_proto("checkout", snapshot_msg(4, boxed).snapshot, now())
    path = tmp_path / "cache.json"
    path.write_bytes(snapshot_to_cache(snap))
    early = read_cache(path, "checkout", now())
    late = read_cache(path, "checkout", now() + timedelta(seconds=1))
    assert early is not None and early.flags["mode"] == "degraded"
    assert late is not None and late.flags["mode"] == "full"


def _full_state(revision: int, mode: str) -> Snapshot:
    """Flags (one layered, one global), shedding and a pin with its history."""
    layered = flag("new-ui", False, expires_in=600)
    layered.replaced.CopyFrom(flag("new-ui", True))
    msg = agent_pb2.Snapshot(
        revision=revision,
        flags=[layered, flag("mode", mode), flag("banner", "on", scope="global")],
        shedding=t.Shedding(
            service="checkout", tier=t.SHEDDABLE_PLUS, percent=30.0, meta=meta(expires_in=60)
        ),
        pin=t.Pin(
            service="checkout",
            version="v1.4.2",
            meta=meta(),
            previous=t.PinHistory(version="v1.3.0", actor="deploy", reason="rollout"),
        ),
    )
    return snapshot_from_proto("checkout", msg, now())


def test_the_cache_holds_the_records_as_protobuf_writes_them_also_after_a_change() -> None:
    """The records' JSON, remembered per record between writes, is what protobuf's
    own JSON mapping gives for the whole Snapshot, also once records were replaced."""
    records = RecordsJSON()
    before = _full_state(7, "full")
    after = apply_change(
        before,
        agent_pb2.Change(revision=8, flags_set=[flag("mode", "degraded")], shedding_removed=True),
        now(),
    )
    for snapshot in (before, after, after):
        expected = snapshot_to_proto(snapshot)
        expected.ClearField("revision")
        written = json.loads(snapshot_to_cache(snapshot, records))
        assert written["records"] == json_format.MessageToDict(
            expected, preserving_proto_field_name=True
        )
        booted = snapshot_from_cache(snapshot_to_cache(snapshot, records), "checkout", now())
        assert (booted.flags, booted.shedding, booted.pin) == (
            snapshot.flags,
            snapshot.shedding,
            snapshot.pin,
        )
    assert "shedding" not in json.loads(snapshot_to_cache(after, records))["records"]


def test_cache_writes_are_synced_to_disk_only_at_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability policy: atomic always, synced (file, then directory) when the
    agent stops, not on each write while it runs."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = CacheWriter(tmp_path / "cache.json")
    assert writer.write(state(5, flag("a", True)), 1)
    assert writer.write(state(6, flag("a", False)), 2)
    assert synced == []
    writer.sync()
    assert synced == ["file", "directory"]
    writer.sync()  # nothing written since
    assert synced == ["file", "directory"]
    assert writer.write(state(7, flag("a", True)), 3, durable=True)
    assert synced == ["file", "directory"] * 2
    writer.sync()
    assert synced == ["file", "directory"] * 2
