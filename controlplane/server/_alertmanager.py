"""``POST /v1/alertmanager``: Alertmanager's webhook, taken as it is, fires triggers.

Point an Alertmanager receiver at the HTTP listener::

    receivers:
      - name: controlplane
        webhook_configs:
          - url: https://controlplane.example:8016/v1/alertmanager
            send_resolved: true
            http_config:
              authorization: {type: Bearer, credentials_file: /etc/alertmanager/cp-token}

Each notification (webhook payload version 4) is one alert group: every trigger whose
matchers all hold for the labels of every alert of the group fires for it (``firing``)
or resolves it (``resolved``), de-duplicated by the group key, so Alertmanager's repeats
apply nothing new. Each alert's labels, not the group's common ones: a label the alerts
disagree on is missing from ``commonLabels``, where ``env!~"staging|dev"`` would hold
for a group of staging and dev alerts, and ``severity=~"critical|page"`` would not hold
for a group of critical and page ones (for ``=`` the two readings agree).

The incident is the group's ``incident`` label, else one made from the group key; the
summary is the group's ``summary`` annotation (else ``description``, else the alert
name), the URL the first alert's generator URL (else Alertmanager's).

The answer is 200 with what each trigger did, also when nothing matched (Alertmanager
retries a notification that fails: only a server that cannot reach etcd answers 503,
so that it does). With authentication on, the caller needs the ``trigger`` role (or
operator, admin).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane import model
from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.errors import ControlPlaneError, InvalidArgumentError, UnavailableError
from controlplane.server._http_context import authenticate_request, error_response, read_json
from controlplane.server._routes import BadRequest
from controlplane.server._trigger_service import TriggerRPCs, matches
from controlplane.server.auth import (
    ALERTMANAGER,
    AuthError,
    AuthInterceptor,
    Identity,
)

log = structlog.get_logger("controlplane.http")

PATH = "/v1/alertmanager"
_STATUS = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}


class AlertReceiver:
    """The Alertmanager webhook route of one HTTP listener."""

    def __init__(self, servicer: TriggerRPCs, auth: AuthInterceptor | None, max_body: int) -> None:
        self.servicer = servicer
        self.auth = auth
        self.max_body = max_body

    def routes(self) -> list[BaseRoute]:
        return [Route(PATH, self.receive, methods=["POST"])]

    async def receive(self, request: Request) -> Response:
        start = time.perf_counter()
        identity: Identity | None = None
        try:
            identity, _ = authenticate_request(self.auth, request, ALERTMANAGER)
            payload = _payload(await read_json(request, self.max_body))
            done = await self._handle(payload, identity.name if identity is not None else "")
            response: Response = JSONResponse({"triggers": done})
        except AuthError as error:
            status = 401 if error.code.name == "UNAUTHENTICATED" else 403
            response = error_response(error.code.name, error.message, status)
        except BadRequest as error:
            response = error_response("INVALID_ARGUMENT", error.message, error.status)
        except UnavailableError as error:
            response = error_response("UNAVAILABLE", error.message, 503)
        log.info(
            "http",
            method="POST",
            route=PATH,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
            actor=identity.name if identity is not None else None,
        )
        return response

    async def _handle(self, payload: dict[str, Any], caller: str) -> list[dict[str, Any]]:
        servicer = self.servicer
        labels: dict[str, str] = payload["commonLabels"]
        group_key: str = payload["groupKey"]
        incident = labels.get("incident", "")
        try:
            model.validate_incident(incident)
        except InvalidArgumentError:
            incident = ""
        annotations: dict[str, str] = payload["commonAnnotations"]
        summary = (
            annotations.get("summary")
            or annotations.get("description")
            or labels.get("alertname", "")
        )[:500]
        alerts = payload["alerts"]
        label_sets = [alert["labels"] for alert in alerts] or [labels]
        url = ""
        if alerts and isinstance(alerts[0], dict):
            url = str(alerts[0].get("generatorURL") or "")
        url = (url or str(payload.get("externalURL") or ""))[:1000]
        done = []
        with servicer.store.budget(servicer.store.etcd_timeout):
            triggers = await servicer.store.triggers.list()
            for record, _ in sorted(triggers, key=lambda item: str(item[0].get("name"))):
                if not matches(record, *label_sets):
                    continue
                try:
                    if payload["status"] == "firing":
                        firing = await servicer.fire(
                            record,
                            group_key=group_key,
                            incident=incident,
                            summary=summary,
                            url=url,
                            caller=caller,
                        )
                    else:
                        firing = await servicer.resolve(record, group_key=group_key)
                except UnavailableError:
                    raise
                except ControlPlaneError as exc:
                    # The trigger's own problem (its bundle no longer applies): said, and
                    # not retried by Alertmanager, which could not fix it.
                    log.error("trigger_failed", trigger=record.get("name"), error=exc.message)
                    servicer.metrics.trigger_fires.labels(str(record.get("name")), "failed").inc()
                    await servicer.say_failed(record, group_key, exc.message, incident)
                    done.append(
                        {"trigger": record.get("name"), "outcome": "FAILED", "message": exc.message}
                    )
                    continue
                done.append(
                    {
                        "trigger": firing.name,
                        "outcome": _outcome(firing.outcome),
                        "bundle_id": firing.bundle_id,
                        "message": firing.message,
                    }
                )
        return done


def _outcome(value: int) -> str:
    return mpb.TriggerOutcome.Name(value).removeprefix("TRIGGER_")


def _strings(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{field} must be an object of strings (Alertmanager's labels)")
    return value


def _payload(body: Any) -> dict[str, Any]:
    """Alertmanager's webhook payload, checked (what is used of it)."""
    if not isinstance(body, dict):
        raise BadRequest(
            "the body must be Alertmanager's webhook payload (a JSON object, version 4)"
        )
    if body.get("version") != "4":
        raise BadRequest(
            f"version {body.get('version')!r}: this receiver takes Alertmanager's webhook "
            "payload version 4 (Alertmanager 0.x sends it)"
        )
    if body.get("status") not in ("firing", "resolved"):
        raise BadRequest("status must be 'firing' or 'resolved'")
    if not isinstance(body.get("groupKey"), str) or not 0 < len(body["groupKey"]) <= 1024:
        raise BadRequest("groupKey must be a string of 1 to 1024 characters")
    alerts = body.get("alerts", [])
    if not isinstance(alerts, list) or not all(isinstance(a, dict) for a in alerts):
        raise BadRequest("alerts must be a list of alerts (objects)")
    if not isinstance(body.get("externalURL", ""), str):
        raise BadRequest("externalURL must be a string")
    return {
        **body,
        "commonLabels": _strings(body.get("commonLabels", {}), "commonLabels"),
        "commonAnnotations": _strings(body.get("commonAnnotations", {}), "commonAnnotations"),
        "alerts": [
            {**alert, "labels": _strings(alert.get("labels", {}), f"alerts[{i}].labels")}
            for i, alert in enumerate(alerts)
        ],
    }


