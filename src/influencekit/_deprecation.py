"""Old names kept for one release: each still works, with a DeprecationWarning naming its replacement."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def alias_getattr(module: str, aliases: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving each old name to ``"package.module:NewName"``, with a warning."""

    def __getattr__(name: str) -> Any:
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target_module, _, target = aliases[name].partition(":")
        warnings.warn(
            f"{module}.{name} is deprecated; use {target_module}.{target}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(target_module), target)

    return __getattr__


def moved_module(old: str, new: str) -> None:
    """Make the old module path ``old`` an alias of ``new`` (call from the old module's body)."""
    warnings.warn(f"module {old} is deprecated; import {new}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
