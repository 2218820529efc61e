"""The agent's configuration: arguments, environment, connection security, instance ids."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from agents import Agent, AgentConfigError, AgentState, AsyncAgent
from agents._config import default_instance_id, forked_config, resolve_config
from tests.helpers.certs import TestCA

# ---------------------------------------------------------------- configuration

ENV = {
    "CONTROLPLANE_SERVICE": "from-env",
    "CONTROLPLANE_SERVERS": "10.0.0.5:50051, 10.0.0.6:50051",
    "CONTROLPLANE_VERSION": "v-env",
    "CONTROLPLANE_INSTANCE_ID": "env-instance",
    "CONTROLPLANE_CACHE_PATH": "/var/cache/env.json",
    "CONTROLPLANE_INSECURE": "true",
}


def test_configuration_comes_from_arguments_before_the_environment() -> None:
    config = resolve_config(
        service="checkout",
        servers=["127.0.0.1:1"],
        version="v-arg",
        instance_id="arg-instance",
        cache_path="/tmp/arg.json",
        environ=ENV,
    )
    assert config.service == "checkout"
    assert config.servers == ("127.0.0.1:1",)
    assert config.version == "v-arg"
    assert config.instance_id == "arg-instance"
    assert config.cache_path == Path("/tmp/arg.json")
    assert config.instance_id_generated is False


def test_configuration_falls_back_to_the_environment_then_defaults() -> None:
    config = resolve_config(environ=ENV)
    assert config.service == "from-env"
    assert config.servers == ("10.0.0.5:50051", "10.0.0.6:50051")
    assert config.version == "v-env"
    assert config.instance_id == "env-instance"
    assert config.cache_path == Path("/var/cache/env.json")
    assert config.security.insecure is True  # plaintext to 10.0.0.5 asked for

    minimal = {"CONTROLPLANE_SERVICE": "checkout", "CONTROLPLANE_SERVERS": "localhost:1"}
    config = resolve_config(environ={**minimal, "CONTROLPLANE_VERSION": "  "})
    assert config.version == ""  # an empty variable is unset: the default
    assert config.cache_path is None
    assert config.instance_id_generated is True
    assert f"-{os.getpid()}-" in config.instance_id


def test_the_agent_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    agent = Agent(version="v-arg")
    assert (agent.service, agent.instance_id) == ("from-env", "env-instance")
    assert agent._client.config.version == "v-arg"
    assert agent.state is AgentState.CONNECTING
    assert agent.value("anything", 3) == 3
    # Reads never raise, whatever they are given.
    assert agent.should_shed(["x"]) is False  # type: ignore[arg-type]
    assert agent.should_shed({"a": 1}, key=object()) is False  # type: ignore[arg-type]
    assert agent.enabled(["x"], default=True) is True  # type: ignore[arg-type]
    assert agent.value({"x": 1}, "d") == "d"  # type: ignore[call-overload]
    agent.close()  # never started: harmless


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servers": ["h:1"]}, "no service: pass service=... or set CONTROLPLANE_SERVICE"),
        ({"service": "checkout"}, "no servers: pass servers=[...] or set CONTROLPLANE_SERVERS"),
        ({"service": "checkout", "servers": [" ", ""]}, "servers is empty"),
        ({"service": "Check_out", "servers": ["h:1"]}, "is not a DNS label"),
        ({"service": "checkout", "servers": ["h"]}, "'h' is not host:port"),
        ({"service": "checkout", "servers": ["h:99999"]}, "is not host:port"),
        ({"service": "c", "servers": ["h:1"], "instance_id": "-x"}, "instance_id '-x' is invalid"),
    ],
)
def test_a_missing_or_invalid_setting_is_a_clear_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(AgentConfigError, match=re.escape(message)):
        resolve_config(environ={}, **kwargs)


def test_server_targets_may_be_grpc_uris() -> None:
    config = resolve_config(
        service="c", servers="dns:///cp.internal:50051,unix:/run/cp.sock", insecure=True
    )
    assert config.servers == ("dns:///cp.internal:50051", "unix:/run/cp.sock")


# ---------------------------------------------------------------- connection security

SECRET = "agent-secret-token-0123456789"


@pytest.fixture
def pki(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def test_connection_settings_come_from_arguments_before_the_environment(
    pki: TestCA, tmp_path: Path
) -> None:
    client = pki.issue("client")
    other = pki.issue("other")
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    env = {
        "CONTROLPLANE_SERVICE": "checkout",
        "CONTROLPLANE_SERVERS": "cp.internal:443",
        "CONTROLPLANE_TOKEN_FILE": str(token_file),
        "CONTROLPLANE_TLS": "1",
        "CONTROLPLANE_TLS_CA": str(pki.cert),
        "CONTROLPLANE_TLS_CLIENT_CERT": str(client.cert),
        "CONTROLPLANE_TLS_CLIENT_KEY": str(client.key),
        "CONTROLPLANE_TLS_SERVER_NAME": "cp.example",
    }
    from_env = resolve_config(environ=env).security
    assert from_env.token is None and from_env.token_file == token_file
    assert (from_env.tls, from_env.ca, from_env.cert, from_env.key) == (
        True,
        pki.cert,
        client.cert,
        client.key,
    )
    assert from_env.server_name == "cp.example"
    assert from_env.insecure is False
    assert from_env.metadata() == (("authorization", f"Bearer {SECRET}"),)

    from_arguments = resolve_config(
        environ=env,
        token="Bearer other-token-42",  # an argument for the token leaves the file aside
        tls=False,
        tls_cert=other.cert,
        tls_key=other.key,
        tls_server_name="cp.other",
    ).security
    assert from_arguments.token == "other-token-42" and from_arguments.token_file is None
    assert (from_arguments.cert, from_arguments.key) == (other.cert, other.key)
    assert from_arguments.tls is False and from_arguments.uses_tls  # the CA still asks for it
    assert from_arguments.server_name == "cp.other"
    assert from_arguments.metadata() == (("authorization", "Bearer other-token-42"),)


def test_without_connection_settings_plaintext_to_loopback_and_no_token() -> None:
    config = resolve_config(service="checkout", servers="127.0.0.1:1,[::1]:2", environ={})
    assert config.security.uses_tls is False
    assert config.security.metadata() == ()


@pytest.mark.parametrize(
    ("servers", "bad"),
    [
        ("10.0.0.5:50051", "10.0.0.5:50051"),
        ("127.0.0.1:1,cp.internal:50051", "cp.internal:50051"),
        # One target of several addresses (a list: a string is split at commas).
        (["ipv4:127.0.0.1:1,10.0.0.1:1"], "ipv4:127.0.0.1:1,10.0.0.1:1"),
    ],
)
def test_plaintext_to_a_server_off_loopback_needs_insecure(
    servers: str | list[str], bad: str
) -> None:
    with pytest.raises(AgentConfigError) as refused:
        resolve_config(service="checkout", servers=servers, environ={})
    message = str(refused.value)
    assert message.startswith(f"server {bad} is not on loopback")
    for named in ("tls_ca/CONTROLPLANE_TLS_CA", "tls/CONTROLPLANE_TLS", "insecure/"):
        assert named in message
    assert "CONTROLPLANE_INSECURE" in message
    # Told: argument or variable.
    insecure = resolve_config(service="checkout", servers=servers, insecure=True, environ={})
    assert insecure.security.insecure
    env = {"CONTROLPLANE_INSECURE": "yes"}
    assert resolve_config(service="checkout", servers=servers, environ=env).security.insecure
    # TLS needs no permission.
    assert resolve_config(service="checkout", servers=servers, tls=True, environ={}).security


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        (
            {"token": SECRET},
            {"CONTROLPLANE_TOKEN_FILE": "/x"},
            None,  # the argument wins: no conflict
        ),
        (
            {},
            {"CONTROLPLANE_TOKEN": SECRET, "CONTROLPLANE_TOKEN_FILE": "/x"},
            "give token/CONTROLPLANE_TOKEN or token_file/CONTROLPLANE_TOKEN_FILE, not both",
        ),
        ({"token": "two words"}, {}, "token/CONTROLPLANE_TOKEN must be visible ASCII"),
        ({}, {"CONTROLPLANE_TOKEN": "a\x01b"}, "token/CONTROLPLANE_TOKEN must be visible"),
        (
            {"tls_ca": "/nonexistent/ca.pem"},
            {},
            "cannot read tls_ca/CONTROLPLANE_TLS_CA /nonexistent/ca.pem (CA certificates): "
            "No such file or directory",
        ),
        (
            {"token_file": "/nonexistent/token"},
            {},
            "cannot read token_file/CONTROLPLANE_TOKEN_FILE /nonexistent/token",
        ),
        ({}, {"CONTROLPLANE_TLS": "maybe"}, "CONTROLPLANE_TLS must be 1/true/yes/on"),
        ({}, {"CONTROLPLANE_INSECURE": "2"}, "CONTROLPLANE_INSECURE must be 1/true/yes/on"),
        (
            {"insecure": True, "tls": True},
            {},
            "insecure/CONTROLPLANE_INSECURE (plaintext) contradicts tls/CONTROLPLANE_TLS",
        ),
        (
            {"tls_server_name": "cp.internal"},
            {},
            "tls_server_name/CONTROLPLANE_TLS_SERVER_NAME applies to TLS only",
        ),
    ],
)
def test_connection_settings_are_checked_at_construction_naming_the_setting(
    settings: dict[str, Any], env: dict[str, str], message: str | None
) -> None:
    def resolve() -> Any:
        return resolve_config(service="checkout", servers="127.0.0.1:1", environ=env, **settings)

    if message is None:
        assert resolve().security.token == SECRET
        return
    with pytest.raises(AgentConfigError, match=re.escape(message)) as refused:
        resolve()
    assert SECRET not in str(refused.value)


def test_a_client_certificate_needs_its_key(pki: TestCA) -> None:
    client = pki.issue("client")
    with pytest.raises(AgentConfigError, match=re.escape("tls_cert/CONTROLPLANE_TLS_CLIENT_CERT")):
        resolve_config(service="c", servers="127.0.0.1:1", tls_cert=client.cert, environ={})
    env = {"CONTROLPLANE_TLS_CLIENT_KEY": str(client.key)}
    with pytest.raises(AgentConfigError, match="needs its certificate"):
        resolve_config(service="c", servers="127.0.0.1:1", environ=env)
    both = resolve_config(service="c", servers="cp.internal:443", tls_cert=client.cert, environ=env)
    assert both.security.uses_tls and both.security.key == client.key


def test_the_config_and_the_agent_never_show_the_token() -> None:
    config = resolve_config(service="c", servers="127.0.0.1:1", token=SECRET, environ={})
    assert SECRET not in repr(config)
    agent = AsyncAgent("c", ["127.0.0.1:1"], token=SECRET)
    assert SECRET not in repr(agent._client.config)
    assert agent._client.config.security.token == SECRET


def test_the_agents_take_the_connection_settings(pki: TestCA, tmp_path: Path) -> None:
    client = pki.issue("client")
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    settings: dict[str, Any] = {
        "token_file": token_file,
        "tls_ca": pki.cert,
        "tls_cert": client.cert,
        "tls_key": client.key,
        "tls_server_name": "cp.internal",
    }
    threaded = Agent("checkout", ["10.0.0.5:443"], **settings)
    asynchronous = AsyncAgent("checkout", ["10.0.0.5:443"], **settings)
    for agent in (threaded, asynchronous):
        security = agent._client.config.security
        assert (security.token_file, security.ca, security.cert, security.key) == (
            token_file,
            pki.cert,
            client.cert,
            client.key,
        )
        assert security.server_name == "cp.internal"
    threaded.close()
    with pytest.raises(AgentConfigError, match="is not on loopback"):
        Agent("checkout", ["10.0.0.5:50051"])
    with pytest.raises(AgentConfigError, match="is not on loopback"):
        AsyncAgent("checkout", ["10.0.0.5:50051"])
    assert Agent("checkout", ["10.0.0.5:50051"], insecure=True)._client.config.security.insecure


INSTANCE_RE = r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}"


def test_default_instance_ids_are_valid_and_distinct() -> None:
    ids = {default_instance_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(INSTANCE_RE, i) for i in ids)


def test_a_forked_child_appends_its_pid_to_a_given_instance_id() -> None:
    from_argument = resolve_config(
        service="checkout", servers="127.0.0.1:1", instance_id="web-1", environ={}
    )
    env = {"CONTROLPLANE_INSTANCE_ID": "web-1"}
    from_env = resolve_config(service="checkout", servers="127.0.0.1:1", environ=env)
    for parent in (from_argument, from_env):
        # The process that made the agent uses the id as given.
        assert (parent.instance_id, parent.instance_id_given) == ("web-1", "web-1")
        child = forked_config(parent, 4242)
        assert (child.instance_id, child.instance_id_given) == ("web-1-4242", "web-1")
        assert not child.instance_id_generated
        assert parent.instance_id == "web-1"  # the parent's own is left as it is
        # A grandchild: the given id and its own pid, not its parent's id extended.
        assert forked_config(child, 77).instance_id == "web-1-77"
        assert (child.service, child.servers, child.cache_path) == (
            parent.service,
            parent.servers,
            parent.cache_path,
        )


def test_a_forked_child_id_stays_valid_at_the_longest_given_id() -> None:
    longest = "a" * 127 + "Z"
    parent = resolve_config(service="c", servers="[::1]:1", instance_id=longest, environ={})
    child = forked_config(parent, 4194304)
    assert len(child.instance_id) == 128
    assert child.instance_id == "a" * 120 + "-4194304"
    assert re.fullmatch(INSTANCE_RE, child.instance_id)
    assert forked_config(child, 5).instance_id == longest[:126] + "-5"


def test_a_forked_child_makes_a_default_id_anew() -> None:
    parent = resolve_config(service="c", servers="localhost:1", environ={})
    child = forked_config(parent, 4242)
    assert child.instance_id_generated and child.instance_id_given == ""
    assert "-4242-" in child.instance_id and child.instance_id != parent.instance_id
    assert re.fullmatch(INSTANCE_RE, child.instance_id)