def openapi_part() -> tuple[dict[str, Any], dict[str, Any]]:
    """The route's part of ``/openapi.json``: what is read of Alertmanager's payload."""
    ref = "#/components/schemas/"
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    payload = {
        "type": "object",
        "required": ["version", "status", "groupKey"],
        "properties": {
            "version": {"const": "4"},
            "status": {"enum": ["firing", "resolved"]},
            "groupKey": {"type": "string", "minLength": 1},
            "commonLabels": strings,
            "commonAnnotations": strings,
            "externalURL": {"type": "string"},
            "alerts": {
                "type": "array",
                "items": {"type": "object", "properties": {"labels": strings}},
            },
        },
    }
    done = {
        "type": "object",
        "required": ["triggers"],
        "properties": {
            "triggers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["trigger", "outcome", "message"],
                    "properties": {
                        "trigger": {"type": "string"},
                        "outcome": {"type": "string"},
                        "bundle_id": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            }
        },
    }
    paths = {
        PATH: {
            "post": {
                "operationId": "AlertmanagerWebhook",
                "tags": ["Triggers"],
                "summary": "Alertmanager's webhook (payload version 4): fire or resolve triggers",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": ref + "AlertGroup"}}},
                },
                "responses": {
                    "200": {
                        "description": "What each matching trigger did (empty: none matched)",
                        "content": {
                            "application/json": {"schema": {"$ref": ref + "AlertsHandled"}}
                        },
                    },
                    **{
                        status: {
                            "description": text,
                            "content": {"application/json": {"schema": {"$ref": ref + "Error"}}},
                        }
                        for status, text in (
                            ("400", "Not Alertmanager's payload version 4 (the message says why)"),
                            ("401", "No credentials, or unknown ones"),
                            ("403", "The identity may not fire triggers"),
                            ("413", "The body is larger than the server's limit"),
                            ("415", "The body is not JSON by its Content-Type"),
                            ("503", "etcd is unreachable: Alertmanager retries"),
                        )
                    },
                },
            }
        }
    }
    return paths, {"AlertGroup": payload, "AlertsHandled": done}
