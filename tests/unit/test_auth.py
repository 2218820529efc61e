"""The auth file's rules, token lookup and the per-method permission table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.server.auth import (
    METHOD_RULES,
    Access,
    AuthError,
    AuthFileError,
    Identity,
    Role,
    Streams,
    authenticate,
    authorize,
    hash_token,
    load_auth_file,
    parse_auth,
)

H1 = hash_token("token-one")
H2 = hash_token("token-two")


def doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"identities": list(entries)}


def test_a_valid_file_maps_tokens_and_subjects_to_identities() -> None:
    config = parse_auth(
        doc(
            {"name": "oncall", "role": "operator", "token_sha256": H1},
            {
                "name": "fleet",
                "role": "agent",
                "services": ["checkout", "search"],
                "token_sha256": [H2.upper()],
                "max_streams": 10,
            },
            {"name": "deploy", "role": "admin", "cert_subject": "CN=deploy,O=Example"},
        )
    )
    assert config.by_token("token-one") == Identity("oncall", Role.OPERATOR)
    fleet = config.by_token("token-two")
    assert fleet is not None
    assert fleet.services == frozenset({"checkout", "search"})
    assert fleet.max_streams == 10
    assert config.by_token("token-three") is None
    deploy = config.by_subject("CN=deploy,O=Example")
    assert deploy is not None
    assert deploy.role is Role.ADMIN
    # Only hashes are kept: the repr shows no digest, and no token ever.
    assert H1 not in repr(config)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"role": "viewer", "token_sha256": H1}, "name is required"),
        ({"name": "a b", "role": "viewer", "token_sha256": H1}, "name is required"),
        ({"name": "x", "role": "root", "token_sha256": H1}, "role must be one of"),
        ({"name": "x", "role": "viewer"}, "needs token_sha256 or cert_subject"),
        ({"name": "x", "role": "viewer", "token_sha256": "token-one"}, "64 hex digits"),
        ({"name": "x", "role": "viewer", "token_sha256": 42}, "must be a string or a list"),
        ({"name": "x", "role": "agent", "token_sha256": H1}, "needs 'services'"),
        (
            {"name": "x", "role": "agent", "services": ["Bad_Name"], "token_sha256": H1},
            "'Bad_Name' is not a service name",
        ),
        (
            {"name": "x", "role": "viewer", "services": ["checkout"], "token_sha256": H1},
            "only agent identities have 'services'",
        ),
        (
            {"name": "x", "role": "viewer", "token_sha256": H1, "max_streams": 0},
            "max_streams must be a positive integer",
        ),
        ({"name": "x", "role": "viewer", "token": "plain"}, "unknown field(s) token"),
        ({"name": "x", "role": "viewer", "cert_subject": "  "}, "must be a non-empty string"),
    ],
)
def test_invalid_entries_are_refused_naming_entry_and_field(
    entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(AuthFileError) as refused:
        parse_auth(doc({"name": "ok", "role": "viewer", "token_sha256": H2}, entry), "auth.yaml")
    assert message in str(refused.value)
    assert "auth.yaml: identity #2" in str(refused.value)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [
                {"name": "a", "role": "viewer", "token_sha256": H1},
                {"name": "a", "role": "viewer", "token_sha256": H2},
            ],
            "name 'a' is used twice",
        ),
        (
            [
                {"name": "a", "role": "viewer", "token_sha256": H1},
                {"name": "b", "role": "admin", "token_sha256": H1},
            ],
            "a token hash is also listed for 'a'",
        ),
        (
            [
                {"name": "a", "role": "viewer", "cert_subject": "CN=x"},
                {"name": "b", "role": "admin", "cert_subject": "CN=x"},
            ],
            "also listed for 'a'",
        ),
    ],
)
def test_a_credential_names_one_identity(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(AuthFileError, match=message):
        parse_auth(doc(*entries))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "expected a mapping"),
        ({"identities": []}, "non-empty list"),
        ({"identities": [], "extra": 1}, "expected a mapping with one key"),
        ({"identities": ["x"]}, "must be a mapping"),
    ],
)
def test_the_document_shape_is_checked(data: Any, message: str) -> None:
    with pytest.raises(AuthFileError, match=message):
        parse_auth(data)


def test_files_load_as_yaml_or_json_and_bad_ones_are_named(tmp_path: Path) -> None:
    yaml_file = tmp_path / "auth.yaml"
    yaml_file.write_text(f"identities:\n  - name: a\n    role: viewer\n    token_sha256: {H1}\n")
    assert load_auth_file(yaml_file).by_token("token-one") is not None
    json_file = tmp_path / "auth.json"
    json_file.write_text(
        f'{{"identities": [{{"name": "a", "role": "viewer", "token_sha256": "{H1}"}}]}}'
    )
    assert load_auth_file(json_file).by_token("token-one") is not None
    broken = tmp_path / "broken.yaml"
    broken.write_text("identities: [unclosed")
    with pytest.raises(AuthFileError, match=r"broken\.yaml does not parse"):
        load_auth_file(broken)
    with pytest.raises(AuthFileError, match="cannot read auth file"):
        load_auth_file(tmp_path / "missing.yaml")


def test_authenticate_prefers_the_token_and_never_echoes_it() -> None:
    config = parse_auth(
        doc(
            {"name": "oncall", "role": "operator", "token_sha256": H1},
            {"name": "deploy", "role": "admin", "cert_subject": "CN=deploy"},
        )
    )
    cert = {"x509_subject": [b"CN=deploy"]}
    who, credential = authenticate(config, [("authorization", "Bearer token-one")], cert)
    assert who.name == "oncall"
    assert credential[0] == "token"
    who, credential = authenticate(config, [], cert)
    assert (who.name, credential) == ("deploy", ("subject", "CN=deploy"))
    cases = [
        ([("authorization", "Bearer token-nine")], {}, "unknown or revoked token"),
        ([("authorization", "Basic token-one")], {}, "expected 'Bearer <token>'"),
        (
            [("authorization", "Bearer token-one"), ("authorization", "Bearer token-one")],
            {},
            "more than one authorization header",
        ),
        ([], {}, "no credentials"),
        ([], {"x509_subject": [b"CN=stranger"]}, "'CN=stranger' is not an identity"),
    ]
    for metadata, context, message in cases:
        with pytest.raises(AuthError) as refused:
            authenticate(config, metadata, context)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert message in refused.value.message
        assert "token-one" not in refused.value.message
        assert "token-nine" not in refused.value.message


def test_every_rpc_has_a_rule_and_roles_nest() -> None:
    from controlplane.api.v1 import agent_pb2, mitigation_pb2

    for file, service in ((mitigation_pb2, "MitigationService"), (agent_pb2, "AgentService")):
        descriptor = file.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            assert f"/{descriptor.full_name}/{method.name}" in METHOD_RULES, method.name
    viewer = Identity("v", Role.VIEWER)
    operator = Identity("o", Role.OPERATOR)
    admin = Identity("a", Role.ADMIN)
    agent = Identity("g", Role.AGENT, frozenset({"*"}))
    for access in (Access.READ, Access.WRITE, Access.ADMIN):
        # admin >= operator >= viewer; the agent role reads nothing.
        assert admin.may(access)
        assert operator.may(access) == (access is not Access.ADMIN)
        assert viewer.may(access) == (access is Access.READ)
        assert not agent.may(access)
    assert agent.may(Access.SYNC)
    assert agent.may_sync("anything")
    assert not admin.may(Access.SYNC)
    with pytest.raises(AuthError) as refused:
        authorize(viewer, "/controlplane.api.v1.MitigationService/NotARealMethod")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_streams_count_per_identity_and_revocation_follows_the_credential() -> None:
    config = parse_auth(
        doc(
            {"name": "fleet", "role": "agent", "services": ["a"], "token_sha256": [H1, H2]},
        )
    )
    streams = Streams(default_limit=None)
    fleet = config.by_token("token-one")
    assert fleet is not None

    async def hold(credential_token: str, started: asyncio.Event) -> None:
        identity, credential = authenticate(
            config, [("authorization", f"Bearer {credential_token}")], {}
        )
        with streams.hold(identity, credential):
            started.set()
            await asyncio.Event().wait()

    events = [asyncio.Event(), asyncio.Event()]
    old = asyncio.create_task(hold("token-one", events[0]))
    new = asyncio.create_task(hold("token-two", events[1]))
    for event in events:
        await event.wait()
    assert streams.count("fleet") == 2
    # Rotation: token-one's hash is dropped; only the stream that used it ends.
    rotated = parse_auth(
        doc({"name": "fleet", "role": "agent", "services": ["a"], "token_sha256": [H2]})
    )
    assert streams.revoke_changed(rotated) == 1
    with pytest.raises(asyncio.CancelledError):
        await old
    assert not new.done()
    assert streams.count("fleet") == 1
    # More rights (a service added, a limit raised): it goes on.
    widened = parse_auth(
        doc(
            {
                "name": "fleet",
                "role": "agent",
                "services": ["a", "b"],
                "token_sha256": [H2],
                "max_streams": 9,
            }
        )
    )
    assert streams.revoke_changed(widened) == 0
    assert not new.done()
    # Fewer (its service removed): it ends.
    narrowed = parse_auth(
        doc({"name": "fleet", "role": "agent", "services": ["b"], "token_sha256": [H2]})
    )
    assert streams.revoke_changed(narrowed) == 1
    with pytest.raises(asyncio.CancelledError):
        await new
    assert streams.count("fleet") == 0


def test_refusals_are_logged_at_most_so_many_a_second() -> None:
    from structlog.testing import capture_logs

    from controlplane.server.auth import _RateLimit

    now = [100.0]
    limit = _RateLimit(3, clock=lambda: now[0])
    with capture_logs() as logs:
        first_second = [limit.allow() for _ in range(5)]
        now[0] = 101.2
        next_second = [limit.allow() for _ in range(2)]
    assert first_second == [True, True, True, False, False]
    assert next_second == [True, True]
    assert logs == [
        {"event": "rpc_refused_not_logged", "count": 2, "seconds": 1, "log_level": "info"}
    ]
