"""controlplane.transport: targets and the loopback rule, tokens, contradictions, files.

Pure: no server. The TLS handshakes themselves are in tests/integration/test_client_tls.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.transport import (
    AUTHORIZATION,
    MAX_TOKEN_CHARS,
    ClientSecurity,
    TransportConfigError,
    is_loopback_target,
    parse_bool,
    path_or_none,
    target_hosts,
    validate_token,
)
from tests.helpers.certs import TestCA

TOKEN = "s3cret-token-0123456789"


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "hosts"),
    [
        ("127.0.0.1:1", ["127.0.0.1"]),
        ("[::1]:1", ["::1"]),
        ("::1", ["::1"]),
        ("localhost:1", ["localhost"]),
        ("example.com:443", ["example.com"]),
        ("dns:///localhost:1", ["localhost"]),
        ("dns:localhost:1", ["localhost"]),
        ("dns://8.8.8.8/cp.internal:443", ["cp.internal"]),
        ("ipv4:127.0.0.1:1,10.0.0.1:1", ["127.0.0.1", "10.0.0.1"]),
        ("ipv6:[::1]:1,[fe80::1]:2", ["::1", "fe80::1"]),
        ("unix:/tmp/x", ["unix"]),
        ("unix:///run/cp.sock", ["unix"]),
    ],
)
def test_target_hosts(target: str, hosts: list[str]) -> None:
    assert target_hosts(target) == hosts


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.5.0.1:1", True),  # all of 127.0.0.0/8
        ("[::1]:1", True),
        ("localhost:1", True),
        ("LOCALHOST:1", True),
        ("dns:///localhost:1", True),
        ("dns:///127.0.0.1:1", True),
        ("ipv4:127.0.0.1:1,127.0.0.2:1", True),
        ("unix:/tmp/x", True),
        ("unix-abstract:cp", True),
        # One address off loopback is enough to need TLS or --insecure.
        ("ipv4:127.0.0.1:1,10.0.0.1:1", False),
        ("10.0.0.1:1", False),
        ("example.com:443", False),
        ("localhost.example.com:443", False),
        ("[::2]:1", False),
        ("0.0.0.0:1", False),
        ("128.0.0.1:1", False),
        ("ipv4:", False),
        # A DNS server of the target's choosing may say anything "localhost" is.
        ("dns://8.8.8.8/localhost:1", False),
        ("dns://8.8.8.8/127.0.0.1:1", True),
    ],
)
def test_the_loopback_rule(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback
    plaintext = ClientSecurity()
    if loopback:
        plaintext.check_target(target)
    else:
        with pytest.raises(TransportConfigError, match=r"is not on loopback") as refused:
            plaintext.check_target(target)
        message = str(refused.value)
        assert target in message
        assert "insecure" in message and "ca" in message  # the ways out, named
        # The ways out work.
        ClientSecurity(insecure=True).check_target(target)
        ClientSecurity(tls=True).check_target(target)


def test_a_plaintext_channel_off_loopback_is_refused_before_any_connection() -> None:
    with pytest.raises(TransportConfigError, match=r"server 10\.0\.0\.1:1 is not on loopback"):
        ClientSecurity().channel("10.0.0.1:1")
    with pytest.raises(TransportConfigError, match=r"server 10\.0\.0\.1:1 is not on loopback"):
        ClientSecurity().aio_channel("10.0.0.1:1")
    ClientSecurity(insecure=True).channel("10.0.0.1:1").close()


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        (TOKEN, TOKEN),
        (f"  {TOKEN}\n", TOKEN),
        (f"Bearer {TOKEN}", TOKEN),
        (f"bearer   {TOKEN} ", TOKEN),
        (f"BEARER\t{TOKEN}", TOKEN),
        ("x", "x"),
        ("a" * MAX_TOKEN_CHARS, "a" * MAX_TOKEN_CHARS),
    ],
)
def test_valid_tokens_are_sent_as_bearer(given: str, sent: str) -> None:
    assert validate_token(given) == sent
    security = ClientSecurity(token=given)
    assert security.metadata() == ((AUTHORIZATION, f"Bearer {sent}"),)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "token is empty"),
        ("   \n", "token is empty"),
        ("Bearer", "token is empty"),
        ("Bearer   ", "token is empty"),
        ("two words", "visible ASCII characters only"),
        ("line\nbreak", "visible ASCII characters only"),
        ("nul\x00byte", "visible ASCII characters only"),
        ("bell\x07", "visible ASCII characters only"),
        ("del\x7f", "visible ASCII characters only"),
        ("caf\u00e9", "visible ASCII characters only"),
        ("a" * (MAX_TOKEN_CHARS + 1), f"longer than {MAX_TOKEN_CHARS} characters"),
    ],
)
def test_invalid_tokens_are_refused_without_showing_them(given: str, message: str) -> None:
    with pytest.raises(TransportConfigError, match=re.escape(message)) as refused:
        ClientSecurity(token=given)
    if given.strip() and given.strip().lower() != "bearer":
        assert given.strip() not in str(refused.value)


def test_no_token_sends_no_metadata() -> None:
    assert ClientSecurity().metadata() == ()
    assert ClientSecurity().bearer() is None


def test_repr_never_shows_the_token(tmp_path: Path) -> None:
    security = ClientSecurity(token=TOKEN, tls=True)
    assert TOKEN not in repr(security)
    assert TOKEN not in str(security)
    assert "tls=True" in repr(security)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    from_file = ClientSecurity(token_file=token_file)
    assert TOKEN not in repr(from_file)
    assert str(token_file) in repr(from_file)


def test_the_token_file_is_read_again_for_each_metadata(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    security = ClientSecurity(token_file=token_file)
    assert security.metadata() == ((AUTHORIZATION, f"Bearer {TOKEN}"),)
    # Rotated in place (a Kubernetes secret, a renewal job): the next call sends the new one.
    token_file.write_text("Bearer rotated-token-42\n")
    assert security.metadata() == ((AUTHORIZATION, "Bearer rotated-token-42"),)
    # Gone or broken later: an error naming the file, never a call without a token.
    token_file.write_text("has a space")
    with pytest.raises(TransportConfigError, match=r"the token in token_file .*token"):
        security.metadata()
    token_file.unlink()
    with pytest.raises(TransportConfigError, match=r"cannot read token_file .*No such file"):
        security.metadata()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"token_file .* \(token file\) is empty"),
        (b"  \n", r"token_file .* \(token file\) is empty"),
        (b"two words\n", r"the token in token_file .* visible ASCII"),
        (b"\xff\xfe\x00", r"token_file .* is not text"),
    ],
)
def test_a_bad_token_file_is_refused_at_construction(
    tmp_path: Path, content: bytes, message: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(TransportConfigError, match=message):
        ClientSecurity(token_file=token_file)


# ---------------------------------------------------------------- contradictions and files


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def test_contradictory_settings_are_refused(ca: TestCA, tmp_path: Path) -> None:
    client = ca.issue("client")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cases: list[tuple[dict[str, object], str]] = [
        ({"token": TOKEN, "token_file": token_file}, "give token or token_file, not both"),
        ({"cert": client.cert}, "cert (a client certificate) needs its key"),
        ({"key": client.key, "ca": ca.cert}, "key (a client key) needs its certificate: cert"),
        ({"insecure": True, "tls": True}, "insecure (plaintext) contradicts tls"),
        ({"insecure": True, "ca": ca.cert}, "insecure (plaintext) contradicts ca"),
        ({"server_name": "cp.internal"}, "server_name applies to TLS only"),
        ({"server_name": " ", "tls": True}, "server_name is empty"),
    ]
    for settings, message in cases:
        with pytest.raises(TransportConfigError, match=re.escape(message)):
            ClientSecurity(**settings)  # type: ignore[arg-type]


def test_errors_name_settings_as_each_client_calls_them(ca: TestCA) -> None:
    client = ca.issue("client")
    with pytest.raises(TransportConfigError) as refused:
        ClientSecurity(cert=client.cert)
    error = refused.value
    assert error.settings == ("cert", "key")
    cli_names = {"cert": "--tls-cert", "key": "--tls-key"}
    assert error.render(cli_names) == "--tls-cert (a client certificate) needs its --tls-key"
    # A value holding braces is left as it is, not taken for a placeholder.
    with pytest.raises(TransportConfigError) as odd:
        ClientSecurity(ca=Path("/no/{key}/ca.pem"))
    assert "/no/{key}/ca.pem" in odd.value.render(cli_names)


def test_unreadable_or_wrong_files_are_refused_at_construction(ca: TestCA, tmp_path: Path) -> None:
    client = ca.issue("client")
    missing = tmp_path / "missing.pem"
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases: list[tuple[dict[str, object], str]] = [
        (
            {"ca": missing},
            rf"cannot read ca {re.escape(str(missing))} \(CA certificates\): No such",
        ),
        ({"ca": tmp_path}, r"cannot read ca .*: Is a directory"),
        ({"ca": empty}, r"ca .* \(CA certificates\) is empty"),
        ({"ca": client.key}, r"ca .* is not PEM: no -----BEGIN CERTIFICATE-----"),
        ({"cert": client.key, "key": client.key}, r"cert .* is not PEM: no -----BEGIN CERT"),
        ({"cert": client.cert, "key": client.cert}, r"key .* is not PEM: no -----BEGIN PRIVATE"),
        ({"cert": client.cert, "key": missing}, r"cannot read key .*missing\.pem"),
        ({"token_file": missing}, r"cannot read token_file .*missing\.pem \(token file\)"),
    ]
    for settings, message in cases:
        with pytest.raises(TransportConfigError, match=message):
            ClientSecurity(**settings)  # type: ignore[arg-type]


def test_tls_settings_turn_tls_on_and_make_credentials(ca: TestCA) -> None:
    client = ca.issue("client")
    assert not ClientSecurity().uses_tls
    assert ClientSecurity().credentials() is None
    for security in (
        ClientSecurity(tls=True),
        ClientSecurity(ca=ca.cert),
        ClientSecurity(cert=client.cert, key=client.key),
    ):
        assert security.uses_tls
        assert security.credentials() is not None
    named = ClientSecurity(ca=ca.cert, server_name="cp.internal")
    assert named.channel_options() == [("grpc.ssl_target_name_override", "cp.internal")]
    assert ClientSecurity(ca=ca.cert).channel_options() == []


def test_a_file_removed_after_construction_fails_the_next_channel(ca: TestCA) -> None:
    client = ca.issue("client")
    security = ClientSecurity(ca=ca.cert, cert=client.cert, key=client.key)
    client.key.unlink()
    with pytest.raises(TransportConfigError, match=r"cannot read key"):
        security.channel("127.0.0.1:1")


def test_paths_and_booleans_from_the_environment(tmp_path: Path) -> None:
    assert path_or_none(None) is None
    assert path_or_none("") is None
    assert path_or_none("  ") is None
    assert path_or_none("~/x.pem") == Path.home() / "x.pem"
    for text in ("1", "true", "TRUE", "yes", "on", " y "):
        assert parse_bool(text, "CONTROLPLANE_TLS") is True
    for text in ("0", "false", "no", "off", ""):
        assert parse_bool(text, "CONTROLPLANE_TLS") is False
    with pytest.raises(TransportConfigError, match=r"CONTROLPLANE_TLS must be 1/true.*'maybe'"):
        parse_bool("maybe", "CONTROLPLANE_TLS")


def test_the_module_imports_no_grpc() -> None:
    # The SDK's configuration imports it; ``import agents`` must stay free of gRPC.
    code = (
        "import sys, controlplane.transport as t\n"
        "t.ClientSecurity(token='x').metadata()\n"
        "print('grpc' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
