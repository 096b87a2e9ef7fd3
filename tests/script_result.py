"""Run a Python snippet in a fresh interpreter and read back what it printed as ``RESULT <json>``.

Tests that run DAGs for real do it in a child process: Airflow fixes its configuration (database,
URL root) when first imported, so each run gets its own environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

PREFIX = "RESULT "


def run_script(code: str, *args: str, env: dict[str, str], timeout: float = 600) -> Any:
    """``python -c code args…`` under ``env``; the JSON of its last ``RESULT`` line (the output on failure)."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix(PREFIX))
