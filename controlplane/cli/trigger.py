"""``cpctl trigger``: alerts mapped to a bundle (set, list, get, enable, disable, delete),
and firing or resolving one by hand or from a script."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from controlplane.cli._app import App, respond
from controlplane.cli._errors import invalid
from controlplane.cli._output import Rendered, format_age, iso, table
from controlplane.cli._params import DURATION
from controlplane.cli._write import REASON_REQUIRED


@click.group()
def trigger() -> None:
    """Triggers: an alert that matches applies a bundle, once per alert group.

    \b
    Alertmanager posts its webhook to the server's HTTP listener:
      receivers:
        - name: controlplane
          webhook_configs:
            - url: http://127.0.0.1:8016/v1/alertmanager
              send_resolved: true
    A firing group whose labels match a trigger's --match applies its bundle (actor
    trigger:NAME); Alertmanager's repeats apply nothing new; a resolved group reverts
    it when the trigger has --revert-on-resolve. Tools that cannot speak Alertmanager's
    format use `cpctl trigger fire` / `resolve` or POST /v1/triggers/NAME/fire.
    """


def _options(app: App, reason: str | None, dry_run: bool = False) -> Any:
    from controlplane.api.v1 import types_pb2

    if reason is None or not reason.strip():
        raise click.UsageError(REASON_REQUIRED)
    return types_pb2.WriteOptions(reason=reason.strip(), actor=app.actor, dry_run=dry_run)


_DRY_RUN = click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")


def _matchers(given: Sequence[str]) -> list[Any]:
    """The --match texts as LabelMatcher messages (the server checks them)."""
    from controlplane.model import MatcherSyntaxError, parse_matcher

    found = []
    for item in given:
        try:
            found.append(parse_matcher(item).to_proto())
        except MatcherSyntaxError as e:
            raise click.BadParameter(str(e), param_hint="--match") from None
    return found


@trigger.command("set")
@click.argument("name")
@click.option(
    "--match",
    "matches",
    multiple=True,
    required=True,
    metavar="LABEL=VALUE",
    help="An alert label the trigger needs (repeat: all must hold). As in Alertmanager: "
    "LABEL=VALUE, LABEL!=VALUE, LABEL=~REGEX, LABEL!~REGEX (RE2, the whole value); a "
    "label the alert lacks is \"\". Quote it for the shell: --match 'severity=~critical|page'.",
)
@click.option(
    "--bundle",
    "bundle_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bundle file to apply (its content is stored: later edits of the file do not "
    "change the trigger).",
)
@click.option("--ttl", type=DURATION, help="The bundle's expiry when fired (else the file's).")
@click.option(
    "--revert-on-resolve", is_flag=True, help="Revert the bundle when the alert resolves."
)
@click.option(
    "--cooldown", type=DURATION, help="After firing, fire nothing for this long (e.g. 10m)."
)
@click.option(
    "--dry-run", is_flag=True, help="A trigger that, when fired, says what it would apply."
)
@click.option("--check", is_flag=True, help="Validate the trigger and its bundle; write nothing.")
@click.option("--reason", metavar="TEXT", help="Why this trigger exists. Required.")
@click.pass_obj
def trigger_set(
    app: App,
    name: str,
    matches: Sequence[str],
    bundle_file: Path,
    ttl: timedelta | None,
    revert_on_resolve: bool,
    cooldown: timedelta | None,
    dry_run: bool,
    check: bool,
    reason: str | None,
) -> None:
    """Set trigger NAME: alerts matching every --match apply the bundle in --bundle.

    Setting an existing trigger replaces it (its enabled state stays). The bundle is
    validated now, as `cpctl bundle apply --dry-run` would; a bundle file with `until`
    (an absolute time) cannot be a trigger's: give it a ttl.

    JSON: {result: WriteResult, trigger: Trigger}.
    """
    from controlplane.api.v1 import mitigation_pb2
    from controlplane.bundles import BundleFileError, load_bundle_file

    options = _options(app, reason, dry_run=check)
    try:
        spec = load_bundle_file(bundle_file)
    except BundleFileError as e:
        raise invalid(str(e)) from e
    if spec.until is not None:
        raise invalid(
            f"{bundle_file}: until is an absolute time, which a trigger firing later cannot "
            "use: give the bundle a ttl (or --ttl)"
        )
    message = mitigation_pb2.Trigger(
        name=name,
        matchers=_matchers(matches),
        bundle_name=spec.name,
        changes=spec.to_request(actor=app.actor).changes,
        revert_on_resolve=revert_on_resolve,
        dry_run=dry_run,
    )
    expiry = ttl if ttl is not None else spec.ttl
    if expiry is not None:
        message.ttl.FromTimedelta(expiry)
    if cooldown is not None:
        message.cooldown.FromTimedelta(cooldown)
    request = mitigation_pb2.SetTriggerRequest(trigger=message, options=options)
    respond(app, app.call("SetTrigger", request), render_written)


@trigger.command("list")
@click.pass_obj
def trigger_list(app: App) -> None:
    """The triggers: what each matches, its bundle, its options.

    JSON: {triggers: [Trigger, ...]}.
    """
    from controlplane.api.v1 import mitigation_pb2

    respond(app, app.call("ListTriggers", mitigation_pb2.ListTriggersRequest()), render_list)


@trigger.command("get")
@click.argument("name")
@click.pass_obj
def trigger_get(app: App, name: str) -> None:
    """One trigger, with its bundle's changes and when it last fired.

    JSON: {trigger: Trigger}.
    """
    from controlplane.api.v1 import mitigation_pb2

    respond(app, app.call("GetTrigger", mitigation_pb2.GetTriggerRequest(name=name)), render_get)


def _enable(app: App, name: str, enabled: bool, reason: str | None, dry_run: bool) -> None:
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.SetTriggerEnabledRequest(
        name=name, enabled=enabled, options=_options(app, reason, dry_run)
    )
    respond(app, app.call("SetTriggerEnabled", request), render_written)


@trigger.command("enable")
@click.argument("name")
@click.option("--reason", metavar="TEXT", help="Why. Required.")
@_DRY_RUN
@click.pass_obj
def trigger_enable(app: App, name: str, reason: str | None, dry_run: bool) -> None:
    """Let trigger NAME fire again. JSON: {result, trigger}."""
    _enable(app, name, True, reason, dry_run)


@trigger.command("disable")
@click.argument("name")
@click.option("--reason", metavar="TEXT", help="Why. Required.")
@_DRY_RUN
@click.pass_obj
def trigger_disable(app: App, name: str, reason: str | None, dry_run: bool) -> None:
    """Stop trigger NAME from firing (an alert then applies nothing and says so).
    JSON: {result, trigger}."""
    _enable(app, name, False, reason, dry_run)


@trigger.command("delete")
@click.argument("name")
@click.option("--reason", metavar="TEXT", help="Why. Required.")
@_DRY_RUN
@click.pass_obj
def trigger_delete(app: App, name: str, reason: str | None, dry_run: bool) -> None:
    """Delete trigger NAME (the bundles it applied stay). JSON: {result}."""
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.DeleteTriggerRequest(name=name, options=_options(app, reason, dry_run))
    respond(app, app.call("DeleteTrigger", request), render_written)


@trigger.command("fire")
@click.argument("name")
@click.option(
    "--group-key", default="", help="The alert group (a repeat of it applies nothing new)."
)
@click.option("--incident", default="", metavar="ID", help="The incident, e.g. INC-42.")
@click.option("--summary", default="", help="What the alert says (audit, notifications).")
@click.option("--url", default="", help="Where to read about the alert.")
@click.pass_obj
def trigger_fire(
    app: App, name: str, group_key: str, incident: str, summary: str, url: str
) -> None:
    """Fire trigger NAME as an alert would.

    JSON: {outcome, bundle_id, message, result}; outcome: TRIGGER_FIRED,
    TRIGGER_ALREADY_FIRED, TRIGGER_DISABLED, TRIGGER_COOLDOWN, TRIGGER_WOULD_APPLY.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.FireTriggerRequest(
        name=name, group_key=group_key, incident=incident, summary=summary, url=url
    )
    respond(app, app.call("FireTrigger", request), render_firing)


