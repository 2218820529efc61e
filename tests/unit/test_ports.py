"""The pure parts of the port checks: addresses as given and as /proc/net/tcp{,6} writes them."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from controlplane.server._ports import Port, _address, port_error, split_host_port


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:50051", ("::1", 50051)),
        (":50051", ("", 50051)),
        ("localhost:0", ("localhost", 0)),
        ("unix:/run/cp.sock", None),
        ("9464", None),
        ("127.0.0.1:port", None),
        ("127.0.0.1:70000", None),
    ],
)
def test_host_and_port_are_read_from_what_the_options_take(
    given: str, expected: tuple[str, int] | None
) -> None:
    assert split_host_port(given) == expected


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "0.0.0.0"),
        # gRPC's dual-stack socket on 127.0.0.1 shows in tcp6 as ::ffff:127.0.0.1.
        ("0000000000000000FFFF00000100007F", "127.0.0.1"),
        ("00000000000000000000000001000000", "::1"),
    ],
)
def test_proc_net_tcp_addresses_are_read_in_host_byte_order(written: str, address: str) -> None:
    assert _address(written) == ipaddress.ip_address(address)


def test_an_address_not_of_this_machine_names_the_option_to_give_another() -> None:
    port = Port("192.0.2.1", 50051, "gRPC", "--listen HOST:PORT")
    error = port_error(port, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert error.lines == [
        "cannot listen on 192.0.2.1:50051 (gRPC): not an address of this machine; give one "
        "of its addresses with --listen HOST:PORT"
    ]
