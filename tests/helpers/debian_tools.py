"""Tools the tests run from Debian's packages (Alertmanager, promtool), unpacked, never
installed (no service started, no user made), once, into a cache: what ``.ci/run`` does,
done by the tests themselves when it has not been, so that ``make test`` runs alone on a
Debian machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CACHE = Path.home() / ".cache" / "controlplane-tests"


def unpacked(package: str, binary: str) -> Path | None:
    """``/usr/bin/<binary>`` of Debian's ``package``, downloaded and unpacked under the
    cache (None: no apt here, or the download failed)."""
    root = CACHE / package / "root"
    path = root / "usr" / "bin" / binary
    if path.exists():
        return path
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    where = CACHE / package
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["apt-get", "download", package],
            cwd=where, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        [deb] = sorted(where.glob(f"{package}_*.deb"))
        subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=300
        )
    except (subprocess.SubprocessError, OSError, ValueError):
        return None
    return path if path.exists() else None
