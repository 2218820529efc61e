"""Which etcd releases the server warns about at start."""

from __future__ import annotations

import pytest

from controlplane.store import etcd_version_risk


@pytest.mark.parametrize("version", ["3.5.0", "3.5.1", "3.5.2", "v3.5.1"])
def test_releases_that_lose_writes_on_a_crash_are_named_with_the_fix(version: str) -> None:
    risk = etcd_version_risk(version)
    assert risk is not None
    assert risk.startswith(f"etcd {version} can lose acknowledged writes")
    assert "3.5.3" in risk


@pytest.mark.parametrize(
    "version", ["3.4.23", "3.5.3", "3.5.17", "3.6.0", "3.6.0-alpha.0", "4.0.0", "", "unknown"]
)
def test_other_releases_and_unreadable_versions_carry_no_warning(version: str) -> None:
    assert etcd_version_risk(version) is None