@trigger.command("resolve")
@click.argument("name")
@click.option("--group-key", default="", help="The alert group that resolved.")
@click.pass_obj
def trigger_resolve(app: App, name: str, group_key: str) -> None:
    """Resolve trigger NAME's alert: its bundle is reverted if it says --revert-on-resolve.

    JSON: {outcome, bundle_id, message}; outcome TRIGGER_REVERTED or TRIGGER_NOT_REVERTED.
    """
    from controlplane.api.v1 import mitigation_pb2

    request = mitigation_pb2.ResolveTriggerRequest(name=name, group_key=group_key)
    respond(app, app.call("ResolveTrigger", request), render_firing)


# ---- output ----


_OPS = {"MATCH_NOT_EQUAL": "!=", "MATCH_REGEX": "=~", "MATCH_NOT_REGEX": "!~"}


def _matched(entry: Mapping[str, Any]) -> str:
    from controlplane.model import Matcher, MatchOp

    return ", ".join(
        Matcher(
            str(m.get("label", "")),
            MatchOp(_OPS.get(str(m.get("type", "")), "=")),
            str(m.get("value", "")),
        ).text
        for m in entry.get("matchers") or []
    )


def _options_text(entry: Mapping[str, Any]) -> str:
    parts = []
    if entry.get("ttl") is not None:
        parts.append(f"ttl {format_age(entry['ttl'])}")
    if entry.get("revert_on_resolve"):
        parts.append("revert on resolve")
    if entry.get("cooldown") is not None:
        parts.append(f"cooldown {format_age(entry['cooldown'])}")
    if entry.get("dry_run"):
        parts.append("dry run")
    return ", ".join(parts) or "-"


