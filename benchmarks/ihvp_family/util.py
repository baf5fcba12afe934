"""Helpers shared by the parent and the workers: progress log and JSON encoding of tensors."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any


def log(message: str) -> None:
    """One time-stamped progress line on stderr."""
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback: tensors and arrays as lists, anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
