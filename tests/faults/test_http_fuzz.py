"""Fuzz the HTTP listener from its own ``/openapi.json`` (schemathesis) on a real server.

A server process (``serve --http 127.0.0.1:0``) on the session etcd, under a prefix only
this module uses; schemathesis reads the document the server serves and makes, for every
operation but the watch, requests that fit the schema (positive) and requests that break
it (negative: wrong types, missing or extra fields, names against their pattern, out of
range limits, bodies that are not the documented object). What must hold for each
request (:func:`check_case`):

- an answer within :data:`CALL_TIMEOUT` (a client timeout means the server hung), and the
  server process is alive afterwards;
- no 5xx: 500 is a failure of the server's own, and nothing here makes etcd unreachable,
  so a 503 would mean the server lost it;
- the answer conforms to the document (schemathesis' checks): a documented status, the
  documented content type and headers, a body valid against that status' schema, and a
  request that breaks the schema refused with a 4xx (``negative_data_rejection``);
- a refusal (any 4xx) leaves etcd as it was: the etcd revision is read before and after
  the call and, when something else in the session moved it, the keys under the server's
  prefixes are compared between the two revisions (``Target.unchanged``).

The document states the rules that are simple and true (a write's options and their
``reason`` are required, the patterns of names in the path and in filters, the bounds of
``limit``, enums, int64 as digits); schemathesis' negative requests hold the server to
them. ``positive_data_acceptance`` (a request valid by the schema must be accepted) is
the one check left out: some rules span fields or need the store and have no plain JSON
Schema form (a reason that shows nothing or holds control characters, ``ttl`` with
``expiresAt``, a value of another kind than the flag's, an ``expectedModRevision`` that
does not match, a bundle or a known-good version that does not exist). Refusing those
with a 4xx is right; that the refusal writes nothing is checked.

``GET /v1/changes`` (WatchChanges) streams until the client leaves and takes no
deadline, so it is not in the generic run: a test of its own checks that the stream
starts with its first line at once and ends, as the server logs, when the client
disconnects; another that a watch the server cannot start is a plain 400.

Budget (:func:`budget`, as in ``test_fuzz``): 6 examples per operation in ``make test``
(about 135 requests, ~5 s), derandomized; 200 with ``CONTROLPLANE_FAULTS=full`` (``make
test-faults``: about 4,400 requests, ~55 s) with a random seed. The operations without
any parameter (ListPins, ListServices, ListShedding) have one request each.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openapi_schema_validator
import pytest
import requests
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server._routes import ROUTES
from tests.conftest import TEST_KEY_ROOT
from tests.faults.fuzz_budget import TIMEOUT, budget
from tests.faults.fuzz_oracle import EtcdProbe, Target
from tests.faults.fuzz_strategies import CALL_TIMEOUT
from tests.helpers.raw_etcd import delete_prefix_blocking
from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.timeout(TIMEOUT)


@dataclass
class HttpTarget:
    """The server process under test, its HTTP base URL and the etcd beside it."""

    target: Target
    base: str
    session: requests.Session
    hung: str = ""
    """What went unanswered: once the server hung, every example fails at once (shrinking
    calls that each wait out the timeout would outlast the test's own)."""


@pytest.fixture(scope="module")
def http_target(etcd: EmbeddedEtcd) -> Iterator[HttpTarget]:
    """One server process with an HTTP listener, on a prefix only this module uses."""
    prefix = f"{TEST_KEY_ROOT}{uuid.uuid4().hex}/"
    server = ServerProcess(etcd.endpoint, prefix, extra_args=["--http", "127.0.0.1:0"])
    channel = grpc.insecure_channel(server.address)
    probe = EtcdProbe(etcd.endpoint)
    session = requests.Session()
    try:
        line = server.wait_output(r"; HTTP (http://127\.0\.0\.1:\d+)\)")
        yield HttpTarget(Target(server, channel, probe, prefix), line.group(1), session)
    finally:
        session.close()
        channel.close()
        probe.close()
        server.stop()
        delete_prefix_blocking(etcd.endpoint, prefix)
        delete_prefix_blocking(etcd.endpoint, prefix.rstrip("/") + "-presence/")


@pytest.fixture(scope="module")
def api(http_target: HttpTarget) -> OpenApiSchema:
    """The server's own OpenAPI document, as schemathesis reads it."""
    schema = schemathesis.openapi.from_url(f"{http_target.base}/openapi.json")
    schema.config.update(base_url=http_target.base)
    return schema


# The operations of the generic run: every route but the endless streams (the watch and
# OFREP's event stream, tested in tests/integration/test_ofrep.py).
OPERATIONS = sorted(
    [route.rpc for route in ROUTES if not route.streaming]
    + ["OfrepEvaluateFlag", "OfrepEvaluateFlags", "AlertmanagerWebhook"]
)


def check_case(http: HttpTarget, case: Case[Any]) -> None:
    """Send ``case`` and check what must hold (module doc)."""
    target = http.target
    what = f"{case.method} {case.formatted_path}"
    target.alive()
    before = target.etcd.revision()
    response = None
    if not http.hung:
        try:
            response = case.call(session=http.session, timeout=CALL_TIMEOUT)
        except requests.Timeout:
            http.hung = f"{what}: no answer within {CALL_TIMEOUT}s\n{case.as_curl_command()}"
    if response is None:
        pytest.fail(http.hung)
    after = target.etcd.revision()
    target.alive()
    assert response.status_code < 500, (
        f"{what}: {response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
    )
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if 400 <= response.status_code < 500:
        target.unchanged(before, after, f"{what} answered {response.status_code}")


@pytest.mark.parametrize("operation", OPERATIONS)
@budget(quick=6, full=200)
@given(data=st.data(), mode=st.sampled_from(list(GenerationMode)))
def test_every_route(
    http_target: HttpTarget,
    api: OpenApiSchema,
    operation: str,
    mode: GenerationMode,
    data: st.DataObject,
) -> None:
    """Requests made from the schema of each operation: valid (positive) and not (negative)."""
    strategy = api.find_operation_by_id(operation).as_strategy(generation_mode=mode)
    check_case(http_target, data.draw(strategy, label="case"))


def test_every_route_is_fuzzed(http_target: HttpTarget) -> None:
    """Every operation of the served document is in the generic run but the watch, which
    has tests of its own below."""
    document = requests.get(f"{http_target.base}/openapi.json", timeout=CALL_TIMEOUT).json()
    operations = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert operations - set(OPERATIONS) == {"WatchChanges", "OfrepEventStream"}


# ---------------------------------------------------------------- the watch


def test_the_watch_streams_and_ends_when_the_client_leaves(http_target: HttpTarget) -> None:
    """GET /v1/changes: the first line (the revision it starts after) at once, valid by
    the document; after the client disconnects, the server ends the stream (its log line,
    status 499, within 15 s) and keeps answering."""
    target = http_target.target
    mark = len(target.server.output)
    with httpx.Client(base_url=http_target.base, timeout=CALL_TIMEOUT) as client:
        document = client.get("/openapi.json").json()
        ok = document["paths"]["/v1/changes"]["get"]["responses"]["200"]["content"]
        schema = {**ok["application/x-ndjson"]["schema"], "components": document["components"]}
        with client.stream("GET", "/v1/changes") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "application/x-ndjson"
            first = json.loads(next(stream.iter_lines()))
            openapi_schema_validator.validate(first, schema)
            assert int(first["revision"]) > 0
    # The client left: its log line says so once the server let go of the stream.
    target.server.wait_output(r'"rpc": "WatchChanges".*"status": 499', start=mark)
    target.alive()
    answer = requests.get(f"{http_target.base}/v1/flags", timeout=CALL_TIMEOUT)
    assert answer.status_code == 200


@pytest.mark.parametrize("query", ["service=Not%20A%20Service", "nope=1", "service=a&service=b"])
def test_a_bad_watch_is_refused(http_target: HttpTarget, query: str) -> None:
    """A watch the server cannot start is a JSON 400 at once, not a stream."""
    started = time.monotonic()
    answer = requests.get(f"{http_target.base}/v1/changes?{query}", timeout=CALL_TIMEOUT)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["status"] == 400
    assert time.monotonic() - started < CALL_TIMEOUT
