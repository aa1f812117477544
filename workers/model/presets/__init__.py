"""Config files of well-known models (shapes only, no weights), for `--dummy-config` runs at
real shapes where no weights can be downloaded: `--dummy-config llama3-8b` or the file's path.
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.json"))


def resolve_config_path(name_or_path: str) -> str:
    """A preset's config.json path for a preset name; anything else is returned unchanged."""
    preset = _HERE / f"{name_or_path}.json"
    return str(preset) if preset.is_file() else name_or_path


def load_preset(name: str) -> dict:
    """A preset's config.json as a dict (a fresh copy each call)."""
    return json.loads((_HERE / f"{name}.json").read_text())
