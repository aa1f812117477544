"""GPU tests reuse the kernel tests' case builder and tolerance table (tests/kernels)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
