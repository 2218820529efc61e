"""The names users and operators reach stay where they are, whatever moves inside.

Services import the SDK (``agents`` and its public modules); operators run the console
scripts; the server's own parts import the store, the model and the errors. A move inside
a package must keep each of these importable from where it is listed here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

import pytest

# Every public name of the SDK, exactly: a name added or lost shows here.
SDK_ALL = {
    "agents": [
        "ASGIShedder",
        "Agent",
        "AgentConfigError",
        "AgentState",
        "AioShedInterceptor",
        "AsyncAgent",
        "Backoff",
        "ControlPlaneProvider",
        "Criticality",
        "FlagValue",
        "Override",
        "OverrideError",
        "PinnedVersion",
        "ShedInterceptor",
        "SheddingLevel",
        "StateChange",
        "WSGIShedder",
    ],
    "agents.shedding": [
        "ASGIApp",
        "ASGIMessage",
        "ASGIReceive",
        "ASGIScope",
        "ASGISend",
        "ASGIShedder",
        "AioShedInterceptor",
        "CRITICALITY_HEADER",
        "CRITICALITY_METADATA",
        "Classifier",
        "DECISIONS_METRIC",
        "KeyFunction",
        "RETRY_PUSHBACK_METADATA",
        "ShedInterceptor",
        "SheddingAgent",
        "WSGIShedder",
        "request_criticality",
    ],
    "agents.criticality": [
        "CRITICALITY_HEADER",
        "CRITICALITY_METADATA",
        "CriticalityAdapter",
        "CriticalityInterceptor",
        "aio_interceptors",
        "current",
        "httpx_async_hook",
        "httpx_hook",
        "use",
    ],
    "agents.openfeature": ["ControlPlaneProvider"],
    "agents.testing": ["StaticAgent"],
    "agents.sidecar": [
        "HookResult",
        "HookRunner",
        "PinHookRunner",
        "Response",
        "Sidecar",
        "SidecarOptions",
        "main",
        "merge_changes",
        "retry_delay",
    ],
}

# Names the server's parts, the tests and the benchmarks import from the control plane.
CONTROLPLANE_NAMES = {
    "controlplane": ["__version__"],
    "controlplane.errors": [
        "BundleConflictError",
        "CompactedError",
        "ConflictError",
        "ControlPlaneError",
        "DeadlineExceededError",
        "EtcdAccessError",
        "FailedPreconditionError",
        "InvalidArgumentError",
        "NotFoundError",
        "PermissionDeniedError",
        "UnavailableError",
    ],
    "controlplane.model": [
        "AuditEntry",
        "Bundle",
        "BundleEntry",
        "Flag",
        "FlagValue",
        "GLOBAL_SCOPE",
        "KnownGood",
        "Meta",
        "Pin",
        "PinHistory",
        "RecordError",
        "Shedding",
        "Tier",
        "WriteOptions",
        "datetime_to_timestamp",
        "format_time",
        "parse_time",
        "utcnow",
    ],
    "controlplane.store": [
        "BundleOutcome",
        "BundleView",
        "DEFAULT_PREFIX",
        "EtcdSecurity",
        "Plan",
        "Store",
        "WatchEvent",
        "WriteOutcome",
        "etcd_version_risk",
        "new_audit_id",
        "normalize_endpoints",
    ],
    "controlplane.embedded_etcd": [
        "EmbeddedEtcd",
        "EmbeddedEtcdError",
        "EtcdNotFoundError",
        "EtcdPortInUseError",
        "EtcdStartError",
        "etcd_version",
        "find_etcd_binary",
        "free_port",
        "parse_etcd_version",
    ],
    "controlplane.server": ["ControlServer", "ServerConfig", "ServerConfigError", "main"],
    "controlplane.cli": ["ExitCode", "cli", "main"],
}

CONSOLE_SCRIPTS = {
    "controlplane": "controlplane.server:main",
    "cpctl": "controlplane.cli:main",
    "cp-agent": "agents.sidecar:main",
}


@pytest.mark.parametrize("module_name", sorted(SDK_ALL))
def test_sdk_modules_export_exactly_their_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(SDK_ALL[module_name])
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{module_name}.{name}"


@pytest.mark.parametrize("module_name", sorted(CONTROLPLANE_NAMES))
def test_controlplane_names_stay_importable_where_they_are(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in CONTROLPLANE_NAMES[module_name] if not hasattr(module, name)]
    assert missing == []


def test_console_scripts_point_at_callables() -> None:
    scripts = {
        entry.name: entry
        for entry in importlib.metadata.entry_points(group="console_scripts")
        if entry.name in CONSOLE_SCRIPTS
    }
    assert {name: entry.value for name, entry in scripts.items()} == CONSOLE_SCRIPTS
    for entry in scripts.values():
        assert callable(entry.load())


@pytest.mark.parametrize(
    ("module_name", "forbidden"),
    [
        # cpctl starts fast: its parsing and help load no gRPC.
        ("controlplane.cli", ("grpc", "controlplane.api")),
        # A service's SDK pulls in nothing of the server's.
        (
            "agents",
            ("controlplane.server", "controlplane.store", "aetcd"),
        ),
        # Nor the HTTP clients it has hooks for: a service brings its own.
        ("agents.criticality", ("httpx", "requests")),
        ("agents.shedding", ("httpx", "requests")),
    ],
)
def test_imports_stay_light(module_name: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module_name}\n"
        f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
