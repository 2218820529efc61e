"""cpctl shed: its output and its PERCENT."""

from __future__ import annotations

from controlplane.api.v1 import mitigation_pb2, types_pb2
from controlplane.cli._output import to_plain
from controlplane.cli.shed import render_shed_clear, render_shed_set
from tests.unit.cli.support import NOW, Server, run


def test_dry_run_of_a_clear_that_would_change_nothing() -> None:
    response = mitigation_pb2.ClearSheddingResponse(
        result=types_pb2.WriteResult(dry_run=True, would_change=False)
    )
    rendered = render_shed_clear(to_plain(response), NOW, "checkout")
    assert list(rendered.lines) == [
        "dry run: unchanged (nothing would change) · checkout: shedding off"
    ]


def test_human_line_of_a_shedding_change() -> None:
    response = mitigation_pb2.SetSheddingResponse(
        result=types_pb2.WriteResult(changed=True, revision=813),
        shedding=types_pb2.Shedding(service="checkout", tier=types_pb2.SHEDDABLE_PLUS, percent=50),
    )
    rendered = render_shed_set(to_plain(response), NOW)
    assert list(rendered.lines) == ["checkout: shedding SHEDDABLE_PLUS 50% (was off) · rev 813"]


def test_shed_percent_out_of_range_exits_3_before_any_call(server: Server) -> None:
    result = run(
        "--server", server.address, "shed", "set", "checkout", "150", "--reason", "overload"
    )
    assert result.exit_code == 3
    assert "error: PERCENT must be between 0 and 100, got 150" in result.stderr
    assert server.servicer.calls == []
