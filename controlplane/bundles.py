"""Bundle files: several mitigations applied and reverted as one, written as YAML or JSON.

A runbook keeps its mitigation as a file::

    name: degrade-checkout
    reason: payment provider timeouts
    incident: INC-42
    ttl: 30m                      # or  until: 2026-11-26T18:00Z  (neither: permanent)
    changes:
      - flag: {service: checkout, name: new-ui, value: false}
      - flag: {scope: global, name: checkout.mode, value: read-only}
      - shed: {service: checkout, percent: 30, tier: SHEDDABLE_PLUS}
      - pin: {service: checkout, version: v1.4.2}
      - clear_flag: {service: checkout, name: old-banner}
      - clear_shed: {service: search}
      - unpin: {service: payments}

``flag`` and ``clear_flag`` take ``service`` or ``scope`` (``global`` or a
service); clears take ``all_layers: true`` to remove a whole time-boxed chain.
At most 31 changes (etcd's 128 operations per transaction). Errors name the
change and the field: ``changes[2].shed.percent: 150 is out of range: must be 0
to 100``.

From Python::

    spec = load_bundle_file("degrade-checkout.yaml")
    request = spec.to_request(actor="runbook")   # an ApplyBundleRequest
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from controlplane import model
from controlplane._durations import parse_duration, parse_time
from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import InvalidArgumentError

_TOP_KEYS = {"name", "reason", "incident", "ttl", "until", "changes"}
_TIERS = {tier.name: tier for tier in model.Tier}
_CHANGE_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required fields, optional fields)
    "flag": ({"name", "value"}, {"service", "scope", "change_type"}),
    "clear_flag": ({"name"}, {"service", "scope", "all_layers"}),
    "shed": ({"service", "percent"}, {"tier"}),
    "clear_shed": ({"service"}, {"all_layers"}),
    "pin": ({"service", "version"}, set()),
    "unpin": ({"service"}, {"all_layers"}),
}


class BundleFileError(ValueError):
    """A bundle file that does not parse or breaks a rule; the message names where."""


@dataclass(frozen=True, slots=True)
class BundleSpec:
    """A parsed and validated bundle file."""

    name: str
    reason: str
    changes: tuple[mpb.BundleChange, ...]
    incident: str = ""
    ttl: timedelta | None = None
    until: datetime | None = None
    source: str = field(default="", compare=False)

    def to_request(self, *, actor: str = "", dry_run: bool = False) -> mpb.ApplyBundleRequest:
        """The ``ApplyBundle`` request for this bundle."""
        options = pb.WriteOptions(
            reason=self.reason, incident=self.incident, actor=actor, dry_run=dry_run
        )
        if self.ttl is not None:
            options.ttl.FromTimedelta(self.ttl)
        if self.until is not None:
            options.expires_at.FromDatetime(self.until)
        return mpb.ApplyBundleRequest(name=self.name, changes=self.changes, options=options)


def load_bundle_file(path: str | Path) -> BundleSpec:
    """Read and validate a bundle file (``.yaml``, ``.yml`` or ``.json``)."""
    source = Path(path)
    try:
        text = source.read_text()
    except OSError as exc:
        raise BundleFileError(f"{source}: cannot read it: {exc.strerror}") from None
    fmt = "json" if source.suffix.lower() == ".json" else "yaml"
    return parse_bundle(text, fmt, source=str(source))


def parse_bundle(text: str, fmt: str = "yaml", *, source: str = "bundle") -> BundleSpec:
    """Parse and validate a bundle from YAML or JSON text."""
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BundleFileError(f"{source}: not valid {fmt.upper()}: {exc}") from None
    if not isinstance(data, Mapping):
        raise BundleFileError(f"{source}: must be a mapping with name, reason and changes")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise BundleFileError(
            f"{source}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
            f"expected {', '.join(sorted(_TOP_KEYS))}"
        )
    name = _text(data, "name", source)
    _valid(model.validate_bundle_name, name, f"{source}: name")
    reason = _text(data, "reason", source).strip()
    if not reason:
        raise BundleFileError(f"{source}: reason is required: say why (it goes to the audit)")
    incident = str(data.get("incident") or "")
    ttl = until = None
    if data.get("ttl") is not None and data.get("until") is not None:
        raise BundleFileError(f"{source}: give ttl or until, not both")
    if data.get("ttl") is not None:
        try:
            ttl = parse_duration(str(data["ttl"]))
        except ValueError as exc:
            raise BundleFileError(f"{source}: ttl: {exc}") from None
    if data.get("until") is not None:
        try:
            until = parse_time(str(data["until"]))
        except ValueError as exc:
            raise BundleFileError(f"{source}: until: {exc}") from None
    changes = data.get("changes")
    if not isinstance(changes, list) or not changes:
        raise BundleFileError(f"{source}: changes must be a non-empty list")
    if len(changes) > model.MAX_BUNDLE_CHANGES:
        raise BundleFileError(
            f"{source}: {len(changes)} changes, over the maximum of {model.MAX_BUNDLE_CHANGES} "
            "per bundle: split it into several bundles"
        )
    parsed = tuple(_change(i, c, source) for i, c in enumerate(changes))
    return BundleSpec(name, reason, parsed, incident, ttl, until, source)


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise BundleFileError(f"{where}: {key} is required (text)")
    return value


def _valid(check: Any, value: Any, where: str) -> Any:
    try:
        return check(value)
    except InvalidArgumentError as exc:
        raise BundleFileError(f"{where}: {exc.rule}") from None


def _change(index: int, item: Any, source: str) -> mpb.BundleChange:
    where = f"{source}: changes[{index}]"
    if not isinstance(item, Mapping) or len(item) != 1:
        raise BundleFileError(
            f"{where}: must be one of {', '.join(_CHANGE_FIELDS)} with its fields, "
            "e.g. {flag: {service: checkout, name: new-ui, value: false}}"
        )
    ((kind, body),) = item.items()
    if kind not in _CHANGE_FIELDS:
        raise BundleFileError(
            f"{where}: unknown change {kind!r}; one of {', '.join(_CHANGE_FIELDS)}"
        )
    where = f"{where}.{kind}"
    if not isinstance(body, Mapping):
        raise BundleFileError(f"{where}: must be a mapping of fields")
    required, optional = _CHANGE_FIELDS[kind]
    missing = required - set(body)
    if missing:
        raise BundleFileError(f"{where}: missing {', '.join(sorted(missing))}")
    unknown = set(body) - required - optional
    if unknown:
        raise BundleFileError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    all_layers = body.get("all_layers", False)
    if not isinstance(all_layers, bool):
        raise BundleFileError(f"{where}.all_layers: must be true or false")

    def svc() -> str:
        return str(
            _valid(model.validate_service, _string(body, "service", where), f"{where}.service")
        )

    if kind in ("flag", "clear_flag"):
        scope = _scope(body, where)
        name = _valid(model.validate_flag_name, _string(body, "name", where), f"{where}.name")
        if kind == "clear_flag":
            return mpb.BundleChange(
                clear_flag=mpb.ClearFlagRequest(scope=scope, name=name, all_layers=all_layers)
            )
        value = _flag_value(body["value"], f"{where}.value")
        change_type = body.get("change_type", False)
        if not isinstance(change_type, bool):
            raise BundleFileError(f"{where}.change_type: must be true or false")
        return mpb.BundleChange(
            set_flag=mpb.SetFlagRequest(
                scope=scope, name=name, value=value, change_type=change_type
            )
        )
    if kind == "shed":
        percent = body["percent"]
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise BundleFileError(f"{where}.percent: must be a number from 0 to 100")
        _valid(model.validate_percent, float(percent), f"{where}.percent")
        tier_name = str(body.get("tier", "SHEDDABLE"))
        if tier_name not in _TIERS:
            raise BundleFileError(
                f"{where}.tier: unknown tier {tier_name!r}; one of {', '.join(_TIERS)}"
            )
        return mpb.BundleChange(
            set_shedding=mpb.SetSheddingRequest(
                service=svc(),
                percent=float(percent),
                tier=_TIERS[tier_name].value,  # type: ignore[arg-type]
            )
        )
    if kind == "clear_shed":
        return mpb.BundleChange(
            clear_shedding=mpb.ClearSheddingRequest(service=svc(), all_layers=all_layers)
        )
    if kind == "pin":
        version = _valid(
            model.validate_version, _string(body, "version", where), f"{where}.version"
        )
        return mpb.BundleChange(pin_version=mpb.PinVersionRequest(service=svc(), version=version))
    return mpb.BundleChange(
        unpin_version=mpb.UnpinVersionRequest(service=svc(), all_layers=all_layers)
    )


def _scope(body: Mapping[str, Any], where: str) -> str:
    if ("service" in body) == ("scope" in body):
        raise BundleFileError(f"{where}: give service or scope (global or a service), one of them")
    if "service" in body:
        service = _string(body, "service", where)
        return str(_valid(model.validate_service, service, f"{where}.service"))
    return str(_valid(model.validate_scope, _string(body, "scope", where), f"{where}.scope"))


def _string(body: Mapping[str, Any], key: str, where: str) -> str:
    """A field that must be text: YAML reads an unquoted 1.10 as the number 1.1."""
    value = body[key]
    if not isinstance(value, str):
        raise BundleFileError(
            f"{where}.{key}: must be text, got {type(value).__name__} {value!r}; "
            f'quote it ({key}: "{value}")'
        )
    return value


def _flag_value(value: Any, where: str) -> pb.FlagValue:
    if isinstance(value, bool):
        return pb.FlagValue(bool_value=value)
    if isinstance(value, int | float):
        _valid(model.validate_flag_value, value, where)
        if isinstance(value, int) and abs(value) > 2**53:
            raise BundleFileError(f"{where}: {value} is too large to be kept exactly")
        return pb.FlagValue(number_value=float(value))
    if isinstance(value, str):
        return pb.FlagValue(string_value=value)
    if isinstance(value, Mapping):
        _valid(model.validate_json_object, dict(value), where)
        return pb.FlagValue(json_value=json.dumps(value, sort_keys=True, default=str))
    raise BundleFileError(f"{where}: must be true/false, a number, text or a mapping (JSON object)")
