"""A 3-member etcd cluster on loopback for the fault suite, and etcd version checks."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from aetcd import rpc

from controlplane.embedded_etcd import EmbeddedEtcd, etcd_version, find_etcd_binary, free_port
from controlplane.store import etcd_version_risk


def unsafe_to_kill_reason() -> str | None:
    """Why etcd members must not be killed in tests with this etcd (None: they may)."""
    version = etcd_version(find_etcd_binary())
    risk = etcd_version_risk(".".join(map(str, version)))
    if risk is None:
        return None
    return (
        f"{risk}; install etcd 3.4.x (Debian's etcd-server, as CI does) or >= 3.5.3 "
        "to run this test"
    )


class EtcdCluster:
    """``size`` etcd members on loopback ports, started together (each needs a quorum)."""

    def __init__(self, directory: Path, size: int = 3, cluster: str = "cp-faults") -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        args = [
            "--initial-cluster", initial,
            "--initial-cluster-token", cluster,
            "--initial-cluster-state", "new",
            # Elections within a second on loopback (defaults: 100 ms / 1 s).
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
        ]  # fmt: skip
        self.members = [
            EmbeddedEtcd(
                directory / f"m{i}",
                client_port=client,
                peer_port=peer,
                name=f"m{i}",
                extra_args=args,
            )
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> None:
        errors: list[BaseException] = []

        def run(member: EmbeddedEtcd) -> None:
            try:
                member.start(timeout=60)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m,)) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def leader(self) -> EmbeddedEtcd:
        """The member that leads now (asked of the running members)."""
        for member in self.members:
            if not member.running:
                continue
            with grpc.insecure_channel(member.endpoint) as channel:
                maintenance: Any = rpc.MaintenanceStub(channel)
                try:
                    status = maintenance.Status(rpc.StatusRequest(), timeout=2)
                except grpc.RpcError:
                    continue
            if status.leader and status.leader == status.header.member_id:
                return member
        raise AssertionError("no member says it leads")

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
