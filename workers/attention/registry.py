"""Maps `EngineConfig.attention_backend` names to backend instances.

The Triton backend is imported only when asked for, so CPU-only paths never import it.
"""

from __future__ import annotations

import importlib
import inspect

from workers.attention.backend import AttentionBackend
from workers.errors import InvalidParameter

_MODULES = {
    "torch": "workers.attention.torch_backend",
    "triton": "workers.attention.triton_backend",
}


def get_attention_backend(name: str) -> AttentionBackend:
    """A new backend instance for `name` ('torch' or 'triton')."""
    if name not in _MODULES:
        raise InvalidParameter("attention_backend", f"{name!r} is not one of {sorted(_MODULES)}")
    module = importlib.import_module(_MODULES[name])
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(cls, AttentionBackend)
            and not inspect.isabstract(cls)
            and getattr(cls, "name", None) == name
        ):
            return cls()
    raise InvalidParameter("attention_backend", f"{_MODULES[name]} defines no {name!r} backend")