def render_written(doc: Mapping[str, Any], now: datetime) -> Rendered:
    result = doc.get("result") or {}
    summary = str(result.get("summary") or "done")
    if result.get("dry_run"):
        return Rendered([f"dry run: {summary} (nothing written)"])
    return Rendered([summary])


def render_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    entries = doc.get("triggers") or []
    if not entries:
        return Rendered(["no triggers"])
    rows = [
        [
            str(e.get("name", "?")),
            "enabled" if e.get("enabled") else "DISABLED",
            _matched(e),
            f"{e.get('bundle_name', '?')} ({len(e.get('changes') or [])} changes)",
            _options_text(e),
        ]
        for e in entries
    ]
    return Rendered(table(["TRIGGER", "STATE", "MATCHES", "BUNDLE", "OPTIONS"], rows))


def render_get(doc: Mapping[str, Any], now: datetime) -> Rendered:
    entry = doc.get("trigger") or {}
    meta = entry.get("meta") or {}
    last = entry.get("last_fired")
    lines = [
        f"trigger {entry.get('name')}: {'enabled' if entry.get('enabled') else 'DISABLED'}",
        f"  matches: {_matched(entry)}",
        f"  bundle:  {entry.get('bundle_name')} ({len(entry.get('changes') or [])} changes)",
        f"  options: {_options_text(entry)}",
        f"  set by {meta.get('actor') or '?'}: {meta.get('reason') or ''}",
        f"  last fired: {iso(last, seconds=True) if last is not None else 'never'}",
    ]
    return Rendered(lines)


def render_firing(doc: Mapping[str, Any], now: datetime) -> Rendered:
    outcome = str(doc.get("outcome", "")).removeprefix("TRIGGER_").lower().replace("_", " ")
    return Rendered([f"{outcome}: {doc.get('message', '')}"])
