"""A package's public names, imported on first use (PEP 562).

A package `__init__` lists its API without importing the modules behind it, so importing one module of a package
does not import all of them, and `model/` and `checkpoints/` (which use each other's modules) never meet a
half-initialised package. `from internvl_tune.model import load_model` works as with a plain import.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`; `exports` maps each public name to the submodule defining it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
