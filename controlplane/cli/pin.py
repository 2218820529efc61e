"""``cpctl pin``, ``known-good`` and ``rollback``: version pins and what a rollback goes
back to; commands and their output."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._output import (
    Rendered,
    beneath_lines,
    cleared,
    every_layer,
    expires_cell,
    expiry_note,
    format_time,
    meta_cells,
    meta_of,
    record_details,
    table,
    time_boxed,
    write_line,
)
from controlplane.cli._write import WaitArgs, WriteArgs, wait_command, write_and_wait, write_command


@click.group()
def pin() -> None:
    """Pin a service to a version (its deploy hook redeploys it)."""


@pin.command("set")
@click.argument("service")
@click.argument("version")
@write_command
@wait_command()
@click.pass_obj
def pin_set(app: App, service: str, version: str, write: WriteArgs, wait: WaitArgs) -> None:
    """Pin SERVICE to VERSION.

    JSON: {result: WriteResult, pin: Pin, previous: Pin|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.PinVersionRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    write_and_wait(app, "PinVersion", request, render_pin_set, wait, lambda _: (service,))


@pin.command("get")
@click.argument("service")
@click.pass_obj
def pin_get(app: App, service: str) -> None:
    """Show the pin of SERVICE.

    JSON: {pin: Pin|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetPin", mitigation_pb2.GetPinRequest(service=service))
    respond(app, doc, lambda d, now: render_pin_get(d, now, service))


@pin.command("list")
@click.pass_obj
def pin_list(app: App) -> None:
    """List pinned services.

    JSON: {pins: [Pin, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    respond(app, app.call("ListPins", mitigation_pb2.ListPinsRequest()), render_pin_list)


@pin.command("clear")
@click.argument("service")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command()
@click.pass_obj
def pin_clear(app: App, service: str, all_layers: bool, write: WriteArgs, wait: WaitArgs) -> None:
    """Unpin SERVICE.

    Clearing a time-boxed pin removes only that pin: the pin it replaced applies again
    (SERVICE stays pinned; the output says to which version, until when). --all-layers
    removes every pin in the chain.

    JSON: {result: WriteResult, removed: Pin|null, restored: Pin|null} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.UnpinVersionRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> Rendered:
        return render_pin_clear(doc, now, service)

    write_and_wait(app, "UnpinVersion", request, render, wait, lambda _: (service,))


@click.group("known-good")
def known_good() -> None:
    """Versions marked known-good: what `rollback` goes back to."""


@known_good.command("mark")
@click.argument("service")
@click.argument("version")
@write_command
@click.pass_obj
def known_good_mark(app: App, service: str, version: str, write: WriteArgs) -> None:
    """Mark VERSION of SERVICE known-good.

    JSON: {result: WriteResult, known_good: KnownGood}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.MarkKnownGoodRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    respond(app, app.call("MarkKnownGood", request), render_known_good_mark)


@known_good.command("unmark")
@click.argument("service")
@click.argument("version")
@write_command
@click.pass_obj
def known_good_unmark(app: App, service: str, version: str, write: WriteArgs) -> None:
    """Withdraw the known-good mark of VERSION of SERVICE.

    JSON: {result: WriteResult, removed: KnownGood|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.UnmarkKnownGoodRequest(
        service=service, version=version, options=write.to_proto(app.actor)
    )
    doc = app.call("UnmarkKnownGood", request)
    respond(app, doc, lambda d, now: render_known_good_unmark(d, now, service, version))


@known_good.command("list")
@click.argument("service")
@click.pass_obj
def known_good_list(app: App, service: str) -> None:
    """List the known-good versions of SERVICE, most recently marked first.

    JSON: {known_good: [KnownGood, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("ListKnownGood", mitigation_pb2.ListKnownGoodRequest(service=service))
    respond(app, doc, lambda d, now: render_known_good_list(d, now, service))


@click.command()
@click.argument("service")
@click.option(
    "--current-version",
    default="",
    metavar="V",
    help="The version SERVICE runs, when it has no pin.",
)
@write_command
@wait_command()
@click.pass_obj
def rollback(
    app: App, service: str, current_version: str, write: WriteArgs, wait: WaitArgs
) -> None:
    """Pin SERVICE to its most recently marked known-good version other than the current one.

    "Current" is the pin or, without one, --current-version. Back, never forward: when the
    current version is itself marked known-good, only versions marked before it qualify
    (pin a version marked after it with `cpctl pin set` if you mean to go there). Exit 11
    when there is nothing to roll back to; the error names each version considered and
    why it was not taken.

    JSON: {result: WriteResult, pin: Pin, from_version: V} (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.RollbackRequest(
        service=service, current_version=current_version, options=write.to_proto(app.actor)
    )
    write_and_wait(app, "Rollback", request, render_rollback, wait, lambda _: (service,))


# ---- output ----


def pin_text(record: Mapping[str, Any] | None) -> str:
    """A pin's version, ``unpinned`` when there is no pin."""
    return str(record.get("version", "?")) if record else "unpinned"


def render_pin_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pin, result = doc.get("pin") or {}, doc.get("result") or {}
    service, version = pin.get("service", "?"), pin_text(pin)
    history = pin.get("previous") or {}
    was = (
        pin_text(doc.get("previous"))
        if doc.get("previous")
        else history.get("version") or "unpinned"
    )
    line = write_line(
        result,
        done=f"{service}: pinned to {version} (was {was})",
        would=f"pin {service} to {version} (was {was})",
        same=f"{service}: pinned to {version}",
        expiry=expiry_note(pin, now, pin_text),
    )
    return Rendered([line])


def render_pin_clear(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    clear = cleared(doc, now)
    was = pin_text(clear.removed)
    if clear.restored:
        # A time-boxed pin came off and the pin beneath it applies: still pinned.
        boxed = time_boxed(clear.removed)
        line = write_line(
            clear.result,
            done=f"{service}: {boxed}pin {was} removed; {service} is still pinned",
            would=f"remove the {boxed}pin {was} of {service}; it would stay pinned",
            same=f"{service}: not pinned",
        )
        more = beneath_lines(
            clear, now, pin_text, layer="pin", command=f"cpctl pin clear {service}"
        )
        return Rendered([line, *more])
    was += every_layer(clear.beneath, pin_text)
    line = write_line(
        clear.result,
        done=f"{service}: unpinned (was {was})",
        would=f"unpin {service} (was {was})",
        same=f"{service}: not pinned",
    )
    return Rendered([line])


def render_pin_get(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    pin = doc.get("pin")
    if not pin:
        return Rendered([f"{service}: not pinned"])
    head = f"{service}: pinned to {pin_text(pin)}"
    previous = pin.get("previous")
    if previous:
        head += f" (was {previous.get('version', '?')})"
    return Rendered([head, *record_details(pin, now, pin_text)])


def render_pin_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pins = doc.get("pins") or []
    if not pins:
        return Rendered(["no pins"])
    rows = [
        [
            p.get("service", ""),
            pin_text(p),
            str((p.get("previous") or {}).get("version") or "-"),
            expires_cell(p, now),
            *meta_cells(p),
        ]
        for p in pins
    ]
    headers = ["SERVICE", "VERSION", "PREVIOUS", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


def render_known_good_mark(doc: Mapping[str, Any], now: datetime) -> Rendered:
    record, result = doc.get("known_good") or {}, doc.get("result") or {}
    service, version = record.get("service", "?"), record.get("version", "?")
    line = write_line(
        result,
        done=f"{service}: {version} marked known-good",
        would=f"mark {service}: {version} known-good",
        same=f"{service}: {version} already known-good",
    )
    return Rendered([line])


def render_known_good_unmark(
    doc: Mapping[str, Any], now: datetime, service: str, version: str
) -> Rendered:
    result = doc.get("result") or {}
    line = write_line(
        result,
        done=f"{service}: {version} no longer known-good",
        would=f"unmark {service}: {version} as known-good",
        same=f"{service}: {version} not marked known-good",
    )
    return Rendered([line])


def render_known_good_list(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    items = doc.get("known_good") or []
    if not items:
        return Rendered([f"{service}: no known-good versions"])
    rows = [
        [
            k.get("version", ""),
            format_time(meta_of(k).get("set_at"), now),
            str(meta_of(k).get("actor") or ""),
            str(meta_of(k).get("reason") or ""),
        ]
        for k in items
    ]
    return Rendered(table(["VERSION", "MARKED", "ACTOR", "REASON"], rows))


def render_rollback(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pin, result = doc.get("pin") or {}, doc.get("result") or {}
    service, version = pin.get("service", "?"), pin_text(pin)
    source = doc.get("from_version") or "?"
    line = write_line(
        result,
        done=f"{service}: rolled back {source} -> {version} (pinned)",
        would=f"roll back {service}: {source} -> {version}",
        same=f"{service}: pinned to {version}",
        expiry=expiry_note(pin, now, pin_text),
    )
    return Rendered([line])
