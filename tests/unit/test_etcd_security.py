"""EtcdSecurity: option rules, what its repr hides, and TLS files read at connect (no etcd)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from controlplane.errors import EtcdAccessError, UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.store import EtcdSecurity, Store, normalize_endpoints
from tests.helpers.certs import TestCA

PASSWORD = "pw-0f3a-unit-secret"


def test_no_options_means_plaintext_without_a_user() -> None:
    security = EtcdSecurity()
    assert not security.uses_tls
    assert not security.uses_auth


@pytest.mark.parametrize(
    ("options", "tls", "auth"),
    [
        ({"ca": Path("ca.pem")}, True, False),
        ({"cert": Path("c.pem"), "key": Path("k.pem")}, True, False),
        ({"user": "root", "password": PASSWORD}, False, True),
        (
            {
                "ca": Path("ca.pem"),
                "cert": Path("c.pem"),
                "key": Path("k.pem"),
                "user": "cp",
                "password": PASSWORD,
                "server_name": "etcd.internal",
            },
            True,
            True,
        ),
    ],
)
def test_valid_combinations(options: dict[str, object], tls: bool, auth: bool) -> None:
    security = EtcdSecurity(**options)  # type: ignore[arg-type]
    assert security.uses_tls is tls
    assert security.uses_auth is auth


def test_string_paths_become_paths() -> None:
    security = EtcdSecurity(ca="ca.pem", cert="c.pem", key="k.pem")  # type: ignore[arg-type]
    assert security.ca == Path("ca.pem")
    assert security.cert == Path("c.pem")
    assert security.key == Path("k.pem")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cert": Path("c.pem")}, "--etcd-cert needs --etcd-key"),
        ({"ca": Path("ca.pem"), "key": Path("k.pem")}, "--etcd-key needs --etcd-cert"),
        ({"user": "root"}, "--etcd-user 'root' needs a password"),
        ({"password": PASSWORD}, "an etcd password needs --etcd-user"),
        ({"user": "", "password": PASSWORD}, "--etcd-user is empty"),
        ({"user": "root", "password": ""}, "the etcd password is empty"),
        ({"server_name": "etcd.internal"}, "--etcd-server-name needs TLS"),
        ({"ca": Path("ca.pem"), "server_name": ""}, "--etcd-server-name is empty"),
    ],
)
def test_invalid_combinations_name_the_option(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message) as excinfo:
        EtcdSecurity(**options)  # type: ignore[arg-type]
    assert PASSWORD not in str(excinfo.value)


def test_repr_shows_the_user_but_never_the_password() -> None:
    security = EtcdSecurity(user="root", password=PASSWORD)
    assert "user='root'" in repr(security)
    assert PASSWORD not in repr(security)
    assert PASSWORD not in str(security)


def test_endpoints_follow_the_tls_setting() -> None:
    assert normalize_endpoints(["https://10.0.0.1:2379/", "10.0.0.2:2379"], tls=True) == [
        "10.0.0.1:2379",
        "10.0.0.2:2379",
    ]
    with pytest.raises(ValueError, match="plaintext but TLS to etcd is configured"):
        normalize_endpoints(["http://10.0.0.1:2379"], tls=True)
    with pytest.raises(ValueError, match="TLS to etcd needs --etcd-ca"):
        normalize_endpoints(["https://10.0.0.1:2379"])
    with pytest.raises(ValueError, match="TLS to etcd needs --etcd-ca"):
        Store(["https://10.0.0.1:2379"], metrics=ServerMetrics(CollectorRegistry()))


def test_store_accepts_https_endpoints_with_tls() -> None:
    store = Store(
        ["https://127.0.0.1:2379"],
        metrics=ServerMetrics(CollectorRegistry()),
        security=EtcdSecurity(ca=Path("ca.pem")),
    )
    assert store.endpoints == ["127.0.0.1:2379"]


def test_channel_credentials_from_readable_pem_files(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    client = ca.issue("client")
    credentials = EtcdSecurity(ca=ca.cert, cert=client.cert, key=client.key).channel_credentials()
    assert isinstance(credentials, grpc.ChannelCredentials)


async def test_connect_names_a_missing_tls_file(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    missing = tmp_path / "nope" / "client.pem"
    store = Store(
        ["127.0.0.1:2379"],
        metrics=ServerMetrics(CollectorRegistry()),
        security=EtcdSecurity(ca=ca.cert, cert=missing, key=tmp_path / "client-key.pem"),
    )
    with pytest.raises(EtcdAccessError, match="cannot read --etcd-cert file") as excinfo:
        await store.connect()
    assert str(missing) in str(excinfo.value)
    assert isinstance(excinfo.value, UnavailableError)
    await store.close()


async def test_connect_refuses_a_file_that_is_not_pem_without_quoting_it(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("hunter2-not-a-key\n")
    ca = TestCA(tmp_path)
    client = ca.issue("client")
    store = Store(
        ["127.0.0.1:2379"],
        metrics=ServerMetrics(CollectorRegistry()),
        security=EtcdSecurity(ca=ca.cert, cert=client.cert, key=key),
    )
    with pytest.raises(EtcdAccessError, match=r"--etcd-key file .* holds no PEM private key") as e:
        await store.connect()
    assert "hunter2" not in str(e.value)
    await store.close()
