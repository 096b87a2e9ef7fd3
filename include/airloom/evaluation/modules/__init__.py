"""``evaluate`` metric modules shipped with the project, loadable without the Hugging Face hub.

Each folder holds one module script named like the folder, as ``evaluate.load(<folder>)`` expects:
``evaluate.load(str(MODULES_DIR / "airloom_rouge"))`` or ``airloom.evaluation.metrics.load_metric("rouge")``.
The scripts only adapt ``evaluate``'s calling convention; the numbers come from
``airloom.evaluation.metrics``, so both paths agree exactly.
"""

from __future__ import annotations

from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parent
