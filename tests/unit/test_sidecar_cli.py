"""The cp-agent command line: bad settings, help, connection security."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.sidecar import (
    Sidecar,
    SidecarOptions,
    main,
)

# ---------------------------------------------------------------- the command line


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def test_the_command_line_rejects_bad_settings_with_status_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CONTROLPLANE_SERVICE", "CONTROLPLANE_SERVERS", "CP_AGENT_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    code, err = run_main(["--servers", "127.0.0.1:1"], capsys)
    assert code == 2 and "--service" in err
    code, err = run_main(["--service", "Check_Out", "--servers", "127.0.0.1:1"], capsys)
    assert code == 2 and "DNS label" in err
    code, err = run_main(["--service", "checkout", "--servers", "nohostport"], capsys)
    assert code == 2 and "host:port" in err
    # The environment counts as the option.
    monkeypatch.setenv("CONTROLPLANE_SERVICE", "checkout")
    monkeypatch.setenv("CONTROLPLANE_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("CP_AGENT_LISTEN", "no-port")
    code, err = run_main([], capsys)
    assert code == 2 and "no-port" in err


def test_the_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "CONTROLPLANE_SERVICE",
        "CONTROLPLANE_SERVERS",
        "CONTROLPLANE_VERSION",
        "CONTROLPLANE_CACHE_PATH",
        "CP_AGENT_LISTEN",
        "CP_AGENT_STATE_FILE",
        "CP_AGENT_ON_CHANGE",
        "CP_AGENT_ON_PIN_CHANGE",
    ):
        assert name in text


# ---------------------------------------------------------------- connection security

SECURITY_VARIABLES = (
    "CONTROLPLANE_TOKEN",
    "CONTROLPLANE_TOKEN_FILE",
    "CONTROLPLANE_TLS",
    "CONTROLPLANE_TLS_CA",
    "CONTROLPLANE_TLS_CLIENT_CERT",
    "CONTROLPLANE_TLS_CLIENT_KEY",
    "CONTROLPLANE_TLS_SERVER_NAME",
    "CONTROLPLANE_INSECURE",
)


@pytest.fixture
def clean_security_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*SECURITY_VARIABLES, "CONTROLPLANE_SERVICE", "CONTROLPLANE_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_command_line_refuses_bad_connection_settings_with_status_2(
    capsys: pytest.CaptureFixture[str], clean_security_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.helpers.certs import TestCA

    pki = TestCA(tmp_path / "pki")
    client = pki.issue("client")
    base = ["--service", "checkout", "--listen", "127.0.0.1:0"]
    remote = [*base, "--servers", "10.0.0.5:50051"]
    local = [*base, "--servers", "127.0.0.1:1"]
    cases: list[tuple[list[str], str]] = [
        (remote, "server 10.0.0.5:50051 is not on loopback"),
        (remote, "--insecure/CONTROLPLANE_INSECURE"),
        (remote, "--tls-ca/CONTROLPLANE_TLS_CA"),
        ([*local, "--tls-cert", str(client.cert)],
         "--tls-cert/CONTROLPLANE_TLS_CLIENT_CERT (a client certificate) needs its "
         "--tls-key/CONTROLPLANE_TLS_CLIENT_KEY"),
        ([*local, "--tls-ca", str(tmp_path / "nope.pem")],
         f"cannot read --tls-ca/CONTROLPLANE_TLS_CA {tmp_path / 'nope.pem'}"),
        ([*remote, "--insecure", "--tls"],
         "--insecure/CONTROLPLANE_INSECURE (plaintext) contradicts --tls/CONTROLPLANE_TLS"),
        ([*local, "--token-file", str(tmp_path / "none")],
         "cannot read --token-file/CONTROLPLANE_TOKEN_FILE"),
        ([*local, "--tls-server-name", "cp.internal"], "applies to TLS only"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and message in err, (argv, err)
    # The environment counts as the option; a token from the environment is checked too.
    clean_security_env.setenv("CONTROLPLANE_TOKEN", "has a space")
    code, err = run_main(local, capsys)
    assert code == 2 and "CONTROLPLANE_TOKEN must be visible ASCII" in err
    assert "has a space" not in err
    clean_security_env.delenv("CONTROLPLANE_TOKEN")
    clean_security_env.setenv("CONTROLPLANE_TLS_CLIENT_KEY", str(client.key))
    code, err = run_main(local, capsys)
    assert code == 2 and "needs its certificate: --tls-cert" in err


def test_the_connection_settings_reach_the_agent(
    clean_security_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.helpers.certs import TestCA

    pki = TestCA(tmp_path / "pki")
    client = pki.issue("client")
    token_file = tmp_path / "token"
    token_file.write_text("sidecar-token-0123456789\n")
    options = SidecarOptions(
        service="checkout",
        servers=("cp.internal:443",),
        listen="127.0.0.1:0",
        token_file=token_file,
        tls_ca=pki.cert,
        tls_cert=client.cert,
        tls_key=client.key,
        tls_server_name="cp.example",
    )
    sidecar = Sidecar(options)
    security = sidecar.agent._client.config.security  # type: ignore[attr-defined]
    assert (security.token_file, security.ca, security.cert, security.key) == (
        token_file,
        pki.cert,
        client.cert,
        client.key,
    )
    assert security.server_name == "cp.example"
    assert security.metadata() == (("authorization", "Bearer sidecar-token-0123456789"),)
    sidecar.agent.close()  # never started: nothing to stop
    # The token itself, given programmatically, is not in the options' repr.
    secret = SidecarOptions(service="checkout", token="sidecar-secret-42")
    assert "sidecar-secret-42" not in repr(secret)


def test_the_help_names_the_connection_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in (*SECURITY_VARIABLES[1:], "--token-file", "--tls-ca", "--insecure"):
        assert name in text, name
    joined = " ".join(text.split())
    assert "Or put the token in CONTROLPLANE_TOKEN; there is no --token option" in joined
