"""Running the installed `cpctl` console script as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

CPCTL = Path(sys.executable).parent / "cpctl"

Run = Callable[..., Coroutine[Any, Any, subprocess.CompletedProcess[str]]]
"""``await cpctl(*args, server_list=None)``: the finished process, output decoded."""


def clean_env() -> dict[str, str]:
    """This process's environment without the CPCTL_* settings a developer may have."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
