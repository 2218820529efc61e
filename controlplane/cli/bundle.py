"""``cpctl bundle``: several changes from a file, applied and reverted as one; commands and
their output. The file itself is parsed by ``controlplane.bundles``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._errors import CliError, invalid
from controlplane.cli._output import (
    Rendered,
    expires_cell,
    format_percent,
    format_time,
    format_value,
    iso,
    meta_of,
    one_line,
    table,
    to_plain,
)
from controlplane.cli._params import DURATION, TIME
from controlplane.cli._write import (
    REASON_REQUIRED,
    WaitArgs,
    check_until,
    wait_command,
    write_and_wait,
)


@click.group()
def bundle() -> None:
    """Several changes applied in one transaction from a file, and reverted as one.

    \b
    A bundle file (YAML or JSON), e.g. degrade-checkout.yaml:
      name: degrade-checkout
      reason: payment provider timeouts
      incident: INC-42
      ttl: 30m                    # or until: 2026-11-26T18:00Z; neither: permanent
      changes:
        - flag: {service: checkout, name: new-ui, value: false}
        - flag: {scope: global, name: checkout.mode, value: read-only}
        - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
        - pin: {service: checkout, version: v1.4.2}
        - clear_flag: {service: checkout, name: old-banner}
        - clear_shed: {service: search}
        - unpin: {service: payments}
    """


BUNDLE_CONFLICT_HINT = (
    "someone changed the bundle's keys after it was applied (see `cpctl bundle get {id}` "
    "and `cpctl history`); --force reverts anyway and overwrites their changes"
)


@bundle.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reason", metavar="TEXT", help="Instead of the file's reason.")
@click.option("--incident", metavar="ID", help="Instead of the file's incident, e.g. INC-42.")
@click.option("--ttl", type=DURATION, help="Instead of the file's ttl or until.")
@click.option("--until", type=TIME, help="Instead of the file's ttl or until.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@wait_command(service_option=True)
@click.pass_obj
def bundle_apply(
    app: App,
    file: Path,
    reason: str | None,
    incident: str | None,
    ttl: timedelta | None,
    until: datetime | None,
    dry_run: bool,
    wait: WaitArgs,
) -> None:
    """Apply the bundle in FILE (.yaml, .yml or .json) in one transaction.

    Its reason, incident and expiry come from the file; the options replace them for this
    application. Applying a bundle that is already applied and in force is "unchanged"
    (unless it has an expiry: then it is applied anew, as a new bundle, which extends it).
    --wait waits for every service the bundle changed (a global flag: --wait-service).
    A bad file exits 3 naming the change and the field.

    JSON: {result: WriteResult, bundle: Bundle|null} (+ wait: Wait|null).
    """
    from controlplane.bundles import BundleFileError, load_bundle_file

    if ttl is not None and until is not None:
        raise click.UsageError("--ttl and --until both set an expiry: give one of them")
    if reason is not None and not reason.strip():
        raise click.UsageError("--reason is empty: leave it out to keep the file's reason")
    check_until(until)
    try:
        spec = load_bundle_file(file)
    except BundleFileError as e:
        raise invalid(str(e)) from e
    overrides: dict[str, Any] = {}
    if reason is not None:
        overrides["reason"] = reason.strip()
    if incident is not None:
        overrides["incident"] = incident
    if ttl is not None or until is not None:
        overrides.update(ttl=ttl, until=until)
    spec = dataclasses.replace(spec, **overrides)
    if wait.enabled:
        named, has_global = change_services(to_plain(c) for c in spec.changes)
        if not named and not wait.services:
            raise click.UsageError(
                "--wait needs a service: this bundle changes only global flags; name the "
                "service(s) with --wait-service S"
            )
        if has_global and not wait.services and not app.json_output:
            click.echo(
                f"note: --wait covers {', '.join(named)}; the bundle's global flags reach "
                "other services too (--wait-service S waits for them)",
                err=True,
            )
    request = spec.to_request(actor=app.actor, dry_run=dry_run)
    named, _ = change_services(to_plain(c) for c in spec.changes)
    write_and_wait(
        app, "ApplyBundle", request, render_bundle_apply, wait, _bundle_wait(wait, named)
    )


def _bundle_wait(
    wait: WaitArgs, changed: Sequence[str] = ()
) -> Callable[[Mapping[str, Any]], list[str]]:
    """The services to wait for after a bundle write: those whose keys it wrote (when it
    wrote nothing, those its ``changed`` name), and --wait-service."""

    def services(doc: Mapping[str, Any]) -> list[str]:
        named, _ = key_services((doc.get("bundle") or {}).get("keys") or [])
        return sorted({*(named or changed), *wait.services})

    return services


@bundle.command("revert")
@click.argument("bundle_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Revert even the keys changed since by others (their changes are overwritten).",
)
@click.option(
    "--reason",
    metavar="TEXT",
    help="Why you revert it. Required; recorded in the audit log.",
)
@click.option("--incident", default="", metavar="ID", help="Incident id, e.g. INC-42.")
@click.option("--dry-run", is_flag=True, help="Show what would be restored; write nothing.")
@wait_command(service_option=True)
@click.pass_obj
def bundle_revert(
    app: App,
    bundle_id: str,
    force: bool,
    reason: str | None,
    incident: str,
    dry_run: bool,
    wait: WaitArgs,
) -> None:
    """Restore what each change of bundle ID replaced, in one transaction.

    Refused (exit 4) when someone changed one of its keys since, unless --force; a
    bundle that expired needs --force too (exit 11).

    JSON: {result: WriteResult, bundle: Bundle|null, overwritten_keys: [key, ...]}
    (+ wait: Wait|null).
    """
    from controlplane.api.v1 import mitigation_pb2, types_pb2

    if reason is None or not reason.strip():
        raise click.UsageError(REASON_REQUIRED)
    if wait.enabled and not wait.services:
        # Checked before anything is written: a bundle of global flags names no service.
        found = app.call("GetBundle", mitigation_pb2.GetBundleRequest(bundle_id=bundle_id))
        named, _ = key_services((found.get("bundle") or {}).get("keys") or [])
        if not named:
            raise click.UsageError(
                "--wait needs a service: this bundle changed only global flags; name the "
                "service(s) with --wait-service S"
            )
    options = types_pb2.WriteOptions(
        reason=reason.strip(), incident=incident, dry_run=dry_run, actor=app.actor
    )
    request = mitigation_pb2.RevertBundleRequest(bundle_id=bundle_id, force=force, options=options)
    try:
        write_and_wait(app, "RevertBundle", request, render_bundle_revert, wait, _bundle_wait(wait))
    except CliError as e:
        if e.code == "ABORTED":
            e.hint = BUNDLE_CONFLICT_HINT.format(id=bundle_id)
        raise


@bundle.command("list")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=2**31 - 1),
    help="At most N bundles, newest first.  [default: all]",
)
@click.pass_obj
def bundle_list(app: App, limit: int | None) -> None:
    """List bundles, newest first, with their state.

    JSON: {bundles: [Bundle, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ListBundlesRequest(limit=limit or 0)
    respond(app, app.call("ListBundles", request), render_bundle_list)


@bundle.command("get")
@click.argument("bundle_id", metavar="ID")
@click.pass_obj
def bundle_get(app: App, bundle_id: str) -> None:
    """Show bundle ID: its state (applied, reverted, expired, partially overridden and by
    which keys), its changes, who applied it, why and when.

    JSON: {bundle: Bundle}.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.GetBundleRequest(bundle_id=bundle_id)
    respond(app, app.call("GetBundle", request), render_bundle_get)


# ---- the services a bundle concerns, for --wait ----


def key_services(keys: Iterable[str]) -> tuple[list[str], bool]:
    """The services a bundle's keys (``flags/checkout/new-ui``, ``pins/checkout``) concern,
    and whether any is a global flag."""
    services: set[str] = set()
    has_global = False
    for key in keys:
        parts = key.split("/")
        if len(parts) < 2 or not parts[1]:
            continue
        if parts[1] == "global":
            has_global = True
        else:
            services.add(parts[1])
    return sorted(services), has_global


def change_services(changes: Iterable[Mapping[str, Any]]) -> tuple[list[str], bool]:
    """The services a bundle's changes (``BundleChange`` documents) concern, and whether any
    is a global flag."""
    services: set[str] = set()
    has_global = False
    for change in changes:
        for body in change.values():
            if not isinstance(body, Mapping):
                continue
            scope = str(body.get("service") or body.get("scope") or "")
            if scope == "global":
                has_global = True
            elif scope:
                services.add(scope)
    return sorted(services), has_global


# ---- output ----

_STATES = {
    "APPLIED": "applied",
    "REVERTED": "reverted",
    "EXPIRED": "expired",
    "PARTIALLY_OVERRIDDEN": "partially overridden",
}


def format_change(change: Mapping[str, Any]) -> str:
    """One change of a bundle (a ``BundleChange`` document): ``checkout: flag new-ui = false``."""
    if change.get("set_flag"):
        c = change["set_flag"]
        return f"{c.get('scope', '?')}: flag {c.get('name', '?')} = {format_value(c.get('value'))}"
    if change.get("clear_flag"):
        c = change["clear_flag"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('scope', '?')}: clear flag {c.get('name', '?')}{layers}"
    if change.get("set_shedding"):
        c = change["set_shedding"]
        tier = c.get("tier")
        tier = "SHEDDABLE" if tier in (None, "TIER_UNSPECIFIED") else tier
        return f"{c.get('service', '?')}: shedding {tier} {format_percent(c.get('percent', 0))}"
    if change.get("clear_shedding"):
        c = change["clear_shedding"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('service', '?')}: shedding off{layers}"
    if change.get("pin_version"):
        c = change["pin_version"]
        return f"{c.get('service', '?')}: pin {c.get('version', '?')}"
    if change.get("unpin_version"):
        c = change["unpin_version"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('service', '?')}: unpin{layers}"
    return "(an empty change)"


def bundle_state(bundle: Mapping[str, Any]) -> str:
    """``applied``, ``reverted``, ``expired``, ``partially overridden (changed since: ...)``."""
    state = str(bundle.get("state", ""))
    text = _STATES.get(state, state.lower() or "unknown")
    overridden = list(bundle.get("overridden_keys") or [])
    if state == "PARTIALLY_OVERRIDDEN" and overridden:
        text += f" (changed since by others: {', '.join(overridden)})"
    return text


def _bundle_expiry(bundle: Mapping[str, Any], now: datetime) -> str:
    expires_at = meta_of(bundle).get("expires_at")
    if expires_at is None:
        return ""
    return f" · expires {format_time(expires_at, now)}"


def _summary_items(summary: str, head: str) -> list[str]:
    """The per-change parts of a bundle's summary (``<head>a; b; c``)."""
    if not summary.startswith(head):
        return [summary] if summary else []
    return [part for part in summary[len(head) :].split("; ") if part]


def render_bundle_apply(doc: Mapping[str, Any], now: datetime) -> Rendered:
    result, bundle = doc.get("result") or {}, doc.get("bundle") or {}
    summary = str(result.get("summary") or "")
    name = str(bundle.get("name") or "")
    if result.get("dry_run") and not result.get("would_change"):
        return Rendered([f"dry run: unchanged (nothing would change) · {summary}"])
    if result.get("dry_run"):
        expiry = _bundle_expiry(bundle, now)
        lines = [f"dry run: would apply bundle {name}{expiry} · nothing written"]
        lines += ["  " + item for item in _summary_items(summary, f"bundle {name}: ")]
        return Rendered([one_line(line) for line in lines])
    if not result.get("changed"):
        return Rendered([one_line(f"{summary} · unchanged")])
    bundle_id = bundle.get("id", "?")
    lines = [
        f"bundle {name} applied as {bundle_id} · rev {result.get('revision', 0)}"
        + _bundle_expiry(bundle, now)
    ]
    lines += ["  " + item for item in _summary_items(summary, f"bundle {name}: ")]
    lines.append(f'revert with: cpctl bundle revert {bundle_id} --reason "..."')
    return Rendered([one_line(line) for line in lines])


def render_bundle_revert(doc: Mapping[str, Any], now: datetime) -> Rendered:
    result, bundle = doc.get("result") or {}, doc.get("bundle") or {}
    summary = str(result.get("summary") or "")
    name, bundle_id = str(bundle.get("name") or ""), bundle.get("id", "?")
    items = ["  " + item for item in _summary_items(summary, f"bundle {name} reverted: ")]
    overwritten = list(doc.get("overwritten_keys") or [])
    if result.get("dry_run"):
        if not result.get("would_change"):
            return Rendered([one_line(f"dry run: unchanged (nothing would change) · {summary}")])
        head = f"dry run: would revert bundle {bundle_id} ({name}) · nothing written"
        warnings = []
        if overwritten:
            keys = ", ".join(overwritten)
            warnings.append(f"warning: would overwrite changes made since: {keys}")
        return Rendered([one_line(line) for line in [head, *items]], warnings)
    if not result.get("changed"):
        return Rendered([one_line(f"{summary} · unchanged")])
    head = f"bundle {bundle_id} ({name}) reverted · rev {result.get('revision', 0)}"
    warnings = []
    if overwritten:
        warnings.append(
            f"warning: --force overwrote changes made after the bundle: {', '.join(overwritten)}"
        )
    return Rendered([one_line(line) for line in [head, *items]], warnings)


def _expires_cell(bundle: Mapping[str, Any], now: datetime) -> str:
    """A bundle's EXPIRES cell: ``-`` once reverted (its expiry no longer comes)."""
    if str(bundle.get("state", "")) == "REVERTED":
        return "-"
    return expires_cell(bundle, now)


def _expiry_line(bundle: Mapping[str, Any], expires_at: datetime, now: datetime) -> str:
    """The expiry line of ``bundle get``, in the tense its state calls for."""
    state = str(bundle.get("state", ""))
    if state == "REVERTED":
        return f"expiry    none: reverted before its expiry at {iso(expires_at, seconds=True)}"
    if state == "EXPIRED":
        return (
            f"expired   {format_time(expires_at, now)}: what each change replaced applied "
            "again then"
        )
    return f"expires   {format_time(expires_at, now)}, then what each change replaced applies again"


def render_bundle_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    bundles = doc.get("bundles") or []
    if not bundles:
        return Rendered(["no bundles"])
    rows = [
        [
            str(b.get("id", "")),
            _STATES.get(str(b.get("state", "")), str(b.get("state", "")).lower()),
            str(len(b.get("changes") or [])),
            format_time(meta_of(b).get("set_at"), now),
            _expires_cell(b, now),
            str(meta_of(b).get("actor") or ""),
            str(meta_of(b).get("incident") or ""),
            str(meta_of(b).get("reason") or ""),
        ]
        for b in bundles
    ]
    headers = ["ID", "STATE", "CHANGES", "APPLIED", "EXPIRES", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


def render_bundle_get(doc: Mapping[str, Any], now: datetime) -> Rendered:
    bundle = doc.get("bundle") or {}
    meta = meta_of(bundle)
    lines = [f"bundle {bundle.get('id', '?')} ({bundle.get('name', '?')}): {bundle_state(bundle)}"]
    lines.append(
        f"  applied   by {meta.get('actor') or '?'}, {format_time(meta.get('set_at'), now)}"
        f" · rev {bundle.get('revision', 0)}"
    )
    if meta.get("reason"):
        lines.append(f"  reason    {meta['reason']}")
    if meta.get("incident"):
        lines.append(f"  incident  {meta['incident']}")
    if meta.get("expires_at") is not None:
        lines.append(f"  {_expiry_line(bundle, meta['expires_at'], now)}")
    reverted = bundle.get("reverted")
    if reverted:
        text = f"  reverted  by {reverted.get('actor') or '?'}, "
        text += format_time(reverted.get("set_at"), now)
        if reverted.get("reason"):
            text += f": {reverted['reason']}"
        lines.append(text)
    lines.append("  changes:")
    lines += [f"    {format_change(c)}" for c in bundle.get("changes") or []]
    keys = list(bundle.get("keys") or [])
    if keys:
        lines.append(f"  keys      {', '.join(keys)}")
    return Rendered([one_line(line) for line in lines])
