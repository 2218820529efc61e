"""Records edited by hand in etcd (as with etcdctl), under traffic: skipped, counted, healed."""

from __future__ import annotations

from pathlib import Path

from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from tests.faults.harness import CONVERGE_WITHIN, FaultRun, scaled
from tests.faults.test_server_faults import set_flag, settle
from tests.helpers.raw_etcd import put_blocking
from tests.helpers.scrape import scraped_sum

BAD_VALUES: dict[str, bytes] = {
    "flags/checkout/probe": b"{not json",
    "flags/checkout/other": b'{"value": {"nested": ' * 50 + b"1" + b"}" * 50,
    "shedding/checkout": b'{"percent": "lots", "tier": 7}',
    "pins/checkout": b"\xff\xfe\x00binary",
    "flags/checkout/Not A Name": b"{}",
    "flags/checkout/huge": b'{"value": "' + b"x" * 200_000 + b'"}',
}


def invalid_records(metrics_port: int) -> float:
    return scraped_sum(f"127.0.0.1:{metrics_port}", "controlplane_invalid_records_total")


def test_bad_records_are_skipped_counted_and_healed_under_traffic(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    metrics_port = free_port()
    with FaultRun(
        [etcd.endpoint],
        prefix,
        tmp_path,
        agents=int(scaled(20, 50)),
        server_args=["--metrics", f"127.0.0.1:{metrics_port}"],
    ) as run:
        assert run.writer is not None
        address = run.addresses[0]
        run.writer.start()
        set_flag(address, run.service, "probe", "good")
        set_flag(address, run.service, "other", "fine")
        settle(run, {"probe": "good", "other": "fine"}, CONVERGE_WITHIN)
        for path, value in BAD_VALUES.items():
            put_blocking(etcd.endpoint, prefix + path, value)
        run.writer.wait_acknowledged(20)
        # The server did not crash, counted every bad record, and everyone keeps the last
        # good values while the rest of the traffic flows.
        assert run.runners[0].proc is not None and run.runners[0].proc.poll() is None
        assert invalid_records(metrics_port) >= len(BAD_VALUES)
        settle(run, {"probe": "good", "other": "fine"}, CONVERGE_WITHIN)
        log = run.runners[0].log_path.read_text()
        for path in BAD_VALUES:
            assert f'"key": "{prefix}{path}"' in log, path
        # Writing through the API repairs a record everywhere.
        set_flag(address, run.service, "probe", "repaired")
        set_flag(address, run.service, "other", "repaired")
        settle(run, {"probe": "repaired", "other": "repaired"}, CONVERGE_WITHIN)
        report = run.finish("bad-records", bad_records=len(BAD_VALUES))
    assert report.ok, "\n".join(report.violations)
