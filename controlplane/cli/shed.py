"""``cpctl shed``: load shedding; commands and their output."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._errors import invalid
from controlplane.cli._output import (
    Rendered,
    beneath_lines,
    cleared,
    every_layer,
    expires_cell,
    expiry_note,
    format_percent,
    meta_cells,
    record_details,
    table,
    time_boxed,
    write_line,
)
from controlplane.cli._params import parse_percent
from controlplane.cli._write import WaitArgs, WriteArgs, wait_command, write_and_wait, write_command

TIERS = ("SHEDDABLE", "SHEDDABLE_PLUS", "CRITICAL", "CRITICAL_PLUS")


@click.group()
def shed() -> None:
    """Load shedding: shed every request less critical than a tier, and PERCENT of it.

    \b
    Tiers, least to most important: SHEDDABLE, SHEDDABLE_PLUS, CRITICAL, CRITICAL_PLUS.
      shed set checkout 30                        30% of SHEDDABLE
      shed set checkout 100 --tier SHEDDABLE_PLUS  all SHEDDABLE and SHEDDABLE_PLUS
      shed set checkout 20 --tier CRITICAL         all sheddable requests, 20% of CRITICAL
    """


@shed.command("set")
@click.argument("service")
@click.argument("percent", metavar="PERCENT")
@click.option(
    "--tier",
    type=click.Choice(TIERS, case_sensitive=False),
    help="The tier PERCENT applies to; every less critical request is shed.  [default: SHEDDABLE]",
)
@write_command
@wait_command()
@click.pass_obj
def shed_set(
    app: App, service: str, percent: str, tier: str | None, write: WriteArgs, wait: WaitArgs
) -> None:
    """Shed PERCENT (0 to 100) of the tier's requests of SERVICE.

    JSON: {result: WriteResult, shedding: Shedding, previous: Shedding|null}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    try:
        value = parse_percent(percent)
    except ValueError as e:
        raise invalid(str(e)) from e
    request = mitigation_pb2.SetSheddingRequest(
        service=service,
        tier=tier.upper() if tier else "TIER_UNSPECIFIED",
        percent=value,
        options=write.to_proto(app.actor),
    )
    write_and_wait(app, "SetShedding", request, render_shed_set, wait, lambda _: (service,))


@shed.command("get")
@click.argument("service")
@click.pass_obj
def shed_get(app: App, service: str) -> None:
    """Show the shedding level of SERVICE.

    JSON: {shedding: Shedding|null}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("GetShedding", mitigation_pb2.GetSheddingRequest(service=service))
    respond(app, doc, lambda d, now: render_shed_get(d, now, service))


@shed.command("list")
@click.pass_obj
def shed_list(app: App) -> None:
    """List the services that shed load.

    JSON: {shedding: [Shedding, ...], revision: N}.
    """
    from controlplane.api.v1 import mitigation_pb2

    doc = app.call("ListShedding", mitigation_pb2.ListSheddingRequest())
    respond(app, doc, render_shed_list)


@shed.command("clear")
@click.argument("service")
@click.option(
    "--all-layers", is_flag=True, help="Remove every time-boxed layer, not only the top one."
)
@write_command
@wait_command()
@click.pass_obj
def shed_clear(app: App, service: str, all_layers: bool, write: WriteArgs, wait: WaitArgs) -> None:
    """Stop shedding load on SERVICE.

    Clearing a time-boxed level removes only that level: the level it replaced applies
    again (the output says which, until when). --all-layers removes every level.

    JSON: {result: WriteResult, removed: Shedding|null, restored: Shedding|null}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ClearSheddingRequest(
        service=service, all_layers=all_layers, options=write.to_proto(app.actor)
    )

    def render(doc: Mapping[str, Any], now: datetime) -> Rendered:
        return render_shed_clear(doc, now, service)

    write_and_wait(app, "ClearShedding", request, render, wait, lambda _: (service,))


# ---- output ----


def shedding_text(record: Mapping[str, Any] | None) -> str:
    """``SHEDDABLE_PLUS 50%``, ``off`` when there is no shedding."""
    if not record:
        return "off"
    return f"{record.get('tier', '?')} {format_percent(record.get('percent', 0))}"


def shedding_meaning(record: Mapping[str, Any]) -> str:
    """What a shedding level does: ``sheds all of SHEDDABLE and 50% of SHEDDABLE_PLUS``."""
    tier, percent = str(record.get("tier", "?")), format_percent(record.get("percent", 0))
    order = ["CRITICAL_PLUS", "CRITICAL", "SHEDDABLE_PLUS", "SHEDDABLE"]
    below = order[order.index(tier) + 1 :] if tier in order else []
    all_of = f"all of {', '.join(below)} and " if below else ""
    return f"sheds {all_of}{percent} of {tier}"


def render_shed_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    shedding, result = doc.get("shedding") or {}, doc.get("result") or {}
    service, level = shedding.get("service", "?"), shedding_text(shedding)
    was = shedding_text(doc.get("previous"))
    line = write_line(
        result,
        done=f"{service}: shedding {level} (was {was})",
        would=f"set {service}: shedding {level} (was {was})",
        same=f"{service}: shedding {level}",
        expiry=expiry_note(shedding, now, shedding_text),
    )
    return Rendered([line])


def render_shed_clear(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    clear = cleared(doc, now)
    was = shedding_text(clear.removed)
    if clear.restored:
        # A time-boxed level came off and the level beneath it applies.
        boxed = time_boxed(clear.removed)
        line = write_line(
            clear.result,
            done=f"{service}: {boxed}shedding {was} removed; shedding is still set",
            would=f"remove the {boxed}shedding {was} of {service}; shedding would stay set",
            same=f"{service}: shedding off",
        )
        more = beneath_lines(
            clear, now, shedding_text, layer="level", command=f"cpctl shed clear {service}"
        )
        return Rendered([line, *more])
    was += every_layer(clear.beneath, shedding_text)
    line = write_line(
        clear.result,
        done=f"{service}: shedding off (was {was})",
        would=f"clear {service}: shedding (was {was})",
        same=f"{service}: shedding off",
    )
    return Rendered([line])


def render_shed_get(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    shedding = doc.get("shedding")
    if not shedding:
        return Rendered([f"{service}: no shedding"])
    head = f"{service}: shedding {shedding_text(shedding)} ({shedding_meaning(shedding)})"
    return Rendered([head, *record_details(shedding, now, shedding_text)])


def render_shed_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    items = doc.get("shedding") or []
    if not items:
        return Rendered(["no shedding"])
    rows = [
        [
            s.get("service", ""),
            str(s.get("tier", "")),
            format_percent(s.get("percent", 0)),
            expires_cell(s, now),
            *meta_cells(s),
        ]
        for s in items
    ]
    headers = ["SERVICE", "TIER", "PERCENT", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))
