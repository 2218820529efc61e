"""What `cpctl` says is what is so: the real console script against a real server and etcd.

Each test reads what an engineer would read at the terminal (or a runbook with --json)
and checks it against the state in etcd.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers.cpctl import Run
from tests.helpers.raw_etcd import RawEtcd


async def ok(cpctl: Run, *args: str) -> str:
    """Run cpctl, expect exit 0, return its stdout."""
    out = await cpctl(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def some_flags(cpctl: Run) -> None:
    """checkout's own new-ui, and the global new-ux and payments.mode."""
    await ok(cpctl, "flag", "set", "checkout", "new-ui", "false", "--reason", "errors on /pay")
    await ok(cpctl, "flag", "set", "global", "new-ux", "true", "--reason", "launch")
    await ok(cpctl, "flag", "set", "global", "payments.mode", "full", "--reason", "launch")


def single_line_json(stderr: str) -> dict[str, object]:
    """The one JSON document on stderr (one line)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    document = json.loads(lines[0])
    assert isinstance(document, dict)
    return document


# ---- 1. a flag name that is not set: the closest names ----


async def test_clear_of_an_unknown_flag_stays_idempotent_and_names_the_closest(
    cpctl: Run, raw_etcd: RawEtcd
) -> None:
    await some_flags(cpctl)
    revision = await raw_etcd.revision()

    out = await cpctl("flag", "clear", "checkout", "new-iu", "--reason", "runbook step 3")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "checkout: flag new-iu not set · unchanged\n"
    # (No agent of checkout runs here: that is said first, and is not this test's point.)
    assert out.stderr.splitlines()[0].startswith("warning: no agent of service checkout")
    assert out.stderr.splitlines()[1:] == [
        "warning: no flag new-iu is set in checkout, so there is nothing to clear",
        # The service's own flag and the global one it sees; not payments.mode.
        "hint: did you mean new-ui (in checkout), new-ux (in global)?",
    ]
    assert await raw_etcd.revision() == revision

    as_json = await cpctl("--json", "flag", "clear", "checkout", "new-iu", "--reason", "again")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)  # stdout: one document, the write's result
    assert document["result"]["changed"] is False
    assert single_line_json(as_json.stderr) == {
        "warning": {
            "code": "NOT_FOUND",
            "message": "no flag new-iu is set in checkout, so there is nothing to clear",
            "did_you_mean": [
                {"scope": "checkout", "name": "new-ui"},
                {"scope": "global", "name": "new-ux"},
            ],
        }
    }

    # In the global scope only global flags are what it sees.
    global_clear = await cpctl("--json", "flag", "clear", "global", "new-iu", "--reason", "r")
    assert global_clear.returncode == 0, global_clear.stderr
    warning = single_line_json(global_clear.stderr)["warning"]
    assert isinstance(warning, dict)
    assert warning["did_you_mean"] == [{"scope": "global", "name": "new-ux"}]

    nothing_close = await cpctl("flag", "clear", "checkout", "zzz", "--reason", "r")
    assert nothing_close.returncode == 0, nothing_close.stderr
    assert "warning: no flag zzz is set in checkout" in nothing_close.stderr
    assert "`cpctl flag list checkout --effective` lists them" in nothing_close.stderr
    assert await raw_etcd.revision() == revision

    # A clear that clears says nothing of the kind.
    cleared = await cpctl("flag", "clear", "checkout", "new-ui", "--reason", "recovered")
    assert cleared.returncode == 0, cleared.stderr
    assert "cleared (was false)" in cleared.stdout
    assert "no flag" not in cleared.stderr and "did you mean" not in cleared.stderr


async def test_get_of_an_unknown_flag_names_the_closest(cpctl: Run) -> None:
    await some_flags(cpctl)

    out = await cpctl("flag", "get", "checkout", "new-iu")
    assert out.returncode == 5
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: flag new-iu is not set for checkout",
        "hint: did you mean new-ui (in checkout), new-ux (in global)?",
    ]

    as_json = await cpctl("--json", "flag", "get", "checkout", "new-iu", "--effective")
    assert as_json.returncode == 5
    assert as_json.stdout == ""
    error = single_line_json(as_json.stderr)["error"]
    assert isinstance(error, dict)
    assert error["code"] == "NOT_FOUND" and error["exit_code"] == 5
    assert error["did_you_mean"] == [
        {"scope": "checkout", "name": "new-ui"},
        {"scope": "global", "name": "new-ux"},
    ]

    # Mistyped globally: a global flag of that name, not checkout's own.
    in_global = await cpctl("flag", "get", "global", "payment.mode")
    assert in_global.returncode == 5
    assert "hint: did you mean payments.mode (in global)?" in in_global.stderr


# ---- 2. clearing a time-boxed layer: what applies now ----


async def test_clearing_a_time_boxed_pin_says_the_pin_beneath_applies_now(cpctl: Run) -> None:
    await ok(cpctl, "pin", "set", "checkout", "v1.4.2", "--reason", "bad deploy", "--ttl", "2h")
    await ok(cpctl, "pin", "set", "checkout", "v1.5.0", "--reason", "try it", "--ttl", "30m")

    lines = (await ok(cpctl, "pin", "clear", "checkout", "--reason", "v1.5.0 bad too")).splitlines()
    assert re.fullmatch(
        r"checkout: time-boxed pin v1\.5\.0 removed; checkout is still pinned · rev \d+", lines[0]
    ), lines
    assert re.fullmatch(
        r"  the pin beneath it, v1\.4\.2, applies now, until \S+Z \(in 2h\), then unpinned",
        lines[1],
    ), lines
    assert lines[2:] == [
        '  to remove every layer: cpctl pin clear checkout --all-layers --reason "..."'
    ]
    # It is so: the pin in force is v1.4.2.
    got = json.loads(await ok(cpctl, "--json", "pin", "get", "checkout"))
    assert got["pin"]["version"] == "v1.4.2"

    # The summary (in the answer and the server's log) says the same.
    await ok(cpctl, "pin", "set", "checkout", "v1.5.0", "--reason", "again", "--ttl", "30m")
    document = json.loads(await ok(cpctl, "--json", "pin", "clear", "checkout", "--reason", "r"))
    assert re.fullmatch(
        r"pin: time-boxed pin v1\.5\.0 removed \(the pin beneath it, v1\.4\.2, applies now "
        r"until \S+Z\)",
        document["result"]["summary"],
    ), document["result"]["summary"]
    assert document["restored"]["version"] == "v1.4.2"

    # --all-layers removes them all, and says which.
    await ok(cpctl, "pin", "set", "checkout", "v1.5.0", "--reason", "again", "--ttl", "30m")
    dry = await ok(cpctl, "pin", "clear", "checkout", "--all-layers", "--reason", "r", "--dry-run")
    assert dry == (
        "dry run: would unpin checkout (was v1.5.0, and every layer beneath it: v1.4.2)"
        " · nothing written\n"
    )
    everything = await ok(cpctl, "pin", "clear", "checkout", "--all-layers", "--reason", "r")
    assert re.fullmatch(
        r"checkout: unpinned \(was v1\.5\.0, and every layer beneath it: v1\.4\.2\) · rev \d+\n",
        everything,
    ), everything
    assert (await cpctl("pin", "get", "checkout")).returncode == 5


async def test_clearing_a_time_boxed_flag_or_shedding_says_what_applies_now(cpctl: Run) -> None:
    await ok(cpctl, "flag", "set", "checkout", "new-ui", "true", "--reason", "launch")
    await ok(cpctl, "flag", "set", "checkout", "new-ui", "false", "--reason", "r", "--ttl", "1h")
    flag_lines = (await ok(cpctl, "flag", "clear", "checkout", "new-ui", "--reason", "r")).split(
        "\n"
    )
    assert re.fullmatch(
        r"checkout: time-boxed value false of flag new-ui removed; new-ui is still set · rev \d+",
        flag_lines[0],
    ), flag_lines
    assert flag_lines[1:] == [
        "  the value beneath it, true, applies now (no expiry)",
        '  to remove every layer: cpctl flag clear checkout new-ui --all-layers --reason "..."',
        "",
    ]
    got = json.loads(await ok(cpctl, "--json", "flag", "get", "checkout", "new-ui"))
    assert got["flag"]["value"] is True

    await ok(cpctl, "shed", "set", "checkout", "20", "--reason", "hot")
    await ok(
        cpctl, "shed", "set", "checkout", "50", "--tier", "SHEDDABLE_PLUS", "--reason", "hotter",
        "--ttl", "1h",
    )  # fmt: skip
    dry = (await ok(cpctl, "shed", "clear", "checkout", "--reason", "r", "--dry-run")).split("\n")
    assert dry == [
        "dry run: would remove the time-boxed shedding SHEDDABLE_PLUS 50% of checkout; "
        "shedding would stay set · nothing written",
        "  the level beneath it, SHEDDABLE 20%, would apply (no expiry)",
        '  to remove every layer: cpctl shed clear checkout --all-layers --reason "..."',
        "",
    ]
    shed_lines = (await ok(cpctl, "shed", "clear", "checkout", "--reason", "r")).split("\n")
    assert re.fullmatch(
        r"checkout: time-boxed shedding SHEDDABLE_PLUS 50% removed; shedding is still set"
        r" · rev \d+",
        shed_lines[0],
    ), shed_lines
    assert shed_lines[1] == "  the level beneath it, SHEDDABLE 20%, applies now (no expiry)"
    got = json.loads(await ok(cpctl, "--json", "shed", "get", "checkout"))
    assert (got["shedding"]["tier"], got["shedding"]["percent"]) == ("SHEDDABLE", 20)


# ---- 3. rollback: back, never forward, and why not ----


async def test_rollback_says_which_versions_it_considered_and_why_not(cpctl: Run) -> None:
    await ok(cpctl, "known-good", "mark", "checkout", "v1.4.2", "--reason", "verified")
    await ok(cpctl, "known-good", "mark", "checkout", "v1.3.0", "--reason", "verified late")
    await ok(cpctl, "pin", "set", "checkout", "v1.4.2", "--reason", "steady")

    out = await cpctl("rollback", "checkout", "--reason", "errors")
    assert out.returncode == 11
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: nothing to roll back to: checkout is on v1.4.2 (its pin); v1.4.2 is itself "
        "marked known-good, so only versions marked before it qualify, and there is none. "
        "Considered:",
        "  v1.3.0 was marked after v1.4.2 (a rollback goes back, never forward); pin it with "
        "`cpctl pin set checkout v1.3.0` if you mean it",
        "  v1.4.2 is the current version",
    ]
    got = json.loads(await ok(cpctl, "--json", "pin", "get", "checkout"))
    assert got["pin"]["version"] == "v1.4.2"

    nothing_marked = await cpctl(
        "rollback", "payments", "--current-version", "v2.0.0", "--reason", "errors"
    )
    assert nothing_marked.returncode == 11
    assert "payments is on v2.0.0" in nothing_marked.stderr
    assert "has no known-good versions: mark one" in nothing_marked.stderr

    help_text = " ".join((await ok(cpctl, "rollback", "--help")).split())
    assert (
        "Back, never forward: when the current version is itself marked known-good, only "
        "versions marked before it qualify" in help_text
    )


# ---- 4. an --until that has gone by ----

_NOW_SHOWN = re.compile(r"it is now (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \(UTC\)")


def shown_now(text: str) -> datetime:
    """The current time an error shows."""
    match = _NOW_SHOWN.search(text)
    assert match, text
    return datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))


async def test_a_past_until_shows_the_time_now_and_offers_ttl(
    cpctl: Run, raw_etcd: RawEtcd, tmp_path: Path
) -> None:
    revision = await raw_etcd.revision()
    before = datetime.now(UTC).replace(microsecond=0)
    out = await cpctl(
        "flag", "set", "checkout", "new-ui", "false", "--reason", "r", "--until", "2020-01-01T00:00"
    )
    assert out.returncode == 3
    assert out.stderr.startswith("error: --until 2020-01-01T00:00:00Z is in the past: it is now ")
    assert "give a later time (one without an offset is UTC)" in out.stderr
    assert "--ttl instead, e.g. --ttl 30m" in out.stderr
    assert before <= shown_now(out.stderr) <= datetime.now(UTC)

    as_json = await cpctl("--json", "pin", "set", "checkout", "v1", "--reason", "r", "--until",
                          "2020-01-01")  # fmt: skip
    assert as_json.returncode == 3
    error = single_line_json(as_json.stderr)["error"]
    assert isinstance(error, dict)
    assert "is in the past: it is now " in str(error["message"])
    assert "--ttl" in str(error["message"])

    # A bundle file's until is checked by the server: its INVALID_ARGUMENT says the same.
    bundle = tmp_path / "late.yaml"
    bundle.write_text(
        "name: late\nreason: r\nuntil: 2021-05-01T10:00Z\n"
        "changes:\n  - flag: {service: checkout, name: new-ui, value: false}\n",
        encoding="utf-8",
    )
    served = await cpctl("bundle", "apply", str(bundle))
    assert served.returncode == 3
    assert served.stderr.startswith(
        "error: options.expires_at: 2021-05-01T10:00:00Z is in the past: it is now "
    )
    assert "a duration from now as ttl instead (cpctl --ttl 30m" in served.stderr
    assert before <= shown_now(served.stderr) <= datetime.now(UTC)
    assert await raw_etcd.revision() == revision


# ---- 5. expiries as they are ----


def table_rows(text: str) -> list[dict[str, str]]:
    """A cpctl table as dicts, cells split on runs of two spaces or more."""
    header, *rows = text.splitlines()
    names = re.split(r" {2,}", header.strip())
    return [dict(zip(names, re.split(r" {2,}", row.strip()), strict=False)) for row in rows]


async def test_relative_times_are_rounded_and_reverted_bundles_do_not_expire(
    cpctl: Run, tmp_path: Path
) -> None:
    written = await ok(
        cpctl, "flag", "set", "checkout", "new-ui", "false", "--reason", "r", "--ttl", "30m"
    )
    # Read a moment after the write: 30 minutes away, not "29m".
    assert re.search(r" · expires \S+Z \(in 30m\), then unset$", written.strip()), written
    listed = await ok(cpctl, "flag", "list", "checkout")
    assert table_rows(listed)[0]["EXPIRES"].endswith("(in 30m)"), listed

    bundle = tmp_path / "degrade.yaml"
    bundle.write_text(
        "name: degrade\nreason: provider timeouts\nttl: 2h\n"
        "changes:\n  - shed: {service: checkout, percent: 30}\n",
        encoding="utf-8",
    )
    applied = json.loads(await ok(cpctl, "--json", "bundle", "apply", str(bundle)))
    bundle_id = applied["bundle"]["id"]
    (row,) = table_rows(await ok(cpctl, "bundle", "list"))
    assert (row["ID"], row["STATE"]) == (bundle_id, "applied")
    assert row["EXPIRES"].endswith("(in 2h)"), row

    await ok(cpctl, "bundle", "revert", bundle_id, "--reason", "provider recovered")
    (row,) = table_rows(await ok(cpctl, "bundle", "list"))
    assert (row["ID"], row["STATE"], row["EXPIRES"]) == (bundle_id, "reverted", "-")
    shown = await ok(cpctl, "bundle", "get", bundle_id)
    expiry = next(line for line in shown.splitlines() if line.startswith("  expir"))
    expires_at = datetime.fromisoformat(applied["bundle"]["meta"]["expires_at"])
    assert expiry == (
        "  expiry    none: reverted before its expiry at "
        f"{expires_at.astimezone(UTC).replace(microsecond=0).isoformat().replace('+00:00', 'Z')}"
    )
    assert "(in " not in shown
    assert expires_at - datetime.now(UTC) > timedelta(hours=1)
